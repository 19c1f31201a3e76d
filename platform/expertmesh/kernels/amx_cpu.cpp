// fp32 linears on the CPU's tile unit (AMX), with fp32's accuracy.
//
// AMX multiplies bf16 only, about 20x faster than fp32 FMAs here. Every fp32 value is
// exactly the sum of three bf16 values (hi + mid + lo: 8 significand bits each, rounded to
// nearest), so x . w is the sum of nine bf16 products. The six whose weight is at least
// 2^-16 of the leading one (hi.hi, hi.mid, mid.hi, hi.lo, mid.mid, lo.hi) are accumulated in
// fp32 by the tile unit; the three left out are below 2^-24 of it, fp32's own rounding
// ("bf16x6", Henry, Tang and Heinecke, ARITH 2019). Tests check the error against an fp64
// reference is that of torch's fp32 matmul.
//
// Weights are split and packed once, at load, as [N / 16, K / 32, 3, 16, 16, 2]: for each
// block of 16 output columns and 32 inputs, the hi, mid and lo tiles (16 input pairs x 16
// columns x 2, the layout the tile unit reads B in), one 3 KB stream per column block.
// Activations are split per call into three bf16 copies of x, row-padded to 16.

#include "simd.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define EXPERTMESH_AMX 1
#endif

namespace expertmesh {

namespace {

constexpr int kPlanes = 3;        // hi, mid, lo
constexpr int kTileRows = 16;     // rows of an x tile and of an output tile
constexpr int kTileDepth = 32;    // inputs per tile row: 32 bf16, 64 bytes
constexpr int kTileColumns = 16;  // fp32 outputs per output-tile row
constexpr int64_t kTileValues = kTileRows * kTileDepth;  // bf16 values in an x or weight tile (1 KB)
constexpr int kBlocksPerJob = 2;  // a job: 2 x 2 output tiles, 2 x tiles and 2 weight tiles (all 8)

#if defined(EXPERTMESH_AMX)
// Linux hands out the tile registers' 8 KB of state only to a process that asks for it.
bool os_grants_tiles() {
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  static const bool granted = syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows of 64 bytes. The configuration is per thread, and other code (oneDNN)
// loads its own, so each parallel worker loads ours when it starts and releases it at the end.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = kTileRows;
  }
  _tile_loadconfig(&config);
}

template <typename F>
void tile_for(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    configure_tiles();
    for (int64_t job = next.fetch_add(1); job < n; job = next.fetch_add(1)) fn(job);
    _tile_release();
  });
}

inline __m512 widen(__m256bh h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}

// x [rows, depth] -> [padded / 16, depth / 32, 3, 16, 32] bf16: for each 16-row block and 32
// inputs, the hi, mid and lo tiles (x == hi + mid + lo exactly), 1 KB each; rows past `rows`
// are zero.
void split_rows(const float* x, int64_t rows, int64_t padded, int64_t depth, at::BFloat16* tiles) {
  const int64_t depth_blocks = depth / kTileDepth;
  at::parallel_for(0, padded, kTileRows, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      at::BFloat16* row = tiles + (m / kTileRows) * depth_blocks * kPlanes * kTileValues + (m % kTileRows) * kTileDepth;
      for (int64_t k = 0; k < depth; k += kLanes) {
        at::BFloat16* out = row + (k / kTileDepth) * kPlanes * kTileValues + k % kTileDepth;
        __m512 rest = m < rows ? _mm512_loadu_ps(x + m * depth + k) : _mm512_setzero_ps();
        for (int p = 0; p < kPlanes; ++p) {
          const __m256bh part = _mm512_cvtneps_pbh(rest);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * kTileValues), (__m256i)part);
          rest = _mm512_sub_ps(rest, widen(part));
        }
      }
    }
  });
}

