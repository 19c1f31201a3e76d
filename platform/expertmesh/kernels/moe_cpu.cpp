// Fused SwiGLU experts for small row counts on CPU (decode steps).
//
// A decode step routes a few rows to each expert, so the work is bound by reading
// every expert's weights once. Torch's paths either pad all experts to the widest
// one (batched matmul) or pay a call per expert; this kernel streams each expert's
// weights exactly once, keeps up to MT rows in registers, and splits the
// (expert, column block) tiles across torch's own intra-op threads.
//
// Written with GCC vector extensions so the compiler picks the widest SIMD the
// machine has (-march=native): AVX-512 here, AVX2 elsewhere. bf16 weights are
// widened to fp32 on load; accumulation is always fp32.

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace expertmesh {
namespace {

constexpr int kMaxRowTile = 6;  // rows kept in registers: 6 rows x 4 vectors = 24 accumulators

// act[m, j] = silu(x[m] . Wg[:, j]) * (x[m] . Wu[:, j]) for NV*16 columns j starting at w.
template <int MT, int NV, typename W>
void gate_up_tile(const float* x, int64_t hidden, const W* w, int64_t ldw, int64_t inter, float* act) {
  v16 gate[MT][NV] = {};
  v16 up[MT][NV] = {};
  for (int64_t k = 0; k < hidden; ++k) {
    const W* row = w + k * ldw;
    v16 wg[NV], wu[NV];
    for (int v = 0; v < NV; ++v) {
      wg[v] = load(row + v * kLanes);
      wu[v] = load(row + inter + v * kLanes);
    }
    for (int m = 0; m < MT; ++m) {
      v16 xm = broadcast(x[m * hidden + k]);
      for (int v = 0; v < NV; ++v) {
        gate[m][v] += xm * wg[v];
        up[m][v] += xm * wu[v];
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int v = 0; v < NV; ++v) {
      float* dst = act + m * inter + v * kLanes;
      for (int l = 0; l < kLanes; ++l) {
        float g = gate[m][v][l];
        dst[l] = g / (1.0f + std::exp(-g)) * up[m][v][l];
      }
    }
  }
}

// out[m, n] = weight[m] * (act[m] . Wd[:, n]) for NV*16 columns n starting at w.
template <int MT, int NV, typename W>
void down_tile(const float* act, int64_t inter, const W* w, int64_t hidden, const float* row_weight, float* out) {
  v16 acc[MT][NV] = {};
  for (int64_t k = 0; k < inter; ++k) {
    const W* row = w + k * hidden;
    v16 wd[NV];
    for (int v = 0; v < NV; ++v) wd[v] = load(row + v * kLanes);
    for (int m = 0; m < MT; ++m) {
      v16 am = broadcast(act[m * inter + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] += am * wd[v];
    }
  }
  for (int m = 0; m < MT; ++m) {
    v16 scale = broadcast(row_weight[m]);
    for (int v = 0; v < NV; ++v) store(out + m * hidden + v * kLanes, acc[m][v] * scale);
  }
}

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

template <int NV, typename W>
struct GateUp {
  template <int MT>
  struct Tile {
    static void run(int64_t r, const float* x, int64_t hidden, const W* w, int64_t ldw, int64_t inter, float* act) {
      gate_up_tile<MT, NV, W>(x + r * hidden, hidden, w, ldw, inter, act + r * inter);
    }
  };
};

template <int NV, typename W>
struct Down {
  template <int MT>
  struct Tile {
    static void run(int64_t r, const float* act, int64_t inter, const W* w, int64_t hidden, const float* weight,
                    float* out) {
      down_tile<MT, NV, W>(act + r * inter, inter, w, hidden, weight + r, out + r * hidden);
    }
  };
};

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

template <typename W, int NV1, int NV2>
void run_experts(const float* x, const std::vector<int64_t>& offsets, const W* gate_up, const W* down,
                 const float* row_weight, int64_t hidden, int64_t inter, float* act, float* out) {
  // Phase 1 writes act[rows, inter] tile by tile; phase 2 reads whole act rows.
  const int64_t ldw = 2 * inter;
  auto up_jobs = jobs_for(offsets, inter, NV1 * kLanes);
  dynamic_for(static_cast<int64_t>(up_jobs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const Job job = up_jobs[j];
      const int64_t first = offsets[job.expert];
      const W* w = gate_up + job.expert * hidden * ldw + job.column;
      over_row_tiles<GateUp<NV1, W>::template Tile>(offsets[job.expert + 1] - first, x + first * hidden, hidden, w,
                                                    ldw, inter, act + first * inter + job.column);
    }
  });
  auto down_jobs = jobs_for(offsets, hidden, NV2 * kLanes);
  dynamic_for(static_cast<int64_t>(down_jobs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const Job job = down_jobs[j];
      const int64_t first = offsets[job.expert];
      const W* w = down + job.expert * inter * hidden + job.column;
      over_row_tiles<Down<NV2, W>::template Tile>(offsets[job.expert + 1] - first, act + first * inter, inter, w,
                                                  hidden, row_weight + first, out + first * hidden + job.column);
    }
  });
}

template <typename W>
void dispatch_widths(const float* x, const std::vector<int64_t>& offsets, const W* gate_up, const W* down,
                     const float* row_weight, int64_t hidden, int64_t inter, float* act, float* out) {
  const bool wide_up = inter % (2 * kLanes) == 0;
  const int down_vectors = hidden % (4 * kLanes) == 0 ? 4 : (hidden % (2 * kLanes) == 0 ? 2 : 1);
#define EXPERTMESH_RUN(NV1, NV2) run_experts<W, NV1, NV2>(x, offsets, gate_up, down, row_weight, hidden, inter, act, out)
  if (wide_up) {
    if (down_vectors == 4) EXPERTMESH_RUN(2, 4);
    else if (down_vectors == 2) EXPERTMESH_RUN(2, 2);
    else EXPERTMESH_RUN(2, 1);
  } else {
    if (down_vectors == 4) EXPERTMESH_RUN(1, 4);
    else if (down_vectors == 2) EXPERTMESH_RUN(1, 2);
    else EXPERTMESH_RUN(1, 1);
  }
#undef EXPERTMESH_RUN
}

}  // namespace

// hidden [R, H] fp32, rows sorted by expert; offsets [E + 1] int64 (expert e owns rows
// offsets[e]..offsets[e+1]); gate_up [E, H, 2I] and down [E, I, H], both fp32 or both bf16;
// row_weights [R] fp32. Returns the weighted expert outputs [R, H] fp32 in row order.
at::Tensor fused_experts(at::Tensor hidden, at::Tensor offsets, at::Tensor gate_up, at::Tensor down,
                         at::Tensor row_weights) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.is_contiguous(), "hidden must be contiguous fp32");
  TORCH_CHECK(row_weights.scalar_type() == at::kFloat && row_weights.is_contiguous(),
              "row_weights must be contiguous fp32");
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "expert weights must be contiguous");
  TORCH_CHECK(gate_up.scalar_type() == down.scalar_type(), "gate_up and down must share a dtype");
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  const int64_t inter = down.size(1);
  TORCH_CHECK(gate_up.size(1) == width && gate_up.size(2) == 2 * inter && down.size(2) == width,
              "expert weight shapes do not match hidden");
  TORCH_CHECK(inter % kLanes == 0 && width % kLanes == 0, "hidden and intermediate sizes must be multiples of 16");
  TORCH_CHECK(offsets.numel() == gate_up.size(0) + 1, "offsets must have num_experts + 1 entries");
  auto offsets_cpu = offsets.contiguous();
  std::vector<int64_t> bounds(offsets_cpu.data_ptr<int64_t>(), offsets_cpu.data_ptr<int64_t>() + offsets_cpu.numel());
  TORCH_CHECK(bounds.front() == 0 && bounds.back() == rows, "offsets must span all rows");

  auto act = at::empty({rows, inter}, hidden.options());
  auto out = at::empty({rows, width}, hidden.options());
  if (gate_up.scalar_type() == at::kFloat) {
    dispatch_widths<float>(hidden.data_ptr<float>(), bounds, gate_up.data_ptr<float>(), down.data_ptr<float>(),
                           row_weights.data_ptr<float>(), width, inter, act.data_ptr<float>(), out.data_ptr<float>());
  } else {
    TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16, "expert weights must be fp32 or bf16");
    dispatch_widths<at::BFloat16>(hidden.data_ptr<float>(), bounds, gate_up.data_ptr<at::BFloat16>(),
                                  down.data_ptr<at::BFloat16>(), row_weights.data_ptr<float>(), width, inter,
                                  act.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

}  // namespace expertmesh
