// bf16 linears and experts on the tile unit (AMX), reading the pair-packed weights that
// pack_linear and pack_experts make for the bf16 dot product: a 16-column slice of a block
// of `width` columns is a weight tile whose rows (input pairs) are 4 * width bytes apart.
// Accumulation is fp32, as on the dot-product path, and each result is rounded where that
// path rounds it: a linear's output once, an expert's SwiGLU activations once.

#include "tiles.h"

namespace expertmesh {

#if defined(EXPERTMESH_AMX)
namespace {

using tiles::kColumns;
using tiles::kDepth;
using tiles::kJobColumns;
using tiles::kJobRows;
using tiles::kRows;

// A weight in pair order, [blocks of `width` columns, depth / 2 pairs, width, 2]: where the
// tile of columns [column, column + 16) and inputs [k, k + 32) starts, and its row stride.
struct PairWeights {
  const at::BFloat16* data;
  int64_t depth, width;

  const at::BFloat16* tile(int64_t column, int64_t k) const {
    return data + (column / width) * depth * width + k * width + (column % width) * 2;
  }
  int64_t stride() const { return 4 * width; }  // bytes from one input pair to the next
};

// Ask for the whole rows of the 16 input pairs after step k of the block holding `column`
// (every column of it): one contiguous run, a 4 KB page for a 32-column block, which the
// hardware prefetchers do not run into. Always inlined, as `prefetch` is (see simd.h).
__attribute__((always_inline)) inline void prefetch_next_step(const PairWeights& w, int64_t column, int64_t k) {
  if (k + kDepth < w.depth) prefetch(w.tile(column - column % w.width, k + kDepth), kDepth / 2 * w.stride());
}

// out (fp32, rows `ldo` apart, 2 x 2 tiles) = x rows (bf16, `ldx` apart) . w, over all of depth.
template <int RB, int CB>
void product(const at::BFloat16* x, int64_t ldx, const PairWeights& w, int64_t column, int64_t next_column,
             bool from_memory, float* out, int64_t ldo) {
  tiles::zero_outputs<RB, CB>();
  for (int64_t k = 0; k < w.depth; k += kDepth) {
    // Weights read by this job alone (decode sizes) come from memory: ask for the next step's
    // ahead (bf16 experts at 4 rows each: 16 GB/s without, 18-19 with). Where several jobs share
    // a block, they find it in cache.
    if (from_memory) prefetch_next_step(w, column, k);
    tiles::load_x<RB>(x + k, kRows * ldx, ldx * 2);
    tiles::load_w<CB>(w.tile(column, k), w.tile(next_column, k) - w.tile(column, k), w.stride());
    tiles::multiply<RB, CB>();
  }
  tiles::store_outputs<RB, CB>(out, ldo);
}

// Up to 16 rows (decode sizes) against a whole 64-column block, its four 16-column tiles in one
// walk down the block: each input pair's 256-byte row is used whole as it arrives. Taken in two
// 32-column slices, the first walk fetched the block from memory and the second re-read it from
// cache, with no memory traffic of its own, so one walk is faster at decode sizes. Tile 5, an x
// tile elsewhere, holds a weight tile here. out: 16 rows of 64 fp32.
void block_product(const at::BFloat16* x, int64_t ldx, const PairWeights& w, int64_t block_column, float* out,
                   int64_t ldo) {
  tiles::zero_outputs<2, 2>();
  for (int64_t k = 0; k < w.depth; k += kDepth) {
    prefetch_next_step(w, block_column, k);
    _tile_loadd(4, x + k, ldx * 2);
    _tile_loadd(6, w.tile(block_column, k), w.stride());
    _tile_loadd(7, w.tile(block_column + kColumns, k), w.stride());
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, w.tile(block_column + 2 * kColumns, k), w.stride());
    _tile_loadd(6, w.tile(block_column + 3 * kColumns, k), w.stride());
    _tile_dpbf16ps(2, 4, 5);
    _tile_dpbf16ps(3, 4, 6);
  }
  _tile_stored(0, out, ldo * 4);
  _tile_stored(1, out + kColumns, ldo * 4);
  _tile_stored(2, out + 2 * kColumns, ldo * 4);
  _tile_stored(3, out + 3 * kColumns, ldo * 4);
}

constexpr int64_t kBlockColumns = 4 * kColumns;  // what block_product takes

// A job: rows (up to 32, or an expert's up to kExpertJobRows, 32 at a time) against a span of
// weight columns (one block of `width`, or several), its 32-column (or 16-column) slices one
// after the other. Two slices share every cache line
// of a block's input-pair rows, so one thread reads each line once; jobs go span-major, so a
// thread's consecutive jobs read the same weights.
struct Job {
  int64_t expert;  // whose weights (0 for a linear)
  int64_t first_row, rows, column, span;  // columns [column, column + span)
  bool alone;  // the only job on its weight block: its weights come from memory
  bool leads;  // the first job on its blocks (their first rows): they come from memory to its first 32
};

// Where more than one job reads each weight block (more than 32 rows), a job takes the
// blocks of up to this many columns: its x rows stay in L1 while the weights stream past,
// instead of being read again for every block (bf16 at 1024 rows: 1.1 - 1.4 TFLOP/s with a
// block a job, 1.9 - 2.0 with 512 columns).
constexpr int64_t kWideSpan = 512;

// An expert's job takes up to this many of its rows, 32 at a time, so that the thread that
// fetches a span of the expert's weights from memory also uses them from its own cache for the
// next rows, while the other thread does the same with another expert's: prefill with experts
// of about 128 rows 4 - 5 % faster than 32-row jobs, which pulled each span into both cores.
constexpr int64_t kExpertJobRows = 256;

// Jobs of up to `group` rows (in 32-row blocks) by spans of columns.
void add_jobs(int64_t expert, int64_t first_row, int64_t rows, int64_t columns, int64_t width,
              std::vector<Job>& jobs, int64_t group = kJobRows) {
  const bool alone = rows <= kJobRows;
  const int64_t span = alone ? width : std::max(width, kWideSpan / width * width);
  for (int64_t c = 0; c < columns; c += span)
    for (int64_t r = 0; r < rows; r += group)
      jobs.push_back({expert, first_row + r, std::min(group, rows - r), c, std::min(span, columns - c), alone, r == 0});
}

// fn(block, column) for each block of up to 32 of the job's rows (a job of its own) and each
// slice of `slice` columns (16 or 32) at `column`.
template <typename F>
void over_slices(const Job& job, int64_t slice, const F& fn) {
  for (int64_t r = 0; r < job.rows; r += kJobRows) {
    Job block = job;
    block.first_row += r;
    block.rows = std::min(kJobRows, job.rows - r);
    block.leads = job.leads && r == 0;
    for (int64_t column = job.column; column < job.column + job.span; column += slice) fn(block, column);
  }
}

int64_t slice_of(int64_t width) { return width >= kJobColumns ? kJobColumns : kColumns; }

// The job's rows of x . w for the slice at `column`, and for `second` (the next 16 columns, or
// any other 16) when the slice is 32 wide, into acc.
void slice_product(const Job& job, const at::BFloat16* x, int64_t ldx, const PairWeights& w, int64_t column,
                   int64_t second, bool two_columns, float (&acc)[kJobRows][kJobColumns]) {
  tiles::with_blocks(job.rows > kRows, two_columns, [&]<int RB, int CB>() {
    // The first job on a block takes it from memory (the others find it in cache): its first
    // slice asks for the block's rows ahead as a lone job does (prefill 5 % faster).
    const bool from_memory = job.alone || (job.leads && column % w.width == 0);
    product<RB, CB>(x + job.first_row * ldx, ldx, w, column, second, from_memory, &acc[0][0], kJobColumns);
  });
}

}  // namespace