// Tiles: 0-3 outputs (row block r, column block c at 2r + c), 4-5 x (row blocks), 6-7
// weights (column blocks). A dependent tile product waits about three products' time for
// the one before, so each term is four independent products, one per output tile.
template <int RB, int CB>
inline void multiply_tiles() {
  _tile_dpbf16ps(0, 4, 6);
  if constexpr (CB > 1) _tile_dpbf16ps(1, 4, 7);
  if constexpr (RB > 1) _tile_dpbf16ps(2, 5, 6);
  if constexpr (RB > 1 && CB > 1) _tile_dpbf16ps(3, 5, 7);
}

template <int RB>
inline void load_x(const at::BFloat16* x, int64_t block_stride) {
  _tile_loadd(4, x, 64);
  if constexpr (RB > 1) _tile_loadd(5, x + block_stride, 64);
}

template <int CB>
inline void load_w(const at::BFloat16* w, int64_t block_stride) {
  _tile_loadd(6, w, 64);
  if constexpr (CB > 1) _tile_loadd(7, w + block_stride, 64);
}

template <int RB, int CB>
inline void init_outputs(const float* bias) {
  // With a bias, each output row starts as it (a load with stride 0).
  if (bias) {
    _tile_loadd(0, bias, 0);
    if constexpr (CB > 1) _tile_loadd(1, bias + kTileColumns, 0);
    if constexpr (RB > 1) _tile_loadd(2, bias, 0);
    if constexpr (RB > 1 && CB > 1) _tile_loadd(3, bias + kTileColumns, 0);
  } else {
    _tile_zero(0);
    if constexpr (CB > 1) _tile_zero(1);
    if constexpr (RB > 1) _tile_zero(2);
    if constexpr (RB > 1 && CB > 1) _tile_zero(3);
  }
}

template <int RB, int CB>
inline void store_outputs(float* out, int64_t ldo) {
  _tile_stored(0, out, ldo * 4);
  if constexpr (CB > 1) _tile_stored(1, out + kTileColumns, ldo * 4);
  if constexpr (RB > 1) _tile_stored(2, out + kTileRows * ldo, ldo * 4);
  if constexpr (RB > 1 && CB > 1) _tile_stored(3, out + kTileRows * ldo + kTileColumns, ldo * 4);
}

// One job: RB 16-row blocks of x by CB 16-column blocks of W, over all of K. x and w point
// at their first block's tiles; `block_stride` and `w_stride` step to the next block's.
template <int RB, int CB>
void tile_job(const at::BFloat16* x, int64_t block_stride, const at::BFloat16* w, int64_t w_stride, int64_t depth,
              const float* bias, float* out, int64_t ldo) {
  init_outputs<RB, CB>(bias);
  const at::BFloat16 *hi = x, *mid = x + kTileValues, *lo = x + 2 * kTileValues;
  const at::BFloat16 *w_hi = w, *w_mid = w + kTileValues, *w_lo = w + 2 * kTileValues;
  for (int64_t k = 0; k < depth; k += kTileDepth) {
    const int64_t at = (k / kTileDepth) * kPlanes * kTileValues;
    // hi.lo, hi.mid, hi.hi, mid.hi, mid.mid, lo.hi: each x and weight tile loaded once or twice.
    load_x<RB>(hi + at, block_stride);
    load_w<CB>(w_lo + at, w_stride);
    multiply_tiles<RB, CB>();
    load_w<CB>(w_mid + at, w_stride);
    multiply_tiles<RB, CB>();
    load_w<CB>(w_hi + at, w_stride);
    multiply_tiles<RB, CB>();
    load_x<RB>(mid + at, block_stride);
    multiply_tiles<RB, CB>();
    load_w<CB>(w_mid + at, w_stride);
    multiply_tiles<RB, CB>();
    load_x<RB>(lo + at, block_stride);
    load_w<CB>(w_hi + at, w_stride);
    multiply_tiles<RB, CB>();
  }
  store_outputs<RB, CB>(out, ldo);
}
#endif

}  // namespace

bool has_tile_linear() {
#if defined(EXPERTMESH_AMX)
  return os_grants_tiles();
#else
  return false;
#endif
}

