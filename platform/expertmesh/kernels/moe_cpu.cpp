// Fused SwiGLU experts for small row counts on CPU (decode steps).
//
// A decode step routes a few rows to each expert, so the work is bound by reading
// every expert's weights once. Torch's paths either pad all experts to the widest
// one (batched matmul) or pay a call per expert; this kernel streams each expert's
// weights exactly once, keeps up to MT rows in registers, and splits the
// (expert, column block) tiles across torch's own intra-op threads.
//
// Written with GCC vector extensions over the ISA level's own vector width (simd.h);
// each phase's tile takes as many columns as the level's registers hold accumulators
// for: AVX-512 6 rows x 4 vectors, AVX2 6 rows x 2. bf16 weights are widened to fp32 on
// load, or multiplied in pairs where the CPU has bf16 dot products; accumulation is
// always fp32.

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"
#include "tiles.h"

namespace expertmesh {
namespace {

constexpr int kMaxRowTile = 6;  // rows kept in registers, times a tile's vectors of columns
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead a tile asks for its block's rows: a page

// Rows of a weight block `ldw` weights wide that span kPrefetchBytes (at least one).
template <typename W>
int64_t rows_ahead(int64_t ldw) {
  return std::max<int64_t>(1, kPrefetchBytes / (ldw * static_cast<int64_t>(sizeof(W))));
}

// act[m, j] = silu(x[m] . Wg[:, j]) * (x[m] . Wu[:, j]) for NV * kLanes columns j: row k of the
// block holds its gate columns at w + k * ldw and its up columns `up_offset` further.
template <int MT, int NV, typename W>
void gate_up_tile(const float* x, int64_t hidden, const W* w, int64_t ldw, int64_t up_offset, int64_t inter,
                  float* act) {
  vec gate[MT][NV] = {};
  vec up[MT][NV] = {};
  const int64_t ahead = rows_ahead<W>(ldw);
  for (int64_t k = 0; k < hidden; ++k) {
    const W* row = w + k * ldw;
    if (k + ahead < hidden) {
      prefetch(row + ahead * ldw, NV * kLanes * sizeof(W));
      prefetch(row + ahead * ldw + up_offset, NV * kLanes * sizeof(W));
    }
    vec wg[NV], wu[NV];
    for (int v = 0; v < NV; ++v) {
      wg[v] = load(row + v * kLanes);
      wu[v] = load(row + up_offset + v * kLanes);
    }
    for (int m = 0; m < MT; ++m) {
      vec xm = broadcast(x[m * hidden + k]);
      for (int v = 0; v < NV; ++v) {
        gate[m][v] += xm * wg[v];
        up[m][v] += xm * wu[v];
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < NV; ++v) store(act + m * inter + v * kLanes, silu(gate[m][v]) * up[m][v]);
}

// out[m, n] = weight[m] * (act[m] . Wd[:, n]) for NV * kLanes columns n; row k of the block at w + k * ldw.
template <int MT, int NV, typename W>
void down_tile(const float* act, int64_t inter, const W* w, int64_t ldw, int64_t hidden, const float* row_weight,
               float* out) {
  vec acc[MT][NV] = {};
  const int64_t ahead = rows_ahead<W>(ldw);
  for (int64_t k = 0; k < inter; ++k) {
    const W* row = w + k * ldw;
    if (k + ahead < inter) prefetch(row + ahead * ldw, NV * kLanes * sizeof(W));
    vec wd[NV];
    for (int v = 0; v < NV; ++v) wd[v] = load(row + v * kLanes);
    for (int m = 0; m < MT; ++m) {
      vec am = broadcast(act[m * inter + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] += am * wd[v];
    }
  }
  for (int m = 0; m < MT; ++m) {
    vec scale = broadcast(row_weight[m]);
    for (int v = 0; v < NV; ++v) store(out + m * hidden + v * kLanes, acc[m][v] * scale);
  }
}

#if defined(__AVX512BF16__)
// The same two phases on weights packed in k pairs (pack_experts' bf16 layout) with bf16
// rows: a job's block holds, per pair of inputs, its NV*16 gate columns and then its NV*16
// up columns (gate_up), or its NV*16 output columns (down), each column as a bf16 pair.
template <int MT, int NV>
void gate_up_pairs_tile(const at::BFloat16* x, int64_t hidden, const at::BFloat16* w, int64_t, int64_t, int64_t inter,
                        at::BFloat16* act) {
  // per pair of inputs the block holds NV gate vectors, then NV up vectors: 2 * NV in a row
  vec acc[MT][2 * NV] = {};
  accumulate_pairs(acc, x, hidden, w, hidden);
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < NV; ++v) store(act + m * inter + v * kLanes, silu(acc[m][v]) * acc[m][NV + v]);
}

template <int MT, int NV>
void down_pairs_tile(const at::BFloat16* act, int64_t inter, const at::BFloat16* w, int64_t, int64_t hidden,
                     const float* row_weight, float* out) {
  vec acc[MT][NV] = {};
  accumulate_pairs(acc, act, inter, w, inter);
  for (int m = 0; m < MT; ++m) {
    vec scale = broadcast(row_weight[m]);
    for (int v = 0; v < NV; ++v) store(out + m * hidden + v * kLanes, acc[m][v] * scale);
  }
}
#endif

// Run `tile<MT>` over `rows` rows in tiles of at most kMaxRowTile.
template <template <int> class Tile, typename... Args>
void over_row_tiles(int64_t rows, Args... args) {
  for (int64_t r = 0; r < rows; r += kMaxRowTile) {
    switch (std::min<int64_t>(kMaxRowTile, rows - r)) {
      case 1: Tile<1>::run(r, args...); break;
      case 2: Tile<2>::run(r, args...); break;
      case 3: Tile<3>::run(r, args...); break;
      case 4: Tile<4>::run(r, args...); break;
      case 5: Tile<5>::run(r, args...); break;
      default: Tile<6>::run(r, args...); break;
    }
  }
}

// Tile families: Tile<MT>::run(first row, ...) runs one phase's tile on MT rows from `first`.
template <int NV, typename W>
struct GateUp {
  template <int MT>
  struct Tile {
    static void run(int64_t r, const float* x, int64_t hidden, const W* w, int64_t ldw, int64_t up_offset,
                    int64_t inter, float* act) {
      gate_up_tile<MT, NV, W>(x + r * hidden, hidden, w, ldw, up_offset, inter, act + r * inter);
    }
  };
};

template <int NV, typename W>
struct Down {
  template <int MT>
  struct Tile {
    static void run(int64_t r, const float* act, int64_t inter, const W* w, int64_t ldw, int64_t hidden,
                    const float* weight, float* out) {
      down_tile<MT, NV, W>(act + r * inter, inter, w, ldw, hidden, weight + r, out + r * hidden);
    }
  };
};

// fp32 rows against fp32 weights, or bf16 weights widened to fp32 on load.
template <typename W>
struct Widened {
  using Row = float;
  using Weight = W;
  template <int NV>
  using Up = GateUp<NV, W>;
  template <int NV>
  using Dn = Down<NV, W>;
};

#if defined(__AVX512BF16__)
template <int NV>
struct GateUpPairs {
  template <int MT>
  struct Tile {
    static void run(int64_t r, const at::BFloat16* x, int64_t hidden, const at::BFloat16* w, int64_t ldw,
                    int64_t up_offset, int64_t inter, at::BFloat16* act) {
      gate_up_pairs_tile<MT, NV>(x + r * hidden, hidden, w, ldw, up_offset, inter, act + r * inter);
    }
  };
};

template <int NV>
struct DownPairs {
  template <int MT>
  struct Tile {
    static void run(int64_t r, const at::BFloat16* act, int64_t inter, const at::BFloat16* w, int64_t ldw,
                    int64_t hidden, const float* weight, float* out) {
      down_pairs_tile<MT, NV>(act + r * inter, inter, w, ldw, hidden, weight + r, out + r * hidden);
    }
  };
};

// bf16 rows against bf16 weights packed in k pairs.
struct Pairs {
  using Row = at::BFloat16;
  using Weight = at::BFloat16;
  template <int NV>
  using Up = GateUpPairs<NV>;
  template <int NV>
  using Dn = DownPairs<NV>;
};
#endif

// Whether a kind's weights are bf16 widened to fp32 as they are read (see widen_to_scratch).
template <class Kind>
constexpr bool kWidens = std::is_same_v<typename Kind::Row, float> && std::is_same_v<typename Kind::Weight, at::BFloat16>;

struct Job {
  int64_t expert;
  int64_t column;  // first output column of this tile
};

// Jobs for every expert that got rows, one per block of `width` output columns.
std::vector<Job> jobs_for(const std::vector<int64_t>& offsets, int64_t columns, int64_t width) {
  std::vector<Job> jobs;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    for (int64_t c = 0; c < columns; c += width) jobs.push_back({static_cast<int64_t>(e), c});
  }
  return jobs;
}

// Which column-block widths (in vectors) the kernel uses for these sizes: the up phase
// NV1 * kLanes intermediate columns a job (gate and up: 2 * NV1 accumulators a row), the
// down phase NV2 * kLanes hidden columns a job; the widest the level's accumulators hold.
struct Widths {
  int up, down;
};

constexpr int kUpVectors = kAccumulators / (2 * kMaxRowTile), kDownVectors = kAccumulators / kMaxRowTile;

Widths widths_for(int64_t hidden, int64_t inter) {
  return {widest_dividing(inter, kUpVectors), widest_dividing(hidden, kDownVectors)};
}

// `packed`: the weights are in pack_experts' layout, so each job's block is one contiguous
// run; otherwise a job reads a narrow column slice of every weight row. Pairs are always packed.
template <class Kind, int NV1, int NV2, typename X = typename Kind::Row, typename W = typename Kind::Weight>
void run_experts(const X* x, const std::vector<int64_t>& offsets, const W* gate_up, const W* down, bool packed,
                 const float* row_weight, int64_t hidden, int64_t inter, X* act, float* out) {
  // Phase 1 writes act[rows, inter] tile by tile; phase 2 reads whole act rows.
  constexpr int64_t kUp = NV1 * kLanes, kDown = NV2 * kLanes;
  const int64_t up_ldw = packed ? 2 * kUp : 2 * inter, up_offset = packed ? kUp : inter;
  const int64_t down_ldw = packed ? kDown : hidden;
  auto up_jobs = jobs_for(offsets, inter, kUp);
  dynamic_for(static_cast<int64_t>(up_jobs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const Job job = up_jobs[j];
      const int64_t first = offsets[job.expert];
      const W* w = packed ? gate_up + (job.expert * (inter / kUp) + job.column / kUp) * hidden * 2 * kUp
                          : gate_up + job.expert * hidden * 2 * inter + job.column;
      const int64_t rows = offsets[job.expert + 1] - first;
      if constexpr (kWidens<Kind>) {
        if (packed && rows > kMaxRowTile) {
          over_row_tiles<GateUp<NV1, float>::template Tile>(rows, x + first * hidden, hidden,
                                                            widen_to_scratch(w, hidden * 2 * kUp), up_ldw, up_offset,
                                                            inter, act + first * inter + job.column);
          continue;
        }
      }
      over_row_tiles<Kind::template Up<NV1>::template Tile>(rows, x + first * hidden, hidden, w, up_ldw, up_offset,
                                                            inter, act + first * inter + job.column);
    }
  });
  auto down_jobs = jobs_for(offsets, hidden, kDown);
  dynamic_for(static_cast<int64_t>(down_jobs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const Job job = down_jobs[j];
      const int64_t first = offsets[job.expert];
      const W* w = packed ? down + (job.expert * (hidden / kDown) + job.column / kDown) * inter * kDown
                          : down + job.expert * inter * hidden + job.column;
      const int64_t rows = offsets[job.expert + 1] - first;
      if constexpr (kWidens<Kind>) {
        if (packed && rows > kMaxRowTile) {
          over_row_tiles<Down<NV2, float>::template Tile>(rows, act + first * inter, inter,
                                                          widen_to_scratch(w, inter * kDown), down_ldw, hidden,
                                                          row_weight + first, out + first * hidden + job.column);
          continue;
        }
      }
      over_row_tiles<Kind::template Dn<NV2>::template Tile>(rows, act + first * inter, inter, w, down_ldw, hidden,
                                                            row_weight + first, out + first * hidden + job.column);
    }
  });
}

template <class Kind, typename X, typename W>
void dispatch_widths(const X* x, const std::vector<int64_t>& offsets, const W* gate_up, const W* down, bool packed,
                     const float* row_weight, int64_t hidden, int64_t inter, X* act, float* out) {
  const Widths widths = widths_for(hidden, inter);
#define EXPERTMESH_RUN(NV1, NV2) \
  run_experts<Kind, NV1, NV2>(x, offsets, gate_up, down, packed, row_weight, hidden, inter, act, out)
  if (widths.up == 2) {
    if (widths.down == 4) EXPERTMESH_RUN(2, 4);
    else if (widths.down == 2) EXPERTMESH_RUN(2, 2);
    else EXPERTMESH_RUN(2, 1);
  } else {
    if (widths.down == 4) EXPERTMESH_RUN(1, 4);
    else if (widths.down == 2) EXPERTMESH_RUN(1, 2);
    else EXPERTMESH_RUN(1, 1);
  }
#undef EXPERTMESH_RUN
}

}  // namespace

