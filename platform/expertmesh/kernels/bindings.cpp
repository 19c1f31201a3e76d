// Python bindings of the native CPU kernels (see __init__.py for how they are built).
#include <torch/extension.h>

namespace expertmesh {
at::Tensor fused_experts(at::Tensor hidden, at::Tensor offsets, at::Tensor gate_up, at::Tensor down,
                         at::Tensor row_weights);
std::vector<at::Tensor> pack_experts(at::Tensor gate_up, at::Tensor down);
at::Tensor decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots,
                            at::Tensor lengths, double scale);
at::Tensor mla_decode_attention(at::Tensor q, at::Tensor latent, at::Tensor slots, at::Tensor lengths, int64_t v_dim,
                                double scale);
at::Tensor small_linear(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias);
at::Tensor pack_linear(at::Tensor weight);
bool has_bf16_dot();
at::Tensor packed_linear(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias);
at::Tensor silu_and_mul(at::Tensor gate_up);
at::Tensor argmax_rows(at::Tensor x);
std::vector<at::Tensor> rms_norm(at::Tensor x, at::Tensor weight, double eps, c10::optional<at::Tensor> delta);
void rotary_qkv(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t kv_heads, int64_t dim,
                c10::optional<at::Tensor> k_cache, c10::optional<at::Tensor> v_cache, c10::optional<at::Tensor> slots);
std::vector<at::Tensor> moe_dispatch(at::Tensor hidden, at::Tensor expert_ids, at::Tensor weights,
                                     int64_t num_experts);
at::Tensor moe_combine(at::Tensor routed, at::Tensor rows_of, c10::optional<at::Tensor> shared);
bool has_tile_linear();
at::Tensor pack_tile_linear(at::Tensor weight);
at::Tensor tile_linear(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias);
}  // namespace expertmesh

// Every kernel releases the GIL while it runs, as torch's own ops do: a server's event loop
// (requests arriving, tokens leaving) keeps running during a step's long matmuls.
using ReleaseGil = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_experts", &expertmesh::fused_experts, "SwiGLU experts over rows sorted by expert", ReleaseGil());
  m.def("pack_experts", &expertmesh::pack_experts, "expert weights in fused_experts' job order (contiguous blocks)", ReleaseGil());
  m.def("moe_dispatch", &expertmesh::moe_dispatch, "rows sorted by expert (stable), their weights, tokens, counts, and each assignment's row", ReleaseGil());
  m.def("moe_combine", &expertmesh::moe_combine, "each token's expert rows summed (+ shared), as index_add_ sums them", ReleaseGil(),
        py::arg("routed"), py::arg("rows_of"), py::arg("shared") = py::none());
  m.def("decode_attention", &expertmesh::decode_attention, "one-token attention read from the paged KV cache", ReleaseGil());
  m.def("mla_decode_attention", &expertmesh::mla_decode_attention,
        "MLA's absorbed one-token attention read from the paged latent cache", ReleaseGil());
  m.def("small_linear", &expertmesh::small_linear, "x W^T (+ b) for a few rows, W as nn.Linear stores it", ReleaseGil(),
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("pack_linear", &expertmesh::pack_linear, "an [N, K] weight in packed_linear's column-block layout", ReleaseGil());
  m.def("packed_linear", &expertmesh::packed_linear, "x W^T (+ b) for a few rows, W packed by pack_linear", ReleaseGil(),
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none());
  m.def("has_tile_linear", &expertmesh::has_tile_linear, "whether fp32 linears can run on AMX (CPU and OS)");
  m.def("pack_tile_linear", &expertmesh::pack_tile_linear, "an fp32 [N, K] weight split into bf16 hi/mid/lo tiles for tile_linear", ReleaseGil());
  m.def("tile_linear", &expertmesh::tile_linear, "x W^T (+ b) in fp32 on AMX (bf16x6), W packed by pack_tile_linear", ReleaseGil(),
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none());
  m.def("has_bf16_dot", &expertmesh::has_bf16_dot, "whether bf16 weights can be packed (AVX512-BF16)");
  m.def("silu_and_mul", &expertmesh::silu_and_mul, "silu(gate) * up of [T, 2I] (gate, up) rows, [T, I] contiguous", ReleaseGil());
  m.def("argmax_rows", &expertmesh::argmax_rows, "each row's argmax of [T, V] fp32 (first on ties, NaN wins)", ReleaseGil());
  m.def("rms_norm", &expertmesh::rms_norm, "RMSNorm of x, or of x + delta (returned first)", ReleaseGil(), py::arg("x"),
        py::arg("weight"), py::arg("eps"), py::arg("delta") = py::none());
  m.def("rotary_qkv", &expertmesh::rotary_qkv, "RoPE on qkv's q and k heads in place, and the KV cache write", ReleaseGil(),
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("heads"), py::arg("kv_heads"), py::arg("dim"),
        py::arg("k_cache") = py::none(), py::arg("v_cache") = py::none(), py::arg("slots") = py::none());
}
