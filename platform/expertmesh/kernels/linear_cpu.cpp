// y = x W^T (+ b) for the few rows of a decode step, W in nn.Linear's [out, in] layout.
//
// At M <= 32 rows MKL repacks W on every call and reaches about a third of the
// machine's fp32 peak; here each job owns kColumns output columns, reads their W
// rows once (they stay in L1 while every row tile of x passes over them) and keeps
// a kMaxRowTile x kColumns block of dot products in registers, reducing lanes once
// at the end.

#include <ATen/Parallel.h>

#include <algorithm>

#include "simd.h"
#include "tiles.h"

namespace expertmesh {
namespace {

constexpr int kColumns = 4;
// Rows x 4 columns of accumulators: AVX-512 6 x 4 (measured: better than 8 x 3), AVX2 3 x 4.
constexpr int kMaxRowTile = kAccumulators / kColumns;

template <int MT, typename T>
void dot_tile(const T* x, int64_t ldx, const T* w, int64_t ldw, int64_t columns, int64_t depth, T* y, int64_t ldy,
              const T* bias) {
  vec acc[MT][kColumns] = {};
  for (int64_t k = 0; k < depth; k += kLanes) {
    vec wv[kColumns];
    for (int c = 0; c < kColumns; ++c) wv[c] = c < columns ? load(w + c * ldw + k) : vec{};
    for (int m = 0; m < MT; ++m) {
      const vec xv = load(x + m * ldx + k);
      for (int c = 0; c < kColumns; ++c) acc[m][c] += xv * wv[c];
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < columns; ++c)
      y[m * ldy + c] = static_cast<T>(sum_lanes(acc[m][c]) + (bias ? static_cast<float>(bias[c]) : 0.0f));
}

template <typename T>
void column_block(const T* x, int64_t rows, const T* w, int64_t columns, int64_t depth, T* y, int64_t ldy,
                  const T* bias) {
  for (int64_t r = 0; r < rows; r += kMaxRowTile) {
    const T* xr = x + r * depth;
    T* yr = y + r * ldy;
    switch (std::min<int64_t>(kMaxRowTile, rows - r)) {
      case 1: dot_tile<1>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
      case 2: dot_tile<2>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
      case 3: dot_tile<3>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
      case 4: dot_tile<4>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
      case 5: dot_tile<5>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
      default: dot_tile<kMaxRowTile>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
    }
  }
}

// The bias's data, or nullptr without one; it must be contiguous [columns] in x's dtype.
template <typename T>
const T* bias_data(const c10::optional<at::Tensor>& bias, int64_t columns) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == c10::CppTypeToScalarType<T>::value && bias->is_contiguous() &&
                  bias->numel() == columns,
              "bias must be contiguous [N] in x's dtype");
  return bias->data_ptr<T>();
}

template <typename T>
void small_linear_rows(const T* x, int64_t rows, const T* w, int64_t columns, int64_t depth, const T* bias, T* y) {
  const int64_t blocks = (columns + kColumns - 1) / kColumns;
  dynamic_for(blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kColumns;
      column_block(x, rows, w + first * depth, std::min<int64_t>(kColumns, columns - first), depth, y + first,
                   columns, bias ? bias + first : nullptr);
    }
  });
}

}  // namespace

// x [M, K] contiguous, weight [N, K] contiguous, bias [N] or undefined, all fp32 or all
// bf16 (accumulated in fp32); K a multiple of 16. Returns x weight^T + bias, [M, N].
at::Tensor small_linear(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2, "x must be contiguous [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.dim() == 2,
              "weight must be contiguous [N, K] in x's dtype");
  const int64_t rows = x.size(0), depth = x.size(1), columns = weight.size(0);
  TORCH_CHECK(weight.size(1) == depth, "weight's in-features must match x");
  TORCH_CHECK(depth % kLanes == 0, "in-features must be a multiple of ", kLanes);
  auto y = at::empty({rows, columns}, x.options());
  if (x.scalar_type() == at::kFloat) {
    small_linear_rows(x.data_ptr<float>(), rows, weight.data_ptr<float>(), columns, depth,
                      bias_data<float>(bias, columns), y.data_ptr<float>());
  } else {
    small_linear_rows(x.data_ptr<at::BFloat16>(), rows, weight.data_ptr<at::BFloat16>(), columns, depth,
                      bias_data<at::BFloat16>(bias, columns), y.data_ptr<at::BFloat16>());
  }
  return y;
}