// Copies of gate_up [E, H, 2I] and down [E, I, H] in the kernel's job order, where U and D
// are the column-block widths the kernel picks for these sizes. A decode step then streams
// each job's block as one run instead of 128-256-byte slices of every row.
//  - fp32, or bf16 without bf16 dot products: gate_up as [E, I / U, H, 2, U] (a job's U gate
//    and U up columns, row after row) and down as [E, H / D, I, D];
//  - bf16 with bf16 dot products, in k pairs: gate_up as [E, I / U, H / 2, 2, U, 2] and down
//    as [E, H / D, I / 2, D, 2].
std::vector<at::Tensor> pack_experts(at::Tensor gate_up, at::Tensor down) {
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3, "pack_experts takes gate_up [E, H, 2I] and down [E, I, H]");
  const int64_t experts = gate_up.size(0), hidden = gate_up.size(1), inter = down.size(1);
  TORCH_CHECK(gate_up.size(2) == 2 * inter && down.size(2) == hidden && down.size(0) == experts,
              "gate_up and down shapes do not match");
  TORCH_CHECK(inter % kLanes == 0 && hidden % kLanes == 0, "hidden and intermediate sizes must be multiples of 16");
  const Widths widths = widths_for(hidden, inter);
  const int64_t up = widths.up * kLanes, dn = widths.down * kLanes;
  if (gate_up.scalar_type() == at::kBFloat16 && kHasBf16Dot) {
    return {gate_up.view({experts, hidden / 2, 2, 2, inter / up, up}).permute({0, 4, 1, 3, 5, 2}).contiguous(),
            down.view({experts, inter / 2, 2, hidden / dn, dn}).permute({0, 3, 1, 4, 2}).contiguous()};
  }
  return {gate_up.view({experts, hidden, 2, inter / up, up}).permute({0, 3, 1, 2, 4}).contiguous(),
          down.view({experts, inter, hidden / dn, dn}).permute({0, 2, 1, 3}).contiguous()};
}

