// The CPU's tile unit (AMX): what the kernels built on it share.
//
// A tile is 16 rows of 64 bytes; TDPBF16PS multiplies a 16 x 32 bf16 tile of x by a 16 x 16
// tile of weight pairs (16 input pairs x 16 columns x 2, "pair order") into a 16 x 16 fp32
// tile. Here every kernel keeps 2 x 2 output tiles (0-3: row block r, column block c at
// 2r + c), 2 x tiles (4-5) and 2 weight tiles (6-7).
#pragma once

#include "simd.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define EXPERTMESH_AMX 1
#endif

#include <vector>

namespace expertmesh::tiles {

constexpr int kRows = 16;     // rows of an x tile and of an output tile
constexpr int kDepth = 32;    // inputs per x-tile row: 32 bf16, 64 bytes
constexpr int kColumns = 16;  // fp32 outputs per output-tile row
constexpr int64_t kValues = kRows * kDepth;  // bf16 values in an x or weight tile (1 KB)
constexpr int kBlocks = 2;    // 2 x 2 output tiles at a time
constexpr int64_t kJobRows = kBlocks * kRows, kJobColumns = kBlocks * kColumns;

#if defined(EXPERTMESH_AMX)
// Linux hands out the tile registers' 8 KB of state only to a process that asks for it.
inline bool os_grants() {
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  static const bool granted = syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return granted;
}

struct alignas(64) Config {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// fn(job) for jobs [0, n), handed out one at a time to the intra-op threads. The tile
// configuration is per thread, and other code (oneDNN) loads its own, so each worker loads
// ours when it starts and releases it at the end.
template <typename F>
void parallel_jobs(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Config config;
    for (int t = 0; t < 8; ++t) {
      config.bytes_per_row[t] = 64;
      config.rows[t] = kRows;
    }
    _tile_loadconfig(&config);
    for (int64_t job = next.fetch_add(1); job < n; job = next.fetch_add(1)) fn(job);
    _tile_release();
  });
}

// Outputs += x tiles . weight tiles, as four independent products: a product waits about
// three products' time for the one before it on the same output tile.
template <int RB, int CB>
inline void multiply() {
  _tile_dpbf16ps(0, 4, 6);
  if constexpr (CB > 1) _tile_dpbf16ps(1, 4, 7);
  if constexpr (RB > 1) _tile_dpbf16ps(2, 5, 6);
  if constexpr (RB > 1 && CB > 1) _tile_dpbf16ps(3, 5, 7);
}

// x tiles of RB row blocks: the first at x, the next `next` values on; rows `stride` bytes apart.
template <int RB>
inline void load_x(const at::BFloat16* x, int64_t next, int64_t stride) {
  _tile_loadd(4, x, stride);
  if constexpr (RB > 1) _tile_loadd(5, x + next, stride);
}

template <int CB>
inline void load_w(const at::BFloat16* w, int64_t next, int64_t stride) {
  _tile_loadd(6, w, stride);
  if constexpr (CB > 1) _tile_loadd(7, w + next, stride);
}

template <int RB, int CB>
inline void zero_outputs() {
  _tile_zero(0);
  if constexpr (CB > 1) _tile_zero(1);
  if constexpr (RB > 1) _tile_zero(2);
  if constexpr (RB > 1 && CB > 1) _tile_zero(3);
}

// Output tile (r, c) at out + r * 16 rows + c * 16 columns, rows `ldo` floats apart.
template <int RB, int CB>
inline void store_outputs(float* out, int64_t ldo) {
  _tile_stored(0, out, ldo * 4);
  if constexpr (CB > 1) _tile_stored(1, out + kColumns, ldo * 4);
  if constexpr (RB > 1) _tile_stored(2, out + kRows * ldo, ldo * 4);
  if constexpr (RB > 1 && CB > 1) _tile_stored(3, out + kRows * ldo + kColumns, ldo * 4);
}

// Calls fn.template operator()<RB, CB>() for RB, CB in {1, 2}: a job's last row or column block
// may be alone.
template <typename F>
inline void with_blocks(bool two_rows, bool two_columns, const F& fn) {
  if (two_rows && two_columns) fn.template operator()<2, 2>();
  else if (two_rows) fn.template operator()<2, 1>();
  else if (two_columns) fn.template operator()<1, 2>();
  else fn.template operator()<1, 1>();
}
#endif

// Whether this build and this process can use the tile unit.
inline bool available() {
#if defined(EXPERTMESH_AMX)
  return os_grants();
#else
  return false;
#endif
}

// x [rows, depth] bf16 with 32 rows of zeros after it, so that a job's last tiles read rows
// that exist (they give rows of output nobody stores).
inline at::Tensor padded_rows(const at::Tensor& x) {
  auto padded = at::zeros({x.size(0) + kJobRows, x.size(1)}, x.options().dtype(at::kBFloat16));
  padded.narrow(0, 0, x.size(0)).copy_(x);
  return padded;
}

// x [rows, depth] bf16 (contiguous) as the tile kernels may read it. A job reads whole 16-row
// tiles, so where its last tile is partial (`overreads`) it reads up to 15 rows past x's last.
// x itself where it does not, or where x's storage holds those rows (moe_dispatch leaves them);
// else padded_rows(x). A prefill step's linears (1024 rows) skip the copy.
inline at::Tensor readable_rows(const at::Tensor& x, bool overreads) {
  const int64_t spare = static_cast<int64_t>(x.storage().nbytes()) / x.element_size() - x.storage_offset() - x.numel();
  return overreads && spare < (kRows - 1) * x.size(1) ? padded_rows(x) : x;
}

}  // namespace expertmesh::tiles

namespace expertmesh {

// bf16 on the tile unit (amx_bf16_cpu.cpp), for packed_linear and fused_experts to call where
// tiles::available(); x must come from tiles::readable_rows, act have 32 spare rows.
//  - y [rows, columns] = x [rows, depth] . W + bias, W pair-packed as pack_linear does it
//    ([N / width, K / 2, width, 2]), y rounded once to bf16;
//  - the fused experts' two phases on pack_experts' pair layouts (see moe_cpu.cpp), the
//    outputs stored to out_bf16 (rounded once) where it is given, else to out.
void tile_linear_bf16(const at::BFloat16* x, int64_t rows, int64_t depth, const at::BFloat16* packed,
                      int64_t columns, int64_t width, const at::BFloat16* bias, at::BFloat16* y);
void tile_experts_bf16(const at::BFloat16* x, const std::vector<int64_t>& offsets, const at::BFloat16* gate_up,
                       const at::BFloat16* down, const float* row_weight, int64_t hidden, int64_t inter,
                       int64_t up_width, int64_t down_width, at::BFloat16* act, float* out,
                       at::BFloat16* out_bf16);

}  // namespace expertmesh
