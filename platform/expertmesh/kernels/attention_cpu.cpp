// Decode attention straight from the paged KV cache.
//
// Each decoding sequence has one query token. The torch path first gathers every
// sequence's K and V into a padded [n, L] copy and then runs SDPA over it, touching
// the cache twice and the padding too; here each (sequence, KV head) job reads its
// own cache slots once, for all the query heads that share that KV head.

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"

namespace expertmesh {
namespace {

template <typename KV>
void attend(const float* q, const KV* k_cache, const KV* v_cache, const int64_t* slots, int64_t length,
            int64_t kv_head, int64_t kv_heads, int64_t group, int64_t dim, float scale, float* out) {
  const int64_t vectors = dim / kLanes;
  const int64_t row = kv_heads * dim;  // one cache slot holds every KV head
  std::vector<float> scores(group * length);
  for (int64_t j = 0; j < length; ++j) {
    const KV* key = k_cache + slots[j] * row + kv_head * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* query = q + g * dim;
      v16 acc{};
      for (int64_t v = 0; v < vectors; ++v) acc += load(query + v * kLanes) * load(key + v * kLanes);
      scores[g * length + j] = sum_lanes(acc) * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * length;
    float peak = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < length; ++j) peak = std::max(peak, s[j]);
    float total = 0.0f;
    for (int64_t j = 0; j < length; ++j) total += (s[j] = std::exp(s[j] - peak));
    for (int64_t j = 0; j < length; ++j) s[j] /= total;
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t v = 0; v < vectors; ++v) store(out + g * dim + v * kLanes, v16{});
  for (int64_t j = 0; j < length; ++j) {
    const KV* value = v_cache + slots[j] * row + kv_head * dim;
    for (int64_t v = 0; v < vectors; ++v) {
      const v16 x = load(value + v * kLanes);
      for (int64_t g = 0; g < group; ++g) {
        float* dst = out + g * dim + v * kLanes;
        store(dst, load(dst) + broadcast(scores[g * length + j]) * x);
      }
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
  dynamic_for(seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t seq = job / kv_heads, kv_head = job % kv_heads;
      const int64_t first_head = seq * heads + kv_head * group;  // query heads sharing this KV head
      attend<KV>(q_data + first_head * dim, k_data, v_data, slot_data + seq * width, lengths[seq], kv_head,
                 kv_heads, group, dim, scale, out_data + first_head * dim);
    }
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
