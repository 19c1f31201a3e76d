// fp32 linears on the CPU's tile unit (AMX), with fp32's accuracy.
//
// AMX multiplies bf16 only, about 20x faster than fp32 FMAs here. Every fp32 value is
// exactly the sum of three bf16 values (hi + mid + lo: 8 significand bits each, rounded to
// nearest), so x . w is the sum of nine bf16 products. The six whose weight is at least
// 2^-16 of the leading one (hi.hi, hi.mid, mid.hi, hi.lo, mid.mid, lo.hi) are accumulated in
// fp32 by the tile unit; the three left out are below 2^-24 of it, fp32's own rounding
// ("bf16x6", Henry, Tang and Heinecke, ARITH 2019). Tests hold the error against an fp64
// reference to fp32's own bound for a K-term dot product.
//
// Weights are split and packed once, at load, as [N / 16, K / 32, 3, 16, 16, 2]: for each
// block of 16 output columns and 32 inputs, the hi, mid and lo tiles (16 input pairs x 16
// columns x 2, the layout the tile unit reads B in), one 3 KB stream per column block.
// Activations are split per call into hi, mid and lo tiles of x, row-padded to 32.

#include "tiles.h"

namespace expertmesh {

namespace {

constexpr int kPlanes = 3;  // hi, mid, lo
using tiles::kColumns;
using tiles::kDepth;
using tiles::kRows;
using tiles::kValues;

#if defined(EXPERTMESH_AMX)
inline __m512 widen(__m256bh h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}

// x [rows, depth] -> [padded / 16, depth / 32, 3, 16, 32] bf16: for each 16-row block and 32
// inputs, the hi, mid and lo tiles (x == hi + mid + lo exactly), 1 KB each; rows past `rows`
// are zero.
void split_rows(const float* x, int64_t rows, int64_t padded, int64_t depth, at::BFloat16* split) {
  const int64_t depth_blocks = depth / kDepth;
  at::parallel_for(0, padded, kRows, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      at::BFloat16* row = split + (m / kRows) * depth_blocks * kPlanes * kValues + (m % kRows) * kDepth;
      for (int64_t k = 0; k < depth; k += kLanes) {
        at::BFloat16* out = row + (k / kDepth) * kPlanes * kValues + k % kDepth;
        __m512 rest = m < rows ? _mm512_loadu_ps(x + m * depth + k) : _mm512_setzero_ps();
        for (int p = 0; p < kPlanes; ++p) {
          const __m256bh part = _mm512_cvtneps_pbh(rest);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * kValues), (__m256i)part);
          rest = _mm512_sub_ps(rest, widen(part));
        }
      }
    }
  });
}

// A job's columns: its 32 rows of x (three planes) are read again from cache for each 32 of
// them rather than fetched anew by another job (fp32 prefill 6 - 7 % faster than 32).
constexpr int64_t kSpan = 128;

// Rows of x split into tiles at a time (a multiple of 32).
constexpr int64_t kChunkRows = 1024;

template <int RB, int CB>
inline void init_outputs(const float* bias) {
  // With a bias, each output row starts as it (a load with stride 0).
  if (bias) {
    _tile_loadd(0, bias, 0);
    if constexpr (CB > 1) _tile_loadd(1, bias + kColumns, 0);
    if constexpr (RB > 1) _tile_loadd(2, bias, 0);
    if constexpr (RB > 1 && CB > 1) _tile_loadd(3, bias + kColumns, 0);
  } else {
    tiles::zero_outputs<RB, CB>();
  }
}

// One job: RB 16-row blocks of x by CB 16-column blocks of W, over all of K. x and w point
// at their first block's tiles; `block_stride` steps to the next block's (x's and W's alike).
template <int RB, int CB>
void tile_job(const at::BFloat16* x, const at::BFloat16* w, int64_t block_stride, int64_t depth, const float* bias,
              float* out, int64_t ldo, bool from_memory) {
  init_outputs<RB, CB>(bias);
  const at::BFloat16 *hi = x, *mid = x + kValues, *lo = x + 2 * kValues;
  const at::BFloat16 *w_hi = w, *w_mid = w + kValues, *w_lo = w + 2 * kValues;
  for (int64_t k = 0; k < depth; k += kDepth) {
    const int64_t at = (k / kDepth) * kPlanes * kValues;
    // The next step's weight tiles, for a job that streams them from memory (the first row
    // job of its columns; the others find them in L2): decode-sized linears 10 - 20 % faster.
    if (from_memory && k + kDepth < depth) {
      for (int c = 0; c < CB; ++c) prefetch(w + c * block_stride + at + kPlanes * kValues, kPlanes * kValues * sizeof(at::BFloat16));
    }
    // hi.lo, hi.mid, hi.hi, mid.hi, mid.mid, lo.hi: each x and weight tile loaded once or twice.
    tiles::load_x<RB>(hi + at, block_stride, 64);
    tiles::load_w<CB>(w_lo + at, block_stride, 64);
    tiles::multiply<RB, CB>();
    tiles::load_w<CB>(w_mid + at, block_stride, 64);
    tiles::multiply<RB, CB>();
    tiles::load_w<CB>(w_hi + at, block_stride, 64);
    tiles::multiply<RB, CB>();
    tiles::load_x<RB>(mid + at, block_stride, 64);
    tiles::multiply<RB, CB>();
    tiles::load_w<CB>(w_mid + at, block_stride, 64);
    tiles::multiply<RB, CB>();
    tiles::load_x<RB>(lo + at, block_stride, 64);
    tiles::load_w<CB>(w_hi + at, block_stride, 64);
    tiles::multiply<RB, CB>();
  }
  tiles::store_outputs<RB, CB>(out, ldo);
}
#endif

}  // namespace

