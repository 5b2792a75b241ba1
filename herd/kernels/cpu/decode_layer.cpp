// One Llama 4 decoder layer for a CPU decode step of a few sequences, as one op.
//
// At one token a step, the demo model's and tiny's layers are a few dozen small ops each; their weights are read in
// microseconds, and Python around each op (module calls, views, casts, the router's topk and sigmoid) cost about as
// much as the kernels. This op runs the same ops in the same order from C++: herd's kernels through the dispatcher
// and ATen for the glue, so every result is rounded where the Python layer rounds it (the test compares the two bit
// for bit). It serves bf16 weights on herd's GEMV, one row per sequence, attention on herd's paged decode kernel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> herd_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w) {
  static const auto op = herd_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("herd_cpu::gemv_bf16");
  return op.call(x, w);
}

at::Tensor norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  static const auto op =
      herd_op<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, double)>("herd_cpu::rms_norm");
  return op.call(x, w, eps);
}

at::Tensor swiglu(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& gate_up, const at::Tensor& down) {
  static const auto op =
      herd_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "herd_cpu::swiglu_experts_bf16");
  return op.call(x, ids, gate_up, down);
}

at::Tensor rope_qk_norm(const at::Tensor& qk, const at::Tensor& angles, bool rope, bool qk_norm, double eps) {
  static const auto op = herd_op<at::Tensor(const at::Tensor&, const at::Tensor&, bool, bool, double)>(
      "herd_cpu::rope_qk_norm");
  return op.call(qk, angles, rope, qk_norm, eps);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& table, const at::Tensor& offsets, const at::Tensor& lengths,
                            double scale) {
  static const auto op = herd_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
      "herd_cpu::paged_decode_attention");
  return op.call(q, k_cache, v_cache, table, offsets, lengths, scale);
}

// x [T, H] bf16, the residual stream before the layer; returns it after the layer.
// weights: input norm [H], qkv [(nq + 2 nkv) D, H], o [H, nq D], post-attention norm [H], then the feed-forward:
//   MoE (5): router [E, H], experts' gate_up [E, 2I, H] and down [E, H, I], shared expert's gate_up [1, 2I, H] and
//   down [1, H, I]; dense (2): gate_up [1, 2I, H], down [1, H, I].
// dims: heads, kv heads, head_dim, rope, qk-norm (0/1). q_scale: NoPE layers' temperature per token, fp32 [T].
// The attention arguments are the paged decode kernel's, and `slots` where this step's K and V go.
at::Tensor decode_layer_bf16(const at::Tensor& x, const at::Tensor& angles, const std::optional<at::Tensor>& q_scale,
                             at::TensorList weights, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& slots, const at::Tensor& table, const at::Tensor& offsets,
                             const at::Tensor& lengths, at::IntArrayRef dims, double scale, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "decode_layer_bf16: x must be a bf16 [T, H]");
  TORCH_CHECK(weights.size() == 9 || weights.size() == 6,
              "decode_layer_bf16: 4 attention weights and 5 (MoE) or 2 (dense) feed-forward ones, got ",
              weights.size());
  TORCH_CHECK(dims.size() == 5, "decode_layer_bf16: dims must be heads, kv_heads, head_dim, rope, qk_norm");
  const int64_t tokens = x.size(0), heads = dims[0], kv_heads = dims[1], head_dim = dims[2];
  const bool rope = dims[3] != 0, qk_norm = dims[4] != 0;
  const at::Tensor qkv = gemv(norm(x, weights[0], eps), weights[1]);
  const int64_t q_kv = (heads + kv_heads) * head_dim;
  TORCH_CHECK(qkv.size(1) == q_kv + kv_heads * head_dim, "decode_layer_bf16: qkv has ", qkv.size(1),
              " outputs, the heads need ", q_kv + kv_heads * head_dim);
  at::Tensor qk = qkv.narrow(1, 0, q_kv).view({tokens, heads + kv_heads, head_dim});
  const at::Tensor v = qkv.narrow(1, q_kv, kv_heads * head_dim).view({tokens, kv_heads, head_dim});
  if (rope || qk_norm) qk = rope_qk_norm(qk, angles, rope, qk_norm, eps);
  at::Tensor q = qk.narrow(1, 0, heads);
  const at::Tensor k = qk.narrow(1, heads, kv_heads);
  if (q_scale.has_value()) q = (q * q_scale->view({tokens, 1, 1})).to(x.scalar_type());
  k_cache.view({-1, kv_heads, head_dim}).index_copy_(0, slots, k);
  v_cache.view({-1, kv_heads, head_dim}).index_copy_(0, slots, v);
  const at::Tensor attn = decode_attention(q, k_cache, v_cache, table, offsets, lengths, scale);
  const at::Tensor mid = x + gemv(attn.flatten(1), weights[2]);
  const at::Tensor h = norm(mid, weights[3], eps);
  const at::Tensor first_expert = at::zeros({tokens}, x.options().dtype(at::kLong));
  if (weights.size() == 6) return mid + swiglu(h, first_expert, weights[4], weights[5]);
  // Llama 4's MoE, one expert per token: the router's sigmoid scales the expert's input.
  const auto [top_logits, top_ids] = at::topk(gemv(h, weights[4]), 1, -1);
  const at::Tensor scores = at::sigmoid(top_logits.to(at::kFloat)).to(x.scalar_type());
  const at::Tensor routed = swiglu(h * scores, top_ids.reshape({-1}), weights[5], weights[6]);
  return mid + (swiglu(h, first_expert, weights[7], weights[8]) + routed);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) {
  m.def(
      "decode_layer_bf16(Tensor x, Tensor angles, Tensor? q_scale, Tensor[] weights, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slots, Tensor table, Tensor offsets, Tensor lengths, int[] dims, float scale, "
      "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) { m.impl("decode_layer_bf16", &decode_layer_bf16); }