// ---- input-major variant: weights packed once into column blocks --------------------
//
// At 32 rows the dot-product kernel above is compute-bound and pays a horizontal sum per
// output. Packed as [N / C, K, C], a column block is one contiguous stream; per input
// feature k the tile loads C / kLanes weight vectors and broadcasts x[m, k] for each of its
// rows, so every FMA lands on a register accumulator and nothing is reduced at the end.
// A tile is kPackedRowTile rows by up to kBlockVectors vectors of columns, the accumulators
// the ISA's registers hold: AVX-512 6 x 4 vectors (6 x 64 columns), AVX2 6 x 2 (6 x 16, the
// shape of BLIS's Haswell kernel).
//
// bf16 weights are packed in k pairs for the CPU's bf16 dot-product instruction, as
// [N / C, K / 2, C, 2]: per pair of inputs a tile loads C / 16 vectors of 16 columns' weight
// pairs and broadcasts x[m, k:k+2] as one 32-bit value (see dot_pairs in simd.h). On a CPU
// without it, bf16 weights keep fp32's layout and are widened as they are loaded: half the
// bytes of fp32 to stream, the same FMAs.

namespace {

constexpr int kPackedRowTile = 6;
constexpr int kBlockVectors = kAccumulators / kPackedRowTile;

int64_t packed_block_width(int64_t columns) { return widest_dividing(columns, kBlockVectors) * kLanes; }

// One tile: MT rows of x against one packed column block: fp32 rows against fp32 or widened
// bf16 weights (W), or bf16 rows against bf16 pair-packed weights (Pairs); y and bias of type T.
template <int MT, int NV, bool Pairs, typename X, typename W, typename T>
void packed_tile(const X* x, int64_t depth, const W* w, T* y, int64_t ldy, const T* bias) {
  vec acc[MT][NV] = {};
  if constexpr (!Pairs) {
    for (int64_t k = 0; k < depth; ++k) {
      vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load(w + k * NV * kLanes + v * kLanes);
      for (int m = 0; m < MT; ++m) {
        const vec xm = broadcast(x[m * depth + k]);
        for (int v = 0; v < NV; ++v) acc[m][v] += xm * wv[v];
      }
    }
  } else {
#if defined(__AVX512BF16__)
    accumulate_pairs(acc, x, depth, w, depth);
#endif
  }
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < NV; ++v) store(y + m * ldy + v * kLanes, acc[m][v] + (bias ? load(bias + v * kLanes) : vec{}));
}

template <int NV, bool Pairs, typename X, typename W, typename T>
void packed_block(const X* x, int64_t rows, int64_t depth, const W* w, T* y, int64_t ldy, const T* bias) {
  for (int64_t r = 0; r < rows; r += kPackedRowTile) {
    const X* xr = x + r * depth;
    T* yr = y + r * ldy;
    switch (std::min<int64_t>(kPackedRowTile, rows - r)) {
      case 1: packed_tile<1, NV, Pairs>(xr, depth, w, yr, ldy, bias); break;
      case 2: packed_tile<2, NV, Pairs>(xr, depth, w, yr, ldy, bias); break;
      case 3: packed_tile<3, NV, Pairs>(xr, depth, w, yr, ldy, bias); break;
      case 4: packed_tile<4, NV, Pairs>(xr, depth, w, yr, ldy, bias); break;
      case 5: packed_tile<5, NV, Pairs>(xr, depth, w, yr, ldy, bias); break;
      default: packed_tile<6, NV, Pairs>(xr, depth, w, yr, ldy, bias); break;
    }
  }
}

template <bool Pairs, typename X, typename W, typename T>
void packed_block_of_width(const X* x, int64_t rows, int64_t depth, const W* w, int64_t width, T* y, int64_t ldy,
                           const T* bias) {
  switch (width / kLanes) {
    case kBlockVectors: packed_block<kBlockVectors, Pairs>(x, rows, depth, w, y, ldy, bias); break;
    case kBlockVectors / 2: packed_block<kBlockVectors / 2, Pairs>(x, rows, depth, w, y, ldy, bias); break;
    default: packed_block<1, Pairs>(x, rows, depth, w, y, ldy, bias); break;
  }
}

