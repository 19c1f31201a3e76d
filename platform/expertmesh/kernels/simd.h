// fp32 vectors as wide as the CPU's vector registers, through GCC vector extensions, and
// the register budget a kernel's tile may spend on accumulators.
//
// Each ISA level is its own build (see isa.py): the compiler is told the level, and the
// kernels size their register tiles from kLanes and kVectorRegisters, so no level runs a
// design that another level's registers were counted for. AVX-512: 16 fp32 lanes, 32
// registers. AVX2 + FMA, and any CPU the kernels know no level of (the portable build):
// 8 lanes, 16 registers (NEON's 32 128-bit registers hold 16 such vectors).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <cstdint>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define EXPERTMESH_LANES 16
#define EXPERTMESH_VECTOR_REGISTERS 32
#else
#define EXPERTMESH_LANES 8
#define EXPERTMESH_VECTOR_REGISTERS 16
#endif

namespace expertmesh {

constexpr int kLanes = EXPERTMESH_LANES;
constexpr int kVectorRegisters = EXPERTMESH_VECTOR_REGISTERS;
// Accumulators a register tile may hold: three quarters of the registers, leaving the rest
// for the weight vectors loaded per step and the broadcast input (AVX-512: 24, AVX2: 12).
constexpr int kAccumulators = kVectorRegisters * 3 / 4;

typedef float vec __attribute__((vector_size(4 * EXPERTMESH_LANES)));
typedef float vec_unaligned __attribute__((vector_size(4 * EXPERTMESH_LANES), aligned(4)));
typedef uint16_t hvec_unaligned __attribute__((vector_size(2 * EXPERTMESH_LANES), aligned(2)));
typedef uint32_t uvec __attribute__((vector_size(4 * EXPERTMESH_LANES)));
typedef int32_t ivec __attribute__((vector_size(4 * EXPERTMESH_LANES)));
typedef uint16_t hvec __attribute__((vector_size(2 * EXPERTMESH_LANES)));

// The widest of max_vectors, max_vectors / 2, ..., 1 vectors whose columns divide n: a tile's
// width where n columns split into equal tiles.
inline int widest_dividing(int64_t n, int max_vectors) {
  for (int v = max_vectors; v > 1; v /= 2)
    if (n % (v * kLanes) == 0) return v;
  return 1;
}

inline vec load(const float* p) { return *reinterpret_cast<const vec_unaligned*>(p); }

inline vec load(const at::BFloat16* p) {
  // bf16 is the top half of an fp32: widen and shift.
  auto half = *reinterpret_cast<const hvec_unaligned*>(p);
  uvec wide = __builtin_convertvector(half, uvec) << 16;
  return reinterpret_cast<vec&>(wide);
}

inline void store(float* p, vec v) { *reinterpret_cast<vec_unaligned*>(p) = v; }

// x - 0 is x in every lane (0 + x would turn -0 into +0, so the compiler must compute it).
inline vec broadcast(float x) { return x - vec{}; }

inline float sum_lanes(vec v) {
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += v[l];
  return total;
}

// The largest of x[0, n), a vector at a time (-inf for none). Only meaningful without NaNs
// (one can hide its lane's later values): `saw_nan`, when given, says whether there was one.
inline float max_of(const float* x, int64_t n, bool* saw_nan = nullptr) {
  const int64_t whole = n / kLanes * kLanes;
  float best = -std::numeric_limits<float>::infinity();
  bool nan = false;
  if (whole > 0) {
    vec top = load(x);
    auto nans = top != top;
    for (int64_t i = kLanes; i < whole; i += kLanes) {
      const vec v = load(x + i);
      top = v > top ? v : top;
      nans |= v != v;
    }
    for (int l = 0; l < kLanes; ++l) {
      best = std::max(best, top[l]);
      nan = nan || nans[l];
    }
  }
  for (int64_t i = whole; i < n; ++i) {
    best = std::max(best, x[i]);
    nan = nan || std::isnan(x[i]);
  }
  if (saw_nan != nullptr) *saw_nan = nan;
  return best;
}

// Round to the nearest bf16 (ties to even), as torch does when it stores a bf16 result;
// the value stays an fp32 with the low 16 bits clear.
inline vec round_to_bf16(vec v) {
  uvec bits = reinterpret_cast<uvec&>(v);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  return reinterpret_cast<vec&>(bits);
}

inline void store(at::BFloat16* p, vec v) {
  vec rounded = round_to_bf16(v);
  *reinterpret_cast<hvec_unaligned*>(p) = __builtin_convertvector(reinterpret_cast<uvec&>(rounded) >> 16, hvec);
}

// What a value of type T holds once stored: bf16 results are rounded at every step, as
// torch's bf16 ops round each intermediate tensor.
template <typename T>
inline vec as_stored(vec v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) return round_to_bf16(v);
  return v;
}