bool has_tile_linear() { return tiles::available(); }

// weight [N, K] fp32 (N a multiple of 16, K of 32) -> [N / 16, K / 32, 3, 16, 16, 2] bf16:
// hi, mid and lo, each rounded to nearest, so that weight == hi + mid + lo exactly.
at::Tensor pack_tile_linear(at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "weight must be fp32 [N, K]");
  const int64_t columns = weight.size(0), depth = weight.size(1);
  TORCH_CHECK(columns % kColumns == 0, "out-features must be a multiple of 16 for the tile kernel");
  TORCH_CHECK(depth % kDepth == 0, "in-features must be a multiple of 32 for the tile kernel");
  at::Tensor rest = weight.contiguous();
  std::vector<at::Tensor> parts;
  for (int p = 0; p < kPlanes; ++p) {
    parts.push_back(rest.to(at::kBFloat16));
    rest = rest - parts.back().to(at::kFloat);
  }
  return at::stack(parts)
      .view({kPlanes, columns / kColumns, kColumns, depth / kDepth, kDepth / 2, 2})
      .permute({1, 3, 0, 4, 2, 5})
      .contiguous();
}

// x [M, K] fp32 contiguous, packed from pack_tile_linear, bias [N] fp32 or undefined.
at::Tensor tile_linear(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() && packed.dim() == 6 &&
                  packed.size(2) == kPlanes,
              "packed weight must come from pack_tile_linear");
  const int64_t rows = x.size(0), depth = x.size(1), blocks = packed.size(0), columns = blocks * kColumns;
  TORCH_CHECK(packed.size(1) * kDepth == depth, "packed weight's in-features do not match x");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == columns,
                "bias must be contiguous fp32 [N]");
    bias_ptr = bias->data_ptr<float>();
  }
#if defined(EXPERTMESH_AMX)
  TORCH_CHECK(tiles::os_grants(), "tile_linear needs AMX, which this CPU or OS does not grant");
  const int64_t padded = (rows + tiles::kJobRows - 1) / tiles::kJobRows * tiles::kJobRows;
  const int64_t block_stride = depth / kDepth * kPlanes * kValues;  // one row or column block's tiles
  // x is split kChunkRows rows at a time into one buffer, reused: split whole, 4096 rows of a
  // 1536-input x are 38 MB, which the allocator maps afresh (page faults) every call.
  const int64_t chunk = std::min(padded, kChunkRows);
  auto split = at::empty({chunk / kRows * block_stride}, x.options().dtype(at::kBFloat16));
  // Whole output tiles go straight to y; a last, partial one goes to the padded rows.
  auto y = at::empty({padded, columns}, x.options());
  const at::BFloat16* xs = split.data_ptr<at::BFloat16>();
  const at::BFloat16* w = packed.data_ptr<at::BFloat16>();
  for (int64_t start = 0; start < padded; start += chunk) {
    const int64_t chunk_rows = std::min(chunk, padded - start), real_rows = std::min(rows - start, chunk_rows);
    split_rows(x.data_ptr<float>() + start * depth, real_rows, chunk_rows, depth, split.data_ptr<at::BFloat16>());
    const int64_t row_jobs = chunk_rows / tiles::kJobRows, column_jobs = (columns + kSpan - 1) / kSpan;
    float* out = y.data_ptr<float>() + start * columns;
    // Column-span major: a thread's consecutive jobs read the same weights (from L2).
    tiles::parallel_jobs(column_jobs * row_jobs, [&](int64_t job) {
      const int64_t first_row = (job % row_jobs) * tiles::kJobRows, span_end = std::min(columns, (job / row_jobs + 1) * kSpan);
      const at::BFloat16* xj = xs + first_row / kRows * block_stride;
      for (int64_t first_column = (job / row_jobs) * kSpan; first_column < span_end; first_column += tiles::kJobColumns) {
        const bool two_rows = real_rows - first_row > kRows, two_columns = columns - first_column > kColumns;
        const at::BFloat16* wj = w + first_column / kColumns * block_stride;
        const float* bj = bias_ptr ? bias_ptr + first_column : nullptr;
        float* oj = out + first_row * columns + first_column;
        tiles::with_blocks(two_rows, two_columns, [&]<int RB, int CB>() {
          tile_job<RB, CB>(xj, wj, block_stride, depth, bj, oj, columns, first_row == 0);
        });
      }
    });
  }
  return padded == rows ? y : y.narrow(0, 0, rows);
#else
  TORCH_CHECK(false, "tile_linear needs a CPU with AMX-BF16 (this build has none)");
#endif
}

}  // namespace expertmesh