// hidden [R, H] fp32 or bf16, rows sorted by expert; offsets [E + 1] int64 (expert e owns
// rows offsets[e]..offsets[e+1]); gate_up [E, H, 2I] and down [E, I, H] (or both as
// pack_experts returns them), both fp32 or both bf16; row_weights [R] fp32. Returns the
// weighted expert outputs [R, H] in row order, in hidden's dtype (summed in fp32, rounded
// once). On pair-packed weights the rows and the
// SwiGLU activations are bf16 (as torch's bf16 matmuls take them); otherwise fp32.
at::Tensor fused_experts(at::Tensor hidden, at::Tensor offsets, at::Tensor gate_up, at::Tensor down,
                         at::Tensor row_weights) {
  TORCH_CHECK(hidden.dim() == 2 && (hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16),
              "hidden must be [R, H] fp32 or bf16");
  TORCH_CHECK(row_weights.scalar_type() == at::kFloat && row_weights.is_contiguous(),
              "row_weights must be contiguous fp32");
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "expert weights must be contiguous");
  TORCH_CHECK(gate_up.scalar_type() == down.scalar_type(), "gate_up and down must share a dtype");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "expert weights must be fp32 or bf16");
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  const bool pairs = gate_up.dim() == 6, packed = pairs || gate_up.dim() == 5;
  int64_t inter;
  if (pairs) {
    TORCH_CHECK(kHasBf16Dot && gate_up.scalar_type() == at::kBFloat16, "pair-packed expert weights need bf16 dot products");
    TORCH_CHECK(down.dim() == 5 && 2 * gate_up.size(2) == width && gate_up.size(3) == 2 && gate_up.size(5) == 2 &&
                    down.size(4) == 2,
                "pair-packed expert weights must be [E, I/U, H/2, 2, U, 2] and [E, H/D, I/2, D, 2]");
    inter = gate_up.size(1) * gate_up.size(4);
    const Widths widths = widths_for(width, inter);
    TORCH_CHECK(gate_up.size(4) == widths.up * kLanes && down.size(3) == widths.down * kLanes &&
                    down.size(1) * down.size(3) == width && 2 * down.size(2) == inter,
                "expert weights were packed for other sizes; pack them with pack_experts");
  } else if (packed) {
    TORCH_CHECK(down.dim() == 4 && gate_up.size(2) == width && gate_up.size(3) == 2,
                "packed expert weights must be [E, I/U, H, 2, U] and [E, H/D, I, D]");
    inter = gate_up.size(1) * gate_up.size(4);
    const Widths widths = widths_for(width, inter);
    TORCH_CHECK(gate_up.size(4) == widths.up * kLanes && down.size(3) == widths.down * kLanes &&
                    down.size(1) * down.size(3) == width && down.size(2) == inter,
                "expert weights were packed for other sizes; pack them with pack_experts");
  } else {
    inter = down.size(1);
    TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(1) == width && gate_up.size(2) == 2 * inter &&
                    down.size(2) == width,
                "expert weight shapes do not match hidden");
  }
  TORCH_CHECK(inter % kLanes == 0 && width % kLanes == 0, "hidden and intermediate sizes must be multiples of 16");
  TORCH_CHECK(offsets.numel() == gate_up.size(0) + 1, "offsets must have num_experts + 1 entries");
  auto offsets_cpu = offsets.contiguous();
  std::vector<int64_t> bounds(offsets_cpu.data_ptr<int64_t>(), offsets_cpu.data_ptr<int64_t>() + offsets_cpu.numel());
  TORCH_CHECK(bounds.front() == 0 && bounds.back() == rows, "offsets must span all rows");

  auto x = hidden.to(pairs ? at::kBFloat16 : at::kFloat).contiguous();
  const float* weights = row_weights.data_ptr<float>();
  if (pairs && tiles::available() && width % tiles::kDepth == 0 && inter % tiles::kDepth == 0) {
    // Outputs in hidden's dtype, bf16 stored straight from the tiles (no fp32 copy to convert).
    auto out = at::empty({rows, width}, hidden.options());
    const bool to_bf16 = hidden.scalar_type() == at::kBFloat16;
    // The same pairs, read by the tile unit. Its jobs read whole 16-row tiles: past an expert's
    // last row into the next expert's, and past the end after the last expert's.
    int64_t last = 0;
    for (size_t e = 1; e < bounds.size(); ++e)
      if (bounds[e] > bounds[e - 1]) last = bounds[e] - bounds[e - 1];
    const at::Tensor padded = tiles::readable_rows(x, last % tiles::kRows != 0);
    auto act = at::empty({rows + tiles::kJobRows, inter}, x.options());
    const Widths widths = widths_for(width, inter);
    tile_experts_bf16(padded.data_ptr<at::BFloat16>(), bounds, gate_up.data_ptr<at::BFloat16>(),
                      down.data_ptr<at::BFloat16>(), weights, width, inter, widths.up * kLanes, widths.down * kLanes,
                      act.data_ptr<at::BFloat16>(), to_bf16 ? nullptr : out.data_ptr<float>(),
                      to_bf16 ? out.data_ptr<at::BFloat16>() : nullptr);
    return out;
  }
  auto out = at::empty({rows, width}, x.options().dtype(at::kFloat));
  auto act = at::empty({rows, inter}, x.options());
  if (pairs) {
#if defined(__AVX512BF16__)
    dispatch_widths<Pairs>(x.data_ptr<at::BFloat16>(), bounds, gate_up.data_ptr<at::BFloat16>(),
                           down.data_ptr<at::BFloat16>(), true, weights, width, inter, act.data_ptr<at::BFloat16>(),
                           out.data_ptr<float>());
#endif
  } else if (gate_up.scalar_type() == at::kFloat) {
    dispatch_widths<Widened<float>>(x.data_ptr<float>(), bounds, gate_up.data_ptr<float>(), down.data_ptr<float>(),
                                    packed, weights, width, inter, act.data_ptr<float>(), out.data_ptr<float>());
  } else {
    dispatch_widths<Widened<at::BFloat16>>(x.data_ptr<float>(), bounds, gate_up.data_ptr<at::BFloat16>(),
                                           down.data_ptr<at::BFloat16>(), packed, weights, width, inter,
                                           act.data_ptr<float>(), out.data_ptr<float>());
  }
  return out.to(hidden.scalar_type());
}

}  // namespace expertmesh