// exp over a vector's lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-6
// polynomial for e^r (about 1 ulp); std::exp is one lane at a time.
inline vec exp(vec x) {
  const vec lo = broadcast(-87.3f), hi = broadcast(88.7f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vec magic = broadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vec n = (x * 1.44269504088896341f + magic) - magic;
  vec r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vec p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  ivec scale = (__builtin_convertvector(n, ivec) + 127) << 23;
  return p * reinterpret_cast<vec&>(scale);
}

inline vec silu(vec x) { return x / (1.0f + exp(-x)); }

// vdpbf16ps (AVX512-BF16) multiplies 16 pairs of bf16 and adds each pair's two products
// to an fp32 lane. Weights packed in k pairs ([..., K / 2, columns, 2]) feed it straight from
// memory, with no widening: one instruction does 32 multiply-adds.
#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;

// x[k], x[k + 1] of a bf16 row as one 32-bit value (k even), for dot_pairs.
inline int32_t pair_at(const at::BFloat16* x, int64_t k) { return *reinterpret_cast<const int32_t*>(x + k); }

typedef __m512bh pairs16;  // 16 (column) pairs of bf16 weights

inline pairs16 load_pairs(const at::BFloat16* w) { return (pairs16)_mm512_loadu_si512(w); }

// acc[l] += w[l].first * x[0] + w[l].second * x[1]; `x_pair` is x[0], x[1] as one 32-bit value.
inline vec dot_pairs(vec acc, int32_t x_pair, pairs16 w) {
  return (vec)_mm512_dpbf16_ps((__m512)acc, (pairs16)_mm512_set1_epi32(x_pair), w);
}

// acc[m][v] += x[m] . W[:, v*16 .. v*16+15] for MT bf16 rows of x (row m at x + m * ldx) and a
// pair-packed block W: per pair of inputs k, k+1, NV vectors of 16 columns' pairs.
template <int MT, int NV>
inline void accumulate_pairs(vec (&acc)[MT][NV], const at::BFloat16* x, int64_t ldx, const at::BFloat16* w,
                             int64_t depth) {
  for (int64_t k = 0; k < depth; k += 2) {
    pairs16 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load_pairs(w + (k * NV + v * 2) * kLanes);
    for (int m = 0; m < MT; ++m) {
      const int32_t xm = pair_at(x + m * ldx, k);
      for (int v = 0; v < NV; ++v) acc[m][v] = dot_pairs(acc[m][v], xm, wv[v]);
    }
  }
}
#else
constexpr bool kHasBf16Dot = false;
#endif

// w[0, n) (n a multiple of kLanes) widened to fp32 in this thread's scratch buffer, valid until
// the thread's next call. Where a weight block without bf16 dot products meets more rows than
// one register tile, widening it once costs less than widening it again for every tile.
inline const float* widen_to_scratch(const at::BFloat16* w, int64_t n) {
  thread_local std::vector<float> scratch;
  scratch.resize(n);
  for (int64_t i = 0; i < n; i += kLanes) store(scratch.data() + i, load(w + i));
  return scratch.data();
}

// Ask for `bytes` from p into L1 ahead of their use. A kernel streaming a weight block from
// memory row by row asks for the row a 4 KB page ahead: the hardware prefetchers stop at page
// boundaries (fp32 experts at decode sizes: 19 GB/s of weights without, 21-22 with).
// Always inlined: GCC finds a call of it free of side effects and may drop the call whole; so
// may it a call of any small function around it, which needs the same attribute.
__attribute__((always_inline)) inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, 0, 3);
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