// y = x W^T + b over every column block of a packed weight, blocks handed out dynamically.
// Widened bf16 weights are widened once a block where more than one row tile reads it.
template <bool Pairs, typename X, typename W, typename T>
void packed_rows(const X* x, int64_t rows, int64_t depth, const W* packed, int64_t blocks, int64_t width,
                 const T* bias, T* y) {
  const int64_t columns = blocks * width;
  dynamic_for(blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const W* w = packed + block * depth * width;
      T* yb = y + block * width;
      const T* bb = bias ? bias + block * width : nullptr;
      if constexpr (!Pairs && std::is_same_v<W, at::BFloat16>) {
        if (rows > kPackedRowTile) {
          packed_block_of_width<Pairs>(x, rows, depth, widen_to_scratch(w, depth * width), width, yb, columns, bb);
          continue;
        }
      }
      packed_block_of_width<Pairs>(x, rows, depth, w, width, yb, columns, bb);
    }
  });
}

}  // namespace

bool has_bf16_dot() { return kHasBf16Dot; }

// weight [N, K] (N a multiple of kLanes) -> fp32, or bf16 on a CPU without bf16 dot products:
// [N / C, K, C]; bf16 with them: [N / C, K / 2, C, 2] (K even); C the block width
// packed_linear uses.
at::Tensor pack_linear(at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be [N, K]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "weight must be fp32 or bf16");
  const int64_t columns = weight.size(0), depth = weight.size(1);
  TORCH_CHECK(columns % kLanes == 0, "out-features must be a multiple of ", kLanes, " to pack");
  const int64_t width = packed_block_width(columns);
  if (weight.scalar_type() == at::kBFloat16 && kHasBf16Dot) {
    TORCH_CHECK(depth % 2 == 0, "in-features must be even to pack bf16 weights");
    return weight.view({columns / width, width, depth / 2, 2}).permute({0, 2, 1, 3}).contiguous();
  }
  return weight.view({columns / width, width, depth}).transpose(1, 2).contiguous();
}

// x [M, K] contiguous, packed from pack_linear in x's dtype, bias [N] in x's dtype or undefined.
at::Tensor packed_linear(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2, "x must be contiguous [M, K]");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type() && packed.is_contiguous(),
              "packed weight must come from pack_linear, in x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  const bool pairs = x.scalar_type() == at::kBFloat16 && kHasBf16Dot;
  TORCH_CHECK(packed.dim() == (pairs ? 4 : 3), "packed weight must come from pack_linear");
  const int64_t rows = x.size(0), depth = x.size(1), blocks = packed.size(0);
  const int64_t width = packed.size(2), columns = blocks * width;
  TORCH_CHECK((pairs ? 2 * packed.size(1) : packed.size(1)) == depth && width == packed_block_width(columns),
              "packed weight does not match x");
  auto y = at::empty({rows, columns}, x.options());
  if (x.scalar_type() == at::kFloat) {
    packed_rows<false>(x.data_ptr<float>(), rows, depth, packed.data_ptr<float>(), blocks, width,
                       bias_data<float>(bias, columns), y.data_ptr<float>());
    return y;
  }
  const at::BFloat16* bias_ptr = bias_data<at::BFloat16>(bias, columns);
  if (pairs && tiles::available() && depth % tiles::kDepth == 0) {  // the same pairs, read by the tile unit
    const at::Tensor padded = tiles::readable_rows(x, rows % tiles::kRows != 0);
    tile_linear_bf16(padded.data_ptr<at::BFloat16>(), rows, depth, packed.data_ptr<at::BFloat16>(), columns, width,
                     bias_ptr, y.data_ptr<at::BFloat16>());
  } else if (pairs) {
    packed_rows<true>(x.data_ptr<at::BFloat16>(), rows, depth, packed.data_ptr<at::BFloat16>(), blocks, width,
                      bias_ptr, y.data_ptr<at::BFloat16>());
  } else {  // rows widened once up front: a bf16 broadcast per row and input would cost more than its FMAs
    const at::Tensor x_float = x.to(at::kFloat);
    packed_rows<false>(x_float.data_ptr<float>(), rows, depth, packed.data_ptr<at::BFloat16>(), blocks, width,
                       bias_ptr, y.data_ptr<at::BFloat16>());
  }
  return y;
}

}  // namespace expertmesh
