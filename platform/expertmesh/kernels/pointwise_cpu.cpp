// Row-wise ops that torch runs as several passes over memory, each here one pass.
//
// argmax_rows: torch's argmax of a [32, 16384] logits block took 0.4 ms on these 2 cores,
// about 1 % of a decode step; here it is two vector passes over each (cache-warm) row.
//
// silu_and_mul: torch's version is silu_ on the gate half, mul_ by the up half, and then
// a strided copy to make the result contiguous for the next linear: at prefill sizes the
// copy alone cost more than the two ops. rms_norm (with the residual add before it, when
// given) replaces six ops: float, pow, mean, rsqrt, mul, mul. rotary_qkv replaces two
// rotary applications (six ops each) and the two index_copy_ calls of the KV-cache write.
//
// fp32 and bf16. bf16 results round where torch's ops round, at each op's output.

#include <ATen/Parallel.h>

#include <cmath>

#include "simd.h"

namespace expertmesh {
namespace {

constexpr int64_t kRowsPerJob = 8;

// fn(T{}) with T the C++ type of `dtype`, fp32 or bf16 (checked by the caller).
template <typename F>
void with_row_type(at::ScalarType dtype, const F& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else {
    fn(at::BFloat16{});
  }
}

// Pointer to t's data as T, or nullptr for an absent tensor.
template <typename T>
T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
void silu_and_mul_rows(const T* gate_up, int64_t rows, int64_t inter, T* out) {
  dynamic_for(rows, kRowsPerJob, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * inter;
      const T* up = gate + inter;
      T* dst = out + r * inter;
      for (int64_t c = 0; c < inter; c += kLanes) {
        store(dst + c, as_stored<T>(as_stored<T>(silu(load(gate + c))) * load(up + c)));
      }
    }
  });
}

// out = weight * (x / rms(x)); with a residual, x is residual + delta, also returned.
template <typename T>
void rms_norm_rows(const T* x, const T* delta, const T* weight, int64_t rows, int64_t hidden, float eps, T* sum_out,
                   T* out) {
  dynamic_for(rows, kRowsPerJob, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = x + r * hidden;
      const T* add = delta ? delta + r * hidden : nullptr;
      T* summed = sum_out ? sum_out + r * hidden : nullptr;
      vec squares{};
      for (int64_t c = 0; c < hidden; c += kLanes) {
        vec v = load(src + c);
        if (add) {
          v = as_stored<T>(v + load(add + c));
          store(summed + c, v);
        }
        squares += v * v;
      }
      const vec scale = broadcast(1.0f / std::sqrt(sum_lanes(squares) / hidden + eps));
      const T* normed_src = add ? summed : src;
      for (int64_t c = 0; c < hidden; c += kLanes) {
        store(out + r * hidden + c, as_stored<T>(load(weight + c) * as_stored<T>(load(normed_src + c) * scale)));
      }
    }
  });
}

// Rotate one head in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) over its two halves
// (rotate_half RoPE, cos/sin rows already in the model's dtype), rounded like torch's
// x * cos + rotate_half(x) * sin.
template <typename T>
void rotate_head(T* x, const T* cos, const T* sin, int64_t half) {
  for (int64_t i = 0; i < half; i += kLanes) {
    const vec a = load(x + i), b = load(x + half + i);
    const vec first = as_stored<T>(as_stored<T>(a * load(cos + i)) - as_stored<T>(b * load(sin + i)));
    const vec second = as_stored<T>(as_stored<T>(b * load(cos + half + i)) + as_stored<T>(a * load(sin + half + i)));
    store(x + i, first);
    store(x + half + i, second);
  }
}

template <typename T>
void copy_row(const T* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; i += kLanes) store(dst + i, load(src + i));
}

template <typename T>
void rotary_rows(T* qkv, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim,
                 T* k_cache, T* v_cache, const int64_t* slots) {
  const int64_t width = (heads + 2 * kv_heads) * dim, kv_width = kv_heads * dim;
  dynamic_for(rows, kRowsPerJob, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = qkv + r * width;
      for (int64_t h = 0; h < heads + kv_heads; ++h) rotate_head(row + h * dim, cos + r * dim, sin + r * dim, dim / 2);
      if (slots != nullptr) {
        copy_row(row + heads * dim, kv_width, k_cache + slots[r] * kv_width);
        copy_row(row + heads * dim + kv_width, kv_width, v_cache + slots[r] * kv_width);
      }
    }
  });
}

