// MoE dispatch and combine: the bookkeeping on either side of the expert kernel, one call each.
//
// A decode step of the small Qwen2-MoE spent about 0.2 ms a layer here in torch's small ops.
// moe_dispatch replaces argsort, floor_divide, bincount, index_select and the weight gather:
// a stable counting sort of the (token, choice) assignments by expert (E is tens, k a few),
// then the row gather. moe_combine replaces zeros_like, index_add_ and the shared expert's
// add: each token sums its expert rows in the order index_add_ visits them (row order), in
// fp32, and rounds where torch rounds (once after the rows, as bf16 index_add_ does, then
// after the shared expert's add), so the result is torch's bit for bit, fp32 and bf16.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "simd.h"

namespace expertmesh {
namespace {

constexpr int64_t kRowsPerJob = 8;
constexpr int64_t kMaxChoices = 64;  // k, the experts per token; MoE models use 1-16

template <typename T>
void combine_rows(const T* routed, const int64_t* rows_of, const T* shared, int64_t tokens, int64_t k, int64_t hidden,
                  T* out) {
  dynamic_for(tokens, kRowsPerJob, [&](int64_t begin, int64_t end) {
    int64_t rows[kMaxChoices];
    for (int64_t t = begin; t < end; ++t) {
      std::copy(rows_of + t * k, rows_of + (t + 1) * k, rows);
      std::sort(rows, rows + k);  // index_add_'s order: the batch's row order
      T* dst = out + t * hidden;
      for (int64_t c = 0; c < hidden; c += kLanes) {
        vec acc{};
        for (int64_t j = 0; j < k; ++j) acc += load(routed + rows[j] * hidden + c);
        acc = as_stored<T>(acc);
        if (shared != nullptr) acc = as_stored<T>(acc + load(shared + t * hidden + c));
        store(dst + c, acc);
      }
    }
  });
}

}  // namespace

// hidden [T, H], expert_ids [T, k] int64, weights [T, k] -> the rows sorted by expert (stable):
// (rows [T k, H], their weights [T k], their tokens [T k] int64, rows per expert [E] int64,
// the row of each assignment [T, k] int64, for moe_combine).
std::vector<at::Tensor> moe_dispatch(at::Tensor hidden, at::Tensor expert_ids, at::Tensor weights,
                                     int64_t num_experts) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [T, H] tensor");
  TORCH_CHECK(expert_ids.dim() == 2 && expert_ids.is_contiguous() && expert_ids.scalar_type() == at::kLong &&
                  expert_ids.size(0) == hidden.size(0),
              "expert_ids must be a contiguous [T, k] int64 tensor");
  TORCH_CHECK(weights.sizes() == expert_ids.sizes() && weights.is_contiguous(),
              "weights must be contiguous, of expert_ids' shape");
  TORCH_CHECK(num_experts > 0, "num_experts must be positive");
  const int64_t tokens = hidden.size(0), k = expert_ids.size(1), n = tokens * k;
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  auto counts = at::zeros({num_experts}, expert_ids.options());
  int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < num_experts, "expert id ", ids[i], " is outside [0, ", num_experts, ")");
    ++count[ids[i]];
  }
  std::vector<int64_t> next(num_experts);
  for (int64_t e = 0, start = 0; e < num_experts; start += count[e], ++e) next[e] = start;

  auto rows_of = at::empty({tokens, k}, expert_ids.options());
  auto token_index = at::empty({n}, expert_ids.options());
  auto sorted_weights = at::empty({n}, weights.options());
  int64_t* row_of = rows_of.data_ptr<int64_t>();
  int64_t* token_of = token_index.data_ptr<int64_t>();
  const auto* weight_bytes = static_cast<const char*>(weights.data_ptr());
  auto* sorted_weight_bytes = static_cast<char*>(sorted_weights.data_ptr());
  const int64_t weight_size = weights.element_size();
  for (int64_t i = 0; i < n; ++i) {  // in assignment order: stable
    const int64_t row = next[ids[i]]++;
    row_of[i] = row;
    token_of[row] = i / k;
    std::memcpy(sorted_weight_bytes + row * weight_size, weight_bytes + i * weight_size, weight_size);
  }

  // 16 rows to spare after the last: the fused experts' tile jobs may read 15 rows past it
  // (tiles::readable_rows), and take these rows as they are instead of a padded copy.
  auto sorted = at::empty({n + 16, hidden.size(1)}, hidden.options()).narrow(0, 0, n);
  const int64_t row_bytes = hidden.size(1) * hidden.element_size();
  const auto* src = static_cast<const char*>(hidden.data_ptr());
  auto* dst = static_cast<char*>(sorted.data_ptr());
  dynamic_for(n, 4 * kRowsPerJob, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) std::memcpy(dst + row * row_bytes, src + token_of[row] * row_bytes, row_bytes);
  });
  return {sorted, sorted_weights, token_index, counts, rows_of};
}

// routed [T k, H] (expert outputs in moe_dispatch's row order), rows_of [T, k] from moe_dispatch,
// shared [T, H] or none -> [T, H]: each token's expert rows summed (+ shared), as
// zeros_like(x).index_add_(0, token_index, routed) (+= shared) gives it.
at::Tensor moe_combine(at::Tensor routed, at::Tensor rows_of, c10::optional<at::Tensor> shared) {
  TORCH_CHECK(routed.dim() == 2 && routed.is_contiguous(), "routed must be a contiguous [T k, H] tensor");
  TORCH_CHECK(routed.scalar_type() == at::kFloat || routed.scalar_type() == at::kBFloat16, "routed must be fp32 or bf16");
  TORCH_CHECK(routed.size(1) % kLanes == 0, "the hidden size must be a multiple of ", kLanes);
  TORCH_CHECK(rows_of.dim() == 2 && rows_of.is_contiguous() && rows_of.scalar_type() == at::kLong &&
                  rows_of.numel() == routed.size(0) && rows_of.size(1) <= kMaxChoices,
              "rows_of must be moe_dispatch's contiguous [T, k] int64 rows, k <= ", kMaxChoices);
  const int64_t tokens = rows_of.size(0), k = rows_of.size(1), hidden = routed.size(1);
  const int64_t* row_of = rows_of.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens * k; ++i) {
    TORCH_CHECK(row_of[i] >= 0 && row_of[i] < routed.size(0), "rows_of holds row ", row_of[i], " of ", routed.size(0));
  }
  if (shared.has_value()) {
    TORCH_CHECK(shared->is_contiguous() && shared->dim() == 2 && shared->size(0) == tokens &&
                    shared->size(1) == hidden && shared->scalar_type() == routed.scalar_type(),
                "shared must be a contiguous [T, H] tensor of routed's dtype");
  }
  auto out = at::empty({tokens, hidden}, routed.options());
  if (routed.scalar_type() == at::kFloat) {
    combine_rows(routed.data_ptr<float>(), row_of, shared ? shared->data_ptr<float>() : nullptr, tokens, k, hidden,
                 out.data_ptr<float>());
  } else {
    combine_rows(routed.data_ptr<at::BFloat16>(), row_of, shared ? shared->data_ptr<at::BFloat16>() : nullptr,
                 tokens, k, hidden, out.data_ptr<at::BFloat16>());
  }
  return out;
}

}  // namespace expertmesh
