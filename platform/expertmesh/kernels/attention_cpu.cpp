// Decode attention straight from the paged KV cache.
//
// Each decoding sequence has one query token. The torch path first gathers every
// sequence's K and V into a padded [n, L] copy and then runs SDPA over it, touching
// the cache twice and the padding too; here each sequence's job reads its own cache
// slots once, whole rows (every KV head) at a time, for all the query heads, asking for
// the rows a few positions ahead. Scores are summed across lanes in a halving tree and the
// softmax runs on the vector exp, which beat lane-by-lane sums and std::exp with the cache in
// memory. Holding each head's query and output in registers and reading the rows head by head
// was faster only while the cache fit in L3, and slower from memory: it reads each row in
// 256-byte pieces (measurements: docs/benchmark-log.md).

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "simd.h"

namespace expertmesh {
namespace {

// The lanes' sum in halving steps: a score needs one per (position, head), and summing lane
// by lane (sum_lanes, in order) is a chain of dependent adds.
inline float tree_sum(vec v) {
#if EXPERTMESH_LANES == 16
  v += __builtin_shuffle(v, ivec{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, ivec{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, ivec{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, ivec{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#else
  v += __builtin_shuffle(v, ivec{4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, ivec{2, 3, 0, 1, 6, 7, 4, 5});
  v += __builtin_shuffle(v, ivec{1, 0, 3, 2, 5, 4, 7, 6});
#endif
  return v[0];
}

// softmax over s[0, n), a vector at a time (the vector exp; std::exp for the last n % kLanes).
void softmax_in_place(float* s, int64_t n) {
  const int64_t whole = n / kLanes * kLanes;
  const float peak = max_of(s, n);
  const vec peaks = broadcast(peak);
  vec totals{};
  for (int64_t j = 0; j < whole; j += kLanes) {
    const vec e = exp(load(s + j) - peaks);
    store(s + j, e);
    totals += e;
  }
  float total = sum_lanes(totals);
  for (int64_t j = whole; j < n; ++j) total += (s[j] = std::exp(s[j] - peak));
  const float inverse = 1.0f / total;
  const vec inverses = broadcast(inverse);
  for (int64_t j = 0; j < whole; j += kLanes) store(s + j, load(s + j) * inverses);
  for (int64_t j = whole; j < n; ++j) s[j] *= inverse;
}

constexpr int64_t kValueBlock = 16;  // positions: one cache block's V rows (8 KB at 4 x 64 dims)

// The key pass asks for the K and V rows this many positions ahead (V too: the value pass then
// reads it from cache): the cache's blocks lie anywhere, and the hardware prefetchers stop at
// each block's (and page's) end; asking ahead cut a decode step's attention by a fifth to a third.
constexpr int64_t kRowsAhead = 8;

template <typename KV>
__attribute__((always_inline)) inline void prefetch_rows_ahead(const KV* k_cache, const KV* v_cache, const int64_t* slots, int64_t j, int64_t length,
                                int64_t row) {
  if (j + kRowsAhead < length) {
    prefetch(k_cache + slots[j + kRowsAhead] * row, row * sizeof(KV));
    if (v_cache != k_cache) prefetch(v_cache + slots[j + kRowsAhead] * row, row * sizeof(KV));  // MLA: one row
  }
}

// One sequence, every head: scores position by position, softmax head by head, then the
// weighted sum of V position by position.
template <typename KV>
void attend(const float* q, const KV* k_cache, const KV* v_cache, const int64_t* slots, int64_t length,
            int64_t kv_heads, int64_t group, int64_t dim, float scale, float* out) {
  const int64_t vectors = dim / kLanes, heads = kv_heads * group;
  const int64_t row = kv_heads * dim;  // one cache slot holds every KV head
  std::vector<float> scores(heads * length);  // [head, position]
  for (int64_t j = 0; j < length; ++j) {  // position by position, whole cache rows
    prefetch_rows_ahead(k_cache, v_cache, slots, j, length, row);
    const KV* key_row = k_cache + slots[j] * row;
    for (int64_t h = 0; h < heads; ++h) {
      const KV* key = key_row + (h / group) * dim;
      const float* query = q + h * dim;
      vec acc{};
      for (int64_t v = 0; v < vectors; ++v) acc += load(query + v * kLanes) * load(key + v * kLanes);
      scores[h * length + j] = tree_sum(acc) * scale;
    }
  }
  for (int64_t h = 0; h < heads; ++h) softmax_in_place(scores.data() + h * length, length);
  for (int64_t i = 0; i < heads * vectors; ++i) store(out + i * kLanes, vec{});
  for (int64_t j = 0; j < length; ++j) {
    const KV* value_row = v_cache + slots[j] * row;
    for (int64_t h = 0; h < heads; ++h) {
      const KV* value = value_row + (h / group) * dim;
      const vec weight = broadcast(scores[h * length + j]);
      float* dst = out + h * dim;
      for (int64_t v = 0; v < vectors; ++v) store(dst + v * kLanes, load(dst + v * kLanes) + weight * load(value + v * kLanes));
    }
  }
}

// MLA's absorbed decode: every query head attends over the same row per position (one KV head
// of width `dim`, its first `v_dim` values the value), so the work is heads x (dim + v_dim)
// multiply-adds a row, several times the GQA kernel's, and register tiles pay. Scores: two
// positions' keys against four heads' queries per step, 8 independent accumulators (one chain
// of dependent adds per head stalled on the add latency). Values: a block of positions at a time,
// kHeadTile heads x 4 vectors of output held in registers over the block, so each value vector
// and weight loaded feeds several multiply-adds.
constexpr int kScoreHeads = 4, kScorePositions = 2, kValueVectors = 4;
constexpr int kHeadTile = kVectorRegisters >= 32 ? 4 : 2;  // 16 (or 8) accumulators

template <typename KV, int NH>
inline void latent_scores(const float* q, const KV* const* keys, int np, int64_t vectors, int64_t dim, float* out,
                          int64_t length) {
  vec acc[kScorePositions][NH] = {};
  for (int64_t v = 0; v < vectors; ++v) {
    vec key[kScorePositions];
    for (int p = 0; p < kScorePositions; ++p) key[p] = p < np ? load(keys[p] + v * kLanes) : vec{};
    for (int h = 0; h < NH; ++h) {
      const vec query = load(q + h * dim + v * kLanes);
      for (int p = 0; p < kScorePositions; ++p) acc[p][h] += query * key[p];
    }
  }
  for (int p = 0; p < np; ++p)
    for (int h = 0; h < NH; ++h) out[h * length + p] = tree_sum(acc[p][h]);
}

// dst[h * v_dim + (0, NV vectors)] += the weighted sum over positions [begin, end) of NV vectors
// of each row (at `offset`), for NH heads, weights[h * length + pos].
template <typename KV, int NH, int NV>
inline void latent_values(const KV* cache, const int64_t* slots, int64_t begin, int64_t end, int64_t row,
                          int64_t offset, const float* weights, int64_t length, float* dst, int64_t v_dim) {
  vec acc[NH][NV];
  for (int h = 0; h < NH; ++h)
    for (int v = 0; v < NV; ++v) acc[h][v] = load(dst + h * v_dim + v * kLanes);
  for (int64_t pos = begin; pos < end; ++pos) {
    const KV* value = cache + slots[pos] * row + offset;
    vec x[NV];
    for (int v = 0; v < NV; ++v) x[v] = load(value + v * kLanes);
    for (int h = 0; h < NH; ++h) {
      const vec weight = broadcast(weights[h * length + pos]);
      for (int v = 0; v < NV; ++v) acc[h][v] += weight * x[v];
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int v = 0; v < NV; ++v) store(dst + h * v_dim + v * kLanes, acc[h][v]);
}

// One block of positions into every head's output: tiles of kHeadTile heads x kValueVectors
// vectors, then the heads and vectors left over one at a time.
template <typename KV>
void latent_values_block(const KV* cache, const int64_t* slots, int64_t begin, int64_t end, int64_t row,
                         const float* scores, int64_t length, int64_t heads, float* out, int64_t v_dim) {
  const int64_t vectors = v_dim / kLanes, whole = vectors / kValueVectors * kValueVectors;
  for (int64_t v = 0; v < vectors;) {
    const bool tile = v < whole;
    int64_t h = 0;
    for (; tile && h + kHeadTile <= heads; h += kHeadTile)
      latent_values<KV, kHeadTile, kValueVectors>(cache, slots, begin, end, row, v * kLanes, scores + h * length,
                                                  length, out + h * v_dim + v * kLanes, v_dim);
    for (; h < heads; ++h) {
      if (tile)
        latent_values<KV, 1, kValueVectors>(cache, slots, begin, end, row, v * kLanes, scores + h * length, length,
                                            out + h * v_dim + v * kLanes, v_dim);
      else
        latent_values<KV, 1, 1>(cache, slots, begin, end, row, v * kLanes, scores + h * length, length,
                                out + h * v_dim + v * kLanes, v_dim);
    }
    v += tile ? kValueVectors : 1;
  }
}

template <typename KV>
void attend_latent(const float* q, const KV* cache, const int64_t* slots, int64_t length, int64_t heads, int64_t dim,
                   int64_t v_dim, float scale, float* out) {
  const int64_t vectors = dim / kLanes;
  std::vector<float> scores(heads * length);  // [head, position]
  for (int64_t j = 0; j < length; j += kScorePositions) {
    const int np = static_cast<int>(std::min<int64_t>(kScorePositions, length - j));
    const KV* keys[kScorePositions];
    for (int p = 0; p < kScorePositions; ++p) {
      keys[p] = cache + slots[j + std::min(p, np - 1)] * dim;
      prefetch_rows_ahead(cache, cache, slots, j + p, length, dim);
    }
    for (int64_t h = 0; h < heads; h += kScoreHeads) {
      float* dst = scores.data() + h * length + j;
      switch (std::min<int64_t>(kScoreHeads, heads - h)) {
        case 1: latent_scores<KV, 1>(q + h * dim, keys, np, vectors, dim, dst, length); break;
        case 2: latent_scores<KV, 2>(q + h * dim, keys, np, vectors, dim, dst, length); break;
        case 3: latent_scores<KV, 3>(q + h * dim, keys, np, vectors, dim, dst, length); break;
        default: latent_scores<KV, 4>(q + h * dim, keys, np, vectors, dim, dst, length);
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* row_scores = scores.data() + h * length;
    for (int64_t j = 0; j < length; ++j) row_scores[j] *= scale;
    softmax_in_place(row_scores, length);
  }
  std::fill(out, out + heads * v_dim, 0.0f);
  for (int64_t begin = 0; begin < length; begin += kValueBlock)
    latent_values_block(cache, slots, begin, std::min(length, begin + kValueBlock), dim, scores.data(), length, heads,
                        out, v_dim);
}

#if defined(__AVX512BF16__)
// bf16 q, K and V on the bf16 dot product (bf16 models): widening every K and V value to
// fp32 and summing each score's 16 lanes in its own tree made the kernel compute-bound
// (fp32 lanes: 2 widening ops a value; 8 shuffle-adds a score), at about half the speed at
// which memory delivers the cache. Here a score is 2 vdpbf16ps per 32 dims (q is bf16, so
// exact), 16 scores' lane sums share one transposing reduction (45 ops instead of 128), and
// a V row is widened 32 values per 2 ops, into even and odd lanes, once for its group of heads.

// sums[i] = the lane sum of a[i]: halving steps that each merge two vectors' halves.
inline vec lane_sums(vec (&a)[kLanes]) {
  const ivec lo1{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const ivec hi1{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const ivec lo2{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const ivec hi2{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const ivec lo3{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const ivec hi3{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const ivec lo4{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const ivec hi4{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  vec b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo1) + __builtin_shuffle(a[2 * i], a[2 * i + 1], hi1);
  for (int i = 0; i < 4; ++i) c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], lo2) + __builtin_shuffle(b[2 * i], b[2 * i + 1], hi2);
  for (int i = 0; i < 2; ++i) d[i] = __builtin_shuffle(c[2 * i], c[2 * i + 1], lo3) + __builtin_shuffle(c[2 * i], c[2 * i + 1], hi3);
  return __builtin_shuffle(d[0], d[1], lo4) + __builtin_shuffle(d[0], d[1], hi4);
}


// dst[h * dim + (0, 16)] (even, odd lanes of one 32-dim piece, NH heads) += the weighted sum over
// positions [begin, end) of that piece of each V row (at `offset` in the row), weights[h * length + pos].
template <int NH>
void accumulate_values(const at::BFloat16* v_cache, const int64_t* slots, int64_t begin, int64_t end, int64_t row,
                       int64_t offset, const float* weights, int64_t length, float* dst, int64_t dim) {
  vec even_sum[NH], odd_sum[NH];
  for (int h = 0; h < NH; ++h) even_sum[h] = load(dst + h * dim), odd_sum[h] = load(dst + h * dim + kLanes);
  for (int64_t pos = begin; pos < end; ++pos) {
    const uvec raw = (uvec)(_mm512_loadu_si512(v_cache + slots[pos] * row + offset));
    const uvec even_bits = raw << 16, odd_bits = raw & 0xFFFF0000u;
    const vec even = reinterpret_cast<const vec&>(even_bits), odd = reinterpret_cast<const vec&>(odd_bits);
    for (int h = 0; h < NH; ++h) {
      const vec weight = broadcast(weights[h * length + pos]);
      even_sum[h] += weight * even;
      odd_sum[h] += weight * odd;
    }
  }
  for (int h = 0; h < NH; ++h) store(dst + h * dim, even_sum[h]), store(dst + h * dim + kLanes, odd_sum[h]);
}

void attend_bf16(const at::BFloat16* q, const at::BFloat16* k_cache, const at::BFloat16* v_cache, const int64_t* slots,
                 int64_t length, int64_t kv_heads, int64_t group, int64_t dim, float scale, at::BFloat16* out) {
  const int64_t heads = kv_heads * group, row = kv_heads * dim, pieces = dim / (2 * kLanes);
  // Scores position-major: each 16 (position, head) pairs in a row are one reduction.
  const int64_t pairs = length * heads;
  std::vector<float> by_position((pairs + kLanes - 1) / kLanes * kLanes);
  vec partial[kLanes];  // a score's 16 lane products each
  int filled = 0;
  float* next = by_position.data();
  for (int64_t j = 0; j < length; ++j) {
    prefetch_rows_ahead(k_cache, v_cache, slots, j, length, row);
    const at::BFloat16* key_row = k_cache + slots[j] * row;
    for (int64_t g = 0; g < kv_heads; ++g) {
      const at::BFloat16* key = key_row + g * dim;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const at::BFloat16* query = q + h * dim;
        vec sum{};
        for (int64_t v = 0; v < pieces; ++v)
          sum = (vec)_mm512_dpbf16_ps((__m512)sum, load_pairs(key + v * 2 * kLanes), load_pairs(query + v * 2 * kLanes));
        partial[filled] = sum;
        if (++filled == kLanes) {
          store(next, lane_sums(partial) * scale);
          next += kLanes;
          filled = 0;
        }
      }
    }
  }
  if (filled > 0) {
    for (int i = filled; i < kLanes; ++i) partial[i] = vec{};
    store(next, lane_sums(partial) * scale);
  }
  std::vector<float> scores(heads * length);  // [head, position]
  for (int64_t pos = 0; pos < length; ++pos)
    for (int64_t hh = 0; hh < heads; ++hh) scores[hh * length + pos] = by_position[pos * heads + hh];
  for (int64_t hh = 0; hh < heads; ++hh) softmax_in_place(scores.data() + hh * length, length);
  // Outputs in even / odd lanes of each 32 dims (as a V row widens), interleaved at the end.
  // A block of positions at a time, one 32-dim piece of one KV head at a time, so that piece's
  // outputs for (up to 4 of) the heads that share it stay in registers across the block.
  std::vector<float> acc(heads * dim, 0.0f);
  for (int64_t begin = 0; begin < length; begin += kValueBlock) {
    const int64_t end = std::min(length, begin + kValueBlock);
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int64_t v = 0; v < pieces; ++v)
        for (int64_t h = g * group; h < (g + 1) * group; h += 4) {
          const int64_t offset = g * dim + v * 2 * kLanes;
          const float* weights = scores.data() + h * length;
          float* dst = acc.data() + h * dim + v * 2 * kLanes;
          switch (std::min<int64_t>(4, (g + 1) * group - h)) {
            case 1: accumulate_values<1>(v_cache, slots, begin, end, row, offset, weights, length, dst, dim); break;
            case 2: accumulate_values<2>(v_cache, slots, begin, end, row, offset, weights, length, dst, dim); break;
            case 3: accumulate_values<3>(v_cache, slots, begin, end, row, offset, weights, length, dst, dim); break;
            default: accumulate_values<4>(v_cache, slots, begin, end, row, offset, weights, length, dst, dim);
          }
        }
  }
  const ivec first{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const ivec second{8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  for (int64_t i = 0; i < heads * dim; i += 2 * kLanes) {
    const vec even = load(acc.data() + i), odd = load(acc.data() + i + kLanes);
    store(out + i, __builtin_shuffle(even, odd, first));
    store(out + i + kLanes, __builtin_shuffle(even, odd, second));
  }
}
#endif

template <typename KV>
void attend_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                const std::vector<int64_t>& lengths, float scale, at::Tensor& out) {
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), group = heads / kv_heads, width = slots.size(1);
  const float* q_data = q.data_ptr<float>();
  const KV* k_data = k_cache.data_ptr<KV>();
  const KV* v_data = v_cache.data_ptr<KV>();
  const int64_t* slot_data = slots.data_ptr<int64_t>();
  float* out_data = out.data_ptr<float>();
  dynamic_for(seqs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t seq = begin; seq < end; ++seq)
      attend<KV>(q_data + seq * heads * dim, k_data, v_data, slot_data + seq * width, lengths[seq], kv_heads, group,
                 dim, scale, out_data + seq * heads * dim);
  });
}

std::vector<int64_t> checked_lengths(const at::Tensor& lengths, const at::Tensor& slots, int64_t seqs) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 2 && slots.size(0) == seqs,
              "slots must be contiguous int64 [n, L]");
  auto lengths_cpu = lengths.to(at::kLong).contiguous();
  std::vector<int64_t> lens(lengths_cpu.data_ptr<int64_t>(), lengths_cpu.data_ptr<int64_t>() + lengths_cpu.numel());
  TORCH_CHECK(static_cast<int64_t>(lens.size()) == seqs, "one length per sequence");
  for (int64_t n : lens) TORCH_CHECK(n >= 1 && n <= slots.size(1), "lengths must be in [1, L]");
  return lens;
}

}  // namespace

// q [n, heads, d] fp32 or bf16; k_cache, v_cache [slots, kv_heads, d] fp32 or bf16; slots [n, L]
// int64, the cache slot of each context position (padded past lengths[i]); lengths [n].
// Returns softmax(q k^T * scale) v per sequence, [n, heads, d] in q's dtype.
at::Tensor decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots,
                            at::Tensor lengths, double scale) {
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) && q.is_contiguous() && q.dim() == 3,
              "q must be contiguous [n, heads, d] fp32 or bf16");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches must share a dtype");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16,
              "KV cache must be fp32 or bf16");
  TORCH_CHECK(q.size(2) % kLanes == 0 && k_cache.size(2) == q.size(2), "head_dim must match and be a multiple of ", kLanes);
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  const auto lens = checked_lengths(lengths, slots, q.size(0));

  const float s = static_cast<float>(scale);
#if defined(__AVX512BF16__)
  if (q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 && q.size(2) % (2 * kLanes) == 0) {
    auto out = at::empty_like(q);
    const int64_t heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1), width = slots.size(1);
    const auto* q_data = q.data_ptr<at::BFloat16>();
    const auto* k_data = k_cache.data_ptr<at::BFloat16>();
    const auto* v_data = v_cache.data_ptr<at::BFloat16>();
    const int64_t* slot_data = slots.data_ptr<int64_t>();
    auto* out_data = out.data_ptr<at::BFloat16>();
    dynamic_for(q.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t seq = begin; seq < end; ++seq)
        attend_bf16(q_data + seq * heads * dim, k_data, v_data, slot_data + seq * width, lens[seq], kv_heads,
                    heads / kv_heads, dim, s, out_data + seq * heads * dim);
    });
    return out;
  }
#endif
  auto q_float = q.to(at::kFloat).contiguous();
  auto out = at::empty_like(q_float);
  if (k_cache.scalar_type() == at::kFloat) {
    attend_all<float>(q_float, k_cache, v_cache, slots, lens, s, out);
  } else {
    attend_all<at::BFloat16>(q_float, k_cache, v_cache, slots, lens, s, out);
  }
  return out.to(q.scalar_type());
}

// MLA's absorbed decode: q [n, heads, W] (latent-space queries then rope queries) fp32 or bf16;
// latent [slots, W] (the normed latent then the rope key) fp32 or bf16; slots [n, L] int64 and
// lengths [n] as above. Every head attends over the one latent row of each position, whose first
// v_dim values are also its value. Returns [n, heads, v_dim] in q's dtype.
at::Tensor mla_decode_attention(at::Tensor q, at::Tensor latent, at::Tensor slots, at::Tensor lengths, int64_t v_dim,
                                double scale) {
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) && q.dim() == 3,
              "q must be [n, heads, W] fp32 or bf16");
  TORCH_CHECK(latent.is_contiguous() && latent.dim() == 2 &&
                  (latent.scalar_type() == at::kFloat || latent.scalar_type() == at::kBFloat16),
              "the latent cache must be contiguous [slots, W] fp32 or bf16");
  const int64_t width = latent.size(1);
  TORCH_CHECK(q.size(2) == width && width % kLanes == 0, "q and the latent cache must be W wide, W a multiple of ", kLanes);
  TORCH_CHECK(v_dim > 0 && v_dim <= width && v_dim % kLanes == 0, "v_dim must be in (0, W] and a multiple of ", kLanes);
  const auto lens = checked_lengths(lengths, slots, q.size(0));
  auto q_float = q.to(at::kFloat).contiguous();
  const int64_t seqs = q.size(0), heads = q.size(1), L = slots.size(1);
  auto out = at::empty({seqs, heads, v_dim}, q_float.options());
  const float s = static_cast<float>(scale);
  const float* q_data = q_float.data_ptr<float>();
  const int64_t* slot_data = slots.data_ptr<int64_t>();
  float* out_data = out.data_ptr<float>();
  dynamic_for(seqs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t seq = begin; seq < end; ++seq) {
      const float* query = q_data + seq * heads * width;
      float* dst = out_data + seq * heads * v_dim;
      if (latent.scalar_type() == at::kFloat)
        attend_latent<float>(query, latent.data_ptr<float>(), slot_data + seq * L, lens[seq], heads, width, v_dim, s, dst);
      else
        attend_latent<at::BFloat16>(query, latent.data_ptr<at::BFloat16>(), slot_data + seq * L, lens[seq], heads, width,
                                    v_dim, s, dst);
    }
  });
  return out.to(q.scalar_type());
}

}  // namespace expertmesh