// Index of a row's largest value, the first on ties; the first NaN wins, as in torch.argmax.
int64_t argmax_row(const float* x, int64_t n) {
  bool nan = false;
  const float best = max_of(x, n, &nan);
  for (int64_t i = 0; i < n; ++i) {
    if (nan ? std::isnan(x[i]) : x[i] == best) return i;
  }
  return 0;  // all -inf: the first
}

void check_rows(const at::Tensor& t, const char* name, int64_t width_multiple) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, " must be fp32 or bf16");
  TORCH_CHECK(t.size(1) % width_multiple == 0, name, "'s last dimension must be a multiple of ", width_multiple);
}

}  // namespace

// gate_up [T, 2I] (gate columns, then up columns) -> silu(gate) * up, [T, I] contiguous.
at::Tensor silu_and_mul(at::Tensor gate_up) {
  check_rows(gate_up, "gate_up", 2 * kLanes);
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = at::empty({rows, inter}, gate_up.options());
  with_row_type(gate_up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_rows(gate_up.data_ptr<T>(), rows, inter, out.data_ptr<T>());
  });
  return out;
}

// x [T, V] fp32 -> [T] int64: each row's argmax.
at::Tensor argmax_rows(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "x must be a contiguous, non-empty [T, V] fp32 tensor");
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* rows = x.data_ptr<float>();
  int64_t* index = out.data_ptr<int64_t>();
  const int64_t n = x.size(1);
  dynamic_for(x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) index[r] = argmax_row(rows + r * n, n);
  });
  return out;
}

// RMSNorm of x [T, H] with weight [H]; given `delta`, of x + delta, which is returned first.
std::vector<at::Tensor> rms_norm(at::Tensor x, at::Tensor weight, double eps, c10::optional<at::Tensor> delta) {
  check_rows(x, "x", kLanes);
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [H] tensor of x's dtype");
  c10::optional<at::Tensor> summed;
  if (delta.has_value()) {
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->is_contiguous() && delta->scalar_type() == x.scalar_type(),
                "delta must be contiguous, of x's shape and dtype");
    summed = at::empty_like(x);
  }
  auto out = at::empty_like(x);
  with_row_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows(x.data_ptr<T>(), data_or_null<T>(delta), weight.data_ptr<T>(), x.size(0), x.size(1),
                  static_cast<float>(eps), data_or_null<T>(summed), out.data_ptr<T>());
  });
  if (summed.has_value()) return {*summed, out};
  return {out};
}

// RoPE on the q and k heads of qkv [T, (heads + 2 kv_heads) * dim], in place (cos, sin:
// [T, dim] rows of the model's dtype); with a cache, also writes each token's k and v row
// to its slot of k_cache / v_cache [slots, kv_heads, dim].
void rotary_qkv(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t kv_heads, int64_t dim,
                c10::optional<at::Tensor> k_cache, c10::optional<at::Tensor> v_cache,
                c10::optional<at::Tensor> slots) {
  check_rows(qkv, "qkv", kLanes);
  TORCH_CHECK(dim % (2 * kLanes) == 0, "head_dim must be a multiple of ", 2 * kLanes);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv must hold heads + 2 kv_heads heads of head_dim");
  const int64_t rows = qkv.size(0);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->is_contiguous() && t->numel() == rows * dim && t->scalar_type() == qkv.scalar_type(),
                "cos and sin must be contiguous [T, head_dim] rows of qkv's dtype");
  }
  if (slots.has_value()) {
    TORCH_CHECK(k_cache && v_cache, "a cache write needs k_cache, v_cache and slots");
    for (const at::Tensor* t : {&*k_cache, &*v_cache}) {
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == qkv.scalar_type() && t->dim() == 3 &&
                      t->size(1) == kv_heads && t->size(2) == dim,
                  "the caches must be contiguous [slots, kv_heads, head_dim] of qkv's dtype");
    }
    TORCH_CHECK(slots->scalar_type() == at::kLong && slots->is_contiguous() && slots->numel() == rows,
                "slots must be T contiguous int64");
  } else {
    k_cache = v_cache = c10::nullopt;  // no slots, no write
  }
  with_row_type(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rotary_rows(qkv.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(), rows, heads, kv_heads, dim,
                data_or_null<T>(k_cache), data_or_null<T>(v_cache), data_or_null<int64_t>(slots));
  });
}

}  // namespace expertmesh
