// 16-lane fp32 vectors through GCC vector extensions: with -march=native the compiler
// emits the machine's widest SIMD (one AVX-512 register, or two AVX2 ones).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include <cstdint>

namespace expertmesh {

constexpr int kLanes = 16;

typedef float v16 __attribute__((vector_size(64)));
typedef float v16_unaligned __attribute__((vector_size(64), aligned(4)));
typedef uint16_t h16_unaligned __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u16 __attribute__((vector_size(64)));

inline v16 load(const float* p) { return *reinterpret_cast<const v16_unaligned*>(p); }

inline v16 load(const at::BFloat16* p) {
  // bf16 is the top half of an fp32: widen and shift.
  auto half = *reinterpret_cast<const h16_unaligned*>(p);
  u16 wide = __builtin_convertvector(half, u16) << 16;
  return reinterpret_cast<v16&>(wide);
}

inline void store(float* p, v16 v) { *reinterpret_cast<v16_unaligned*>(p) = v; }

inline v16 broadcast(float x) { return v16{} + x; }

inline float sum_lanes(v16 v) {
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += v[l];
  return total;
}

// fn(begin, end) over [0, n) in chunks of `chunk`, handed out one at a time to the intra-op
// threads. Unlike at::parallel_for's fixed split, a thread that the OS preempts (other
// processes share the cores when serving) or that got heavier jobs holds up at most one
// chunk: the others take the rest.
template <typename F>
void dynamic_for(int64_t n, int64_t chunk, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(chunk); begin < n; begin = next.fetch_add(chunk)) fn(begin, std::min(n, begin + chunk));
  });
}

}  // namespace expertmesh