void tile_linear_bf16(const at::BFloat16* x, int64_t rows, int64_t depth, const at::BFloat16* packed,
                      int64_t columns, int64_t width, const at::BFloat16* bias, at::BFloat16* y) {
  std::vector<Job> jobs;
  add_jobs(0, 0, rows, columns, width, jobs);
  const PairWeights w{packed, depth, width};
  const int64_t slice = slice_of(width);
  tiles::parallel_jobs(static_cast<int64_t>(jobs.size()), [&](int64_t j) {
    over_slices(jobs[j], slice, [&](const Job& job, int64_t column) {
      alignas(64) float acc[kJobRows][kJobColumns];
      slice_product(job, x, depth, w, column, column + kColumns, slice > kColumns, acc);
      for (int64_t m = 0; m < job.rows; ++m)
        for (int64_t c = 0; c < slice; c += kLanes)
          store(y + (job.first_row + m) * columns + column + c,
                load(&acc[m][c]) + (bias ? load(bias + column + c) : vec{}));
    });
  });
}

// Phase 1 takes each 16 gate columns with the same 16 up columns as one 32-column slice, so
// silu(gate) * up comes from its output tiles; phase 2 is a linear per expert whose outputs
// are scaled by each row's routing weight.
void tile_experts_bf16(const at::BFloat16* x, const std::vector<int64_t>& offsets, const at::BFloat16* gate_up,
                       const at::BFloat16* down, const float* row_weight, int64_t hidden, int64_t inter,
                       int64_t up_width, int64_t down_width, at::BFloat16* act, float* out,
                       at::BFloat16* out_bf16) {
  const int64_t experts = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<Job> up_jobs, down_jobs;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    add_jobs(e, offsets[e], rows, inter, up_width, up_jobs, kExpertJobRows);  // intermediate columns: gate and up alike
    add_jobs(e, offsets[e], rows, hidden, down_width, down_jobs, kExpertJobRows);
  }
  // act rows [first, first + rows), intermediate columns [column, column + width) = silu(gate) * up,
  // from fp32 rows `ld` apart holding `width` gate values and then their `width` up values.
  auto store_act = [&](int64_t first, int64_t rows, int64_t column, int64_t width, const float* acc, int64_t ld) {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t c = 0; c < width; c += kLanes)
        store(act + (first + m) * inter + column + c, silu(load(acc + m * ld + c)) * load(acc + m * ld + width + c));
  };
  // The down products of rows [first, first + rows), output columns [column, column + width), scaled
  // by each row's routing weight into out_bf16 (rounded once) or out.
  auto store_out = [&](int64_t first, int64_t rows, int64_t column, int64_t width, const float* acc, int64_t ld) {
    for (int64_t m = 0; m < rows; ++m) {
      const vec scale = broadcast(row_weight[first + m]);
      const int64_t at = (first + m) * hidden + column;
      for (int64_t c = 0; c < width; c += kLanes) {
        if (out_bf16) store(out_bf16 + at + c, load(acc + m * ld + c) * scale);
        else store(out + at + c, load(acc + m * ld + c) * scale);
      }
    }
  };
  tiles::parallel_jobs(static_cast<int64_t>(up_jobs.size()), [&](int64_t j) {
    const Job& whole = up_jobs[j];
    // gate_up [E, I / U, H / 2, 2, U, 2]: per input pair, U gate columns then their U up columns,
    // so as a pair-ordered weight it is blocks of 2U columns, intermediate column i's gate at
    // 2U (i / U) + i % U and its up U further.
    const PairWeights w{gate_up + whole.expert * hidden * 2 * inter, hidden, 2 * up_width};
    if (whole.rows <= kRows && whole.span == up_width && 2 * up_width == kBlockColumns) {  // one walk: gate, up of 2 x 16 columns
      alignas(64) float acc[kRows][kBlockColumns];  // per row: 32 gate values, then their 32 up values
      block_product(x + whole.first_row * hidden, hidden, w, 2 * whole.column, &acc[0][0], kBlockColumns);
      store_act(whole.first_row, whole.rows, whole.column, up_width, &acc[0][0], kBlockColumns);
      return;
    }
    over_slices(whole, kColumns, [&](const Job& job, int64_t column) {
      const int64_t gate = column / up_width * 2 * up_width + column % up_width;
      alignas(64) float acc[kJobRows][kJobColumns];  // per row: 16 gate values, then their 16 up values
      slice_product(job, x, hidden, w, gate, gate + up_width, true, acc);
      store_act(job.first_row, job.rows, column, kColumns, &acc[0][0], kJobColumns);
    });
  });
  const int64_t slice = slice_of(down_width);
  tiles::parallel_jobs(static_cast<int64_t>(down_jobs.size()), [&](int64_t j) {
    const Job& whole = down_jobs[j];
    const PairWeights w{down + whole.expert * inter * hidden, inter, down_width};
    if (whole.rows <= kRows && whole.span == down_width && down_width == kBlockColumns) {  // one walk down the block
      alignas(64) float acc[kRows][kBlockColumns];
      block_product(act + whole.first_row * inter, inter, w, whole.column, &acc[0][0], kBlockColumns);
      store_out(whole.first_row, whole.rows, whole.column, kBlockColumns, &acc[0][0], kBlockColumns);
      return;
    }
    over_slices(whole, slice, [&](const Job& job, int64_t column) {
      alignas(64) float acc[kJobRows][kJobColumns];
      slice_product(job, act, inter, w, column, column + kColumns, slice > kColumns, acc);
      store_out(job.first_row, job.rows, column, slice, &acc[0][0], kJobColumns);
    });
  });
}

#else
void tile_linear_bf16(const at::BFloat16*, int64_t, int64_t, const at::BFloat16*, int64_t, int64_t,
                      const at::BFloat16*, at::BFloat16*) {
  TORCH_CHECK(false, "bf16 tile kernels need a CPU with AMX-BF16 (this build has none)");
}
void tile_experts_bf16(const at::BFloat16*, const std::vector<int64_t>&, const at::BFloat16*, const at::BFloat16*,
                       const float*, int64_t, int64_t, int64_t, int64_t, at::BFloat16*, float*, at::BFloat16*) {
  TORCH_CHECK(false, "bf16 tile kernels need a CPU with AMX-BF16 (this build has none)");
}
#endif

}  // namespace expertmesh
