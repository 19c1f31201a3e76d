// Decode attention straight from the paged KV cache.
//
// Each decoding sequence has one query token. The torch path first gathers every
// sequence's K and V into a padded [n, L] copy and then runs SDPA over it, touching
// the cache twice and the padding too; here each sequence's job reads its own cache
// slots once, whole rows (every KV head) at a time, for all the query heads, so the
// hardware prefetcher streams K and V from memory. Scores are summed across lanes in a
// halving tree and the softmax runs on the vector exp: for 32 sequences of 130-192
// positions with the cache in memory (not L3), 244-264 us against 420 with lane-by-lane
// sums and std::exp. Holding each head's query and output in registers and reading the
// rows head by head was faster only while the cache fit in L3 (175 against 386 us), and
// slower from memory (370 us): it reads each row in 256-byte pieces.

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "simd.h"

namespace expertmesh {
namespace {

// The 16 lanes' sum in four halving steps: a score needs one per (position, head), and
// summing lane by lane (sum_lanes, in order) is a chain of 16 dependent adds.
inline float tree_sum(v16 v) {
  typedef int32_t lanes __attribute__((vector_size(64)));
  v += __builtin_shuffle(v, lanes{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, lanes{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, lanes{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, lanes{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// softmax over s[0, n), 16 lanes at a time (the vector exp; std::exp for the last n % 16).
void softmax_in_place(float* s, int64_t n) {
  const int64_t whole = n / kLanes * kLanes;
  const float peak = max_of(s, n);
  const v16 peaks = broadcast(peak);
  v16 totals{};
  for (int64_t j = 0; j < whole; j += kLanes) {
    const v16 e = exp(load(s + j) - peaks);
    store(s + j, e);
    totals += e;
  }
  float total = sum_lanes(totals);
  for (int64_t j = whole; j < n; ++j) total += (s[j] = std::exp(s[j] - peak));
  const float inverse = 1.0f / total;
  const v16 inverses = broadcast(inverse);
  for (int64_t j = 0; j < whole; j += kLanes) store(s + j, load(s + j) * inverses);
  for (int64_t j = whole; j < n; ++j) s[j] *= inverse;
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
    const KV* key_row = k_cache + slots[j] * row;
    for (int64_t h = 0; h < heads; ++h) {
      const KV* key = key_row + (h / group) * dim;
      const float* query = q + h * dim;
      v16 acc{};
      for (int64_t v = 0; v < vectors; ++v) acc += load(query + v * kLanes) * load(key + v * kLanes);
      scores[h * length + j] = tree_sum(acc) * scale;
    }
  }
  for (int64_t h = 0; h < heads; ++h) softmax_in_place(scores.data() + h * length, length);
  for (int64_t i = 0; i < heads * vectors; ++i) store(out + i * kLanes, v16{});
  for (int64_t j = 0; j < length; ++j) {
    const KV* value_row = v_cache + slots[j] * row;
    for (int64_t h = 0; h < heads; ++h) {
      const KV* value = value_row + (h / group) * dim;
      const v16 weight = broadcast(scores[h * length + j]);
      float* dst = out + h * dim;
      for (int64_t v = 0; v < vectors; ++v) store(dst + v * kLanes, load(dst + v * kLanes) + weight * load(value + v * kLanes));
    }
  }
}

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

}  // namespace

// q [n, heads, d] fp32; k_cache, v_cache [slots, kv_heads, d] fp32 or bf16; slots [n, L] int64,
// the cache slot of each context position (padded past lengths[i]); lengths [n].
// Returns softmax(q k^T * scale) v per sequence, [n, heads, d] fp32.
at::Tensor decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots,
                            at::Tensor lengths, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "q must be contiguous [n, heads, d] fp32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches must share a dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.size(0) == q.size(0),
              "slots must be contiguous int64 [n, L]");
  TORCH_CHECK(q.size(2) % kLanes == 0 && k_cache.size(2) == q.size(2), "head_dim must match and be a multiple of 16");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  auto lengths_cpu = lengths.to(at::kLong).contiguous();
  std::vector<int64_t> lens(lengths_cpu.data_ptr<int64_t>(), lengths_cpu.data_ptr<int64_t>() + lengths_cpu.numel());
  TORCH_CHECK(static_cast<int64_t>(lens.size()) == q.size(0), "one length per sequence");
  for (int64_t n : lens) TORCH_CHECK(n >= 1 && n <= slots.size(1), "lengths must be in [1, L]");

  auto out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  if (k_cache.scalar_type() == at::kFloat) {
    attend_all<float>(q, k_cache, v_cache, slots, lens, s, out);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16, "KV cache must be fp32 or bf16");
    attend_all<at::BFloat16>(q, k_cache, v_cache, slots, lens, s, out);
  }
  return out;
}

}  // namespace expertmesh
