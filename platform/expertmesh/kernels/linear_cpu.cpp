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

namespace expertmesh {
namespace {

constexpr int kColumns = 4;
constexpr int kMaxRowTile = 6;  // 6 rows x 4 columns = 24 accumulators (measured: better than 8 x 3)

template <int MT>
void dot_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t columns, int64_t depth, float* y,
              int64_t ldy, const float* bias) {
  v16 acc[MT][kColumns] = {};
  for (int64_t k = 0; k < depth; k += kLanes) {
    v16 wv[kColumns];
    for (int c = 0; c < kColumns; ++c) wv[c] = c < columns ? load(w + c * ldw + k) : v16{};
    for (int m = 0; m < MT; ++m) {
      const v16 xv = load(x + m * ldx + k);
      for (int c = 0; c < kColumns; ++c) acc[m][c] += xv * wv[c];
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < columns; ++c) y[m * ldy + c] = sum_lanes(acc[m][c]) + (bias ? bias[c] : 0.0f);
}

void column_block(const float* x, int64_t rows, const float* w, int64_t columns, int64_t depth, float* y,
                  int64_t ldy, const float* bias) {
  for (int64_t r = 0; r < rows; r += kMaxRowTile) {
    const float* xr = x + r * depth;
    float* yr = y + r * ldy;
    switch (std::min<int64_t>(kMaxRowTile, rows - r)) {
      case 1: dot_tile<1>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
      case 2: dot_tile<2>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
      case 3: dot_tile<3>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
      case 4: dot_tile<4>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
      case 5: dot_tile<5>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
      default: dot_tile<6>(xr, depth, w, depth, columns, depth, yr, ldy, bias); break;
    }
  }
}

}  // namespace

// The bias's data, or nullptr without one; it must be contiguous fp32 [columns].
static const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t columns) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == columns,
              "bias must be contiguous [N] fp32");
  return bias->data_ptr<float>();
}

// x [M, K] fp32 contiguous, weight [N, K] fp32 contiguous, bias [N] fp32 or undefined;
// K a multiple of 16. Returns x weight^T + bias, [M, N] fp32.
at::Tensor small_linear(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x must be contiguous [M, K] fp32");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 2,
              "weight must be contiguous [N, K] fp32");
  const int64_t rows = x.size(0), depth = x.size(1), columns = weight.size(0);
  TORCH_CHECK(weight.size(1) == depth, "weight's in-features must match x");
  TORCH_CHECK(depth % kLanes == 0, "in-features must be a multiple of 16");
  const float* b = bias_data(bias, columns);
  auto y = at::empty({rows, columns}, x.options());
  const float* xd = x.data_ptr<float>();
  const float* wd = weight.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  const int64_t blocks = (columns + kColumns - 1) / kColumns;
  dynamic_for(blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kColumns;
      column_block(xd, rows, wd + first * depth, std::min<int64_t>(kColumns, columns - first), depth, yd + first,
                   columns, b ? b + first : nullptr);
    }
  });
  return y;
}

// ---- input-major variant: weights packed once into column blocks --------------------
//
// At 32 rows the dot-product kernel above is compute-bound and pays a horizontal sum per
// output. Packed as [N / C, K, C], a column block is one contiguous stream; per input
// feature k the tile loads C / 16 weight vectors and broadcasts x[m, k] for each of its
// rows, so every FMA lands on a register accumulator and nothing is reduced at the end.

namespace {

constexpr int kPackedRowTile = 6;  // 6 rows x 4 vectors = 24 accumulators

int64_t packed_block_width(int64_t columns) {
  return columns % (4 * kLanes) == 0 ? 4 * kLanes : (columns % (2 * kLanes) == 0 ? 2 * kLanes : kLanes);
}

template <int MT, int NV>
void packed_tile(const float* x, int64_t depth, const float* w, float* y, int64_t ldy, const float* bias) {
  v16 acc[MT][NV] = {};
  for (int64_t k = 0; k < depth; ++k) {
    v16 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load(w + k * NV * kLanes + v * kLanes);
    for (int m = 0; m < MT; ++m) {
      const v16 xm = broadcast(x[m * depth + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] += xm * wv[v];
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < NV; ++v) store(y + m * ldy + v * kLanes, acc[m][v] + (bias ? load(bias + v * kLanes) : v16{}));
}

template <int NV>
void packed_block(const float* x, int64_t rows, int64_t depth, const float* w, float* y, int64_t ldy,
                  const float* bias) {
  for (int64_t r = 0; r < rows; r += kPackedRowTile) {
    const float* xr = x + r * depth;
    float* yr = y + r * ldy;
    switch (std::min<int64_t>(kPackedRowTile, rows - r)) {
      case 1: packed_tile<1, NV>(xr, depth, w, yr, ldy, bias); break;
      case 2: packed_tile<2, NV>(xr, depth, w, yr, ldy, bias); break;
      case 3: packed_tile<3, NV>(xr, depth, w, yr, ldy, bias); break;
      case 4: packed_tile<4, NV>(xr, depth, w, yr, ldy, bias); break;
      case 5: packed_tile<5, NV>(xr, depth, w, yr, ldy, bias); break;
      default: packed_tile<6, NV>(xr, depth, w, yr, ldy, bias); break;
    }
  }
}

}  // namespace

// weight [N, K] fp32 (N a multiple of 16) -> [N / C, K, C], C the block width packed_linear uses.
at::Tensor pack_linear(at::Tensor weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2, "weight must be [N, K] fp32");
  const int64_t columns = weight.size(0), depth = weight.size(1);
  TORCH_CHECK(columns % kLanes == 0, "out-features must be a multiple of 16 to pack");
  const int64_t width = packed_block_width(columns);
  return weight.view({columns / width, width, depth}).transpose(1, 2).contiguous();
}

// x [M, K] fp32 contiguous, packed [N / C, K, C] from pack_linear, bias [N] fp32 or undefined.
at::Tensor packed_linear(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x must be contiguous [M, K] fp32");
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous() && packed.dim() == 3,
              "packed weight must come from pack_linear");
  const int64_t rows = x.size(0), depth = x.size(1), blocks = packed.size(0), width = packed.size(2);
  const int64_t columns = blocks * width;
  TORCH_CHECK(packed.size(1) == depth && width == packed_block_width(columns), "packed weight does not match x");
  const float* b = bias_data(bias, columns);
  auto y = at::empty({rows, columns}, x.options());
  const float* xd = x.data_ptr<float>();
  const float* wd = packed.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  dynamic_for(blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const float* w = wd + block * depth * width;
      float* yb = yd + block * width;
      const float* bb = b ? b + block * width : nullptr;
      if (width == 4 * kLanes) packed_block<4>(xd, rows, depth, w, yb, columns, bb);
      else if (width == 2 * kLanes) packed_block<2>(xd, rows, depth, w, yb, columns, bb);
      else packed_block<1>(xd, rows, depth, w, yb, columns, bb);
    }
  });
  return y;
}

}  // namespace expertmesh