// weight [N, K] fp32 (N a multiple of 16, K of 32) -> [N / 16, K / 32, 3, 16, 16, 2] bf16:
// hi, mid and lo, each rounded to nearest, so that weight == hi + mid + lo exactly.
at::Tensor pack_tile_linear(at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "weight must be fp32 [N, K]");
  const int64_t columns = weight.size(0), depth = weight.size(1);
  TORCH_CHECK(columns % kTileColumns == 0, "out-features must be a multiple of 16 for the tile kernel");
  TORCH_CHECK(depth % kTileDepth == 0, "in-features must be a multiple of 32 for the tile kernel");
  at::Tensor rest = weight.contiguous();
  std::vector<at::Tensor> parts;
  for (int p = 0; p < kPlanes; ++p) {
    parts.push_back(rest.to(at::kBFloat16));
    rest = rest - parts.back().to(at::kFloat);
  }
  return at::stack(parts)
      .view({kPlanes, columns / kTileColumns, kTileColumns, depth / kTileDepth, kTileDepth / 2, 2})
      .permute({1, 3, 0, 4, 2, 5})
      .contiguous();
}

// x [M, K] fp32 contiguous, packed from pack_tile_linear, bias [N] fp32 or undefined.
at::Tensor tile_linear(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() && packed.dim() == 6 &&
                  packed.size(2) == kPlanes,
              "packed weight must come from pack_tile_linear");
  const int64_t rows = x.size(0), depth = x.size(1), blocks = packed.size(0), columns = blocks * kTileColumns;
  TORCH_CHECK(packed.size(1) * kTileDepth == depth, "packed weight's in-features do not match x");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == columns,
                "bias must be contiguous fp32 [N]");
    bias_ptr = bias->data_ptr<float>();
  }
#if defined(EXPERTMESH_AMX)
  TORCH_CHECK(os_grants_tiles(), "tile_linear needs AMX, which this CPU or OS does not grant");
  const int64_t job_rows = kBlocksPerJob * kTileRows, job_columns = kBlocksPerJob * kTileColumns;
  const int64_t padded = (rows + job_rows - 1) / job_rows * job_rows;
  const int64_t block_stride = depth / kTileDepth * kPlanes * kTileValues;  // one row or column block's tiles
  auto split = at::empty({padded / kTileRows * block_stride}, x.options().dtype(at::kBFloat16));
  split_rows(x.data_ptr<float>(), rows, padded, depth, split.data_ptr<at::BFloat16>());
  // Whole output tiles go straight to y; a last, partial one goes to the padded rows.
  auto y = at::empty({padded, columns}, x.options());
  const int64_t row_jobs = padded / job_rows, column_jobs = (columns + job_columns - 1) / job_columns;
  const at::BFloat16* xs = split.data_ptr<at::BFloat16>();
  const at::BFloat16* w = packed.data_ptr<at::BFloat16>();
  float* out = y.data_ptr<float>();
  // Column-block major: a thread's consecutive jobs read the same weights (from L2).
  tile_for(column_jobs * row_jobs, [&](int64_t job) {
    const int64_t first_column = (job / row_jobs) * job_columns, first_row = (job % row_jobs) * job_rows;
    const bool two_rows = rows - first_row > kTileRows, two_columns = columns - first_column > kTileColumns;
    const at::BFloat16* xj = xs + first_row / kTileRows * block_stride;
    const at::BFloat16* wj = w + first_column / kTileColumns * block_stride;
    const float* bj = bias_ptr ? bias_ptr + first_column : nullptr;
    float* oj = out + first_row * columns + first_column;
    if (two_rows && two_columns) tile_job<2, 2>(xj, block_stride, wj, block_stride, depth, bj, oj, columns);
    else if (two_rows) tile_job<2, 1>(xj, block_stride, wj, block_stride, depth, bj, oj, columns);
    else if (two_columns) tile_job<1, 2>(xj, block_stride, wj, block_stride, depth, bj, oj, columns);
    else tile_job<1, 1>(xj, block_stride, wj, block_stride, depth, bj, oj, columns);
  });
  return padded == rows ? y : y.narrow(0, 0, rows);
#else
  TORCH_CHECK(false, "tile_linear needs a CPU with AMX-BF16 (this build has none)");
#endif
}

}  // namespace expertmesh
