// Decode attention straight from the paged KV cache.
//
// Each decoding sequence has one query token. The torch path first gathers every
// sequence's K and V into a padded [n, L] copy and then runs SDPA over it, touching
// the cache twice and the padding too; here each sequence's job reads its own cache
// slots once, whole rows (every KV head) at a time, for all the query heads.

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"

namespace expertmesh {
namespace {

// One sequence, every head. Position by position it reads the whole cache row (all KV
// heads, contiguous; a 16-slot block is one contiguous run), so the hardware prefetcher
// streams K and V instead of striding through them one KV head at a time.
template <typename KV>
void attend(const float* q, const KV* k_cache, const KV* v_cache, const int64_t* slots, int64_t length,
            int64_t kv_heads, int64_t group, int64_t dim, float scale, float* out) {
  const int64_t vectors = dim / kLanes, heads = kv_heads * group;
  const int64_t row = kv_heads * dim;  // one cache slot holds every KV head
  std::vector<float> scores(heads * length);  // [head, position]
  for (int64_t j = 0; j < length; ++j) {
    const KV* key_row = k_cache + slots[j] * row;
    for (int64_t h = 0; h < heads; ++h) {
      const KV* key = key_row + (h / group) * dim;
      const float* query = q + h * dim;
      v16 acc{};
      for (int64_t v = 0; v < vectors; ++v) acc += load(query + v * kLanes) * load(key + v * kLanes);
      scores[h * length + j] = sum_lanes(acc) * scale;
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores.data() + h * length;
    float peak = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < length; ++j) peak = std::max(peak, s[j]);
    float total = 0.0f;
    for (int64_t j = 0; j < length; ++j) total += (s[j] = std::exp(s[j] - peak));
    const float inverse = 1.0f / total;
    for (int64_t j = 0; j < length; ++j) s[j] *= inverse;
  }
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
