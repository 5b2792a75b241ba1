// A CPU decode step of a few sequences through the Llama 4 text model, from the embedding to the final norm, as one op.
//
// At one token a step, a layer is a few dozen small ops; at the demo model's and tiny's sizes their weights are read
// in microseconds, and at scout-mini's in INT4 the Python around them still cost a quarter of a step. This op runs
// the modules' ops in the same order from C++: herd's kernels through the dispatcher, ATen for the router's topk and
// sigmoid and the quantized experts' SiLU product, plain loops for the adds, scalings and the KV write, every result
// rounded where the Python layer rounds it (the test compares the two bit for bit). Each linear layer is read by the
// kernel its method names (herd.layers.quantization.base.DecodeKernel: the codes below); activations are bf16, a few
// rows that each attend through herd's paged decode kernel, and the KV caches contiguous.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> herd_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// herd.layers.quantization.base.DecodeKernel, and how many tensors each reads.
enum Kernel : int64_t { kBf16 = 0, kInt4 = 1, kW8A8 = 2, kW8A16 = 3 };
constexpr int64_t kTensors[] = {1, 2, 3, 2};

// A linear layer's kernel and its tensors (a leading expert dimension on the experts').
struct Linear {
  int64_t kernel;
  at::ArrayRef<at::Tensor> tensors;
};

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w) {
  static const auto op = herd_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("herd_cpu::gemv_bf16");
  return op.call(x, w);
}

// x [T, in] through the layer (expert `expert` of stacked weights, or -1), as the layer's method calls its kernel.
at::Tensor linear(const at::Tensor& x, const Linear& layer, int64_t expert = -1) {
  using Tensor2 = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
  static const auto int8 = herd_op<Tensor2>("herd_cpu::gemv_int8");
  static const auto w8a8 = herd_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&)>("herd_cpu::w8a8_int8_linear");
  static const auto int4 =
      herd_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>("herd_cpu::w4a16_linear");
  const auto part = [&](size_t i) { return expert < 0 ? layer.tensors[i] : layer.tensors[i].select(0, expert); };
  switch (layer.kernel) {
    case kBf16: return gemv(x, part(0));
    case kInt4: {
      const at::Tensor packed = part(0), scales = part(1);
      return int4.call(x, packed, scales, packed.size(1) * 2 / scales.size(1));
    }
    case kW8A8: return w8a8.call(x, part(0), part(1), part(2));
    default: return int8.call(x, part(0), part(1));
  }
}

at::Tensor norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  static const auto op =
      herd_op<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, double)>("herd_cpu::rms_norm");
  return op.call(x, w, eps);
}

// Rows x [T, H] each through expert ids[t] of the stacked gate_up and down layers: down(silu(gate) * up).
at::Tensor experts(const at::Tensor& x, const at::Tensor& ids, const Linear& gate_up, const Linear& down) {
  static const auto bf16 =
      herd_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "herd_cpu::swiglu_experts_bf16");
  if (gate_up.kernel == kBf16 && down.kernel == kBf16) return bf16.call(x, ids, gate_up.tensors[0], down.tensors[0]);
  // As herd.layers.moe.grouped_experts: each expert once, on the rows that chose it. Every kernel computes a row
  // independently of the others, so the grouping leaves each row's result as it is.
  const auto mlp = [&](const at::Tensor& rows, int64_t e) {
    const at::Tensor both = linear(rows, gate_up, e);
    const int64_t inter = both.size(1) / 2;
    return linear(at::silu(both.narrow(1, 0, inter)) * both.narrow(1, inter, inter), down, e);
  };
  const int64_t tokens = x.size(0);
  const int64_t* idp = ids.data_ptr<int64_t>();
  if (std::all_of(idp, idp + tokens, [&](int64_t e) { return e == idp[0]; })) return mlp(x, idp[0]);
  at::Tensor out = at::empty_like(x);
  std::vector<int64_t> done;
  for (int64_t t = 0; t < tokens; ++t) {
    if (std::find(done.begin(), done.end(), idp[t]) != done.end()) continue;
    done.push_back(idp[t]);
    std::vector<int64_t> rows;
    for (int64_t u = t; u < tokens; ++u)
      if (idp[u] == idp[t]) rows.push_back(u);
    const at::Tensor index = at::tensor(rows, ids.options());
    out.index_copy_(0, index, mlp(x.index_select(0, index), idp[t]));
  }
  return out;
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

// a + b for bf16 tensors of one shape, rounded as ATen's add rounds (fp32 sum, then bf16): a new contiguous tensor
// without TensorIterator's setup, which costs more than the add at a decode step's few rows.
at::Tensor add_bf16(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty(a.sizes(), a.options());
  const auto* ap = ac.data_ptr<at::BFloat16>();
  const auto* bp = bc.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < out.numel(); ++i) op[i] = at::BFloat16(static_cast<float>(ap[i]) + static_cast<float>(bp[i]));
  return out;
}

// x [T, H] times a bf16 or fp32 factor per row [T], rounded to bf16 as ATen rounds the product.
at::Tensor scale_rows(const at::Tensor& x, const at::Tensor& factor) {
  const at::Tensor xc = x.contiguous(), f = factor.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), cols = x.numel() / std::max<int64_t>(rows, 1);
  const auto* xp = xc.data_ptr<at::BFloat16>();
  const float* fp = f.data_ptr<float>();
  auto* op = out.data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) op[r * cols + c] = at::BFloat16(static_cast<float>(xp[r * cols + c]) * fp[r]);
  return out;
}

// Rows [T, kv_heads, head_dim] (any strides, head_dim dense) into the slots of a [blocks, block_size, kv_heads,
// head_dim] cache, as index_copy_ over its [slots, kv_heads, head_dim] view.
void write_slots(const at::Tensor& cache, const at::Tensor& slots, const at::Tensor& rows) {
  TORCH_CHECK(cache.is_contiguous() && cache.scalar_type() == rows.scalar_type() && rows.stride(2) == 1,
              "decode_model_bf16: the KV cache must be contiguous and of the activations' dtype");
  const int64_t kv_heads = rows.size(1), head_dim = rows.size(2), count = cache.numel() / (kv_heads * head_dim);
  const at::Tensor ids = slots.to(at::kLong).contiguous();
  const int64_t* sp = ids.data_ptr<int64_t>();
  const auto* src = rows.data_ptr<at::BFloat16>();
  auto* dst = cache.data_ptr<at::BFloat16>();
  for (int64_t t = 0; t < rows.size(0); ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < count, "decode_model_bf16: slot ", sp[t], " of a cache of ", count);
    for (int64_t g = 0; g < kv_heads; ++g)
      std::copy_n(src + t * rows.stride(0) + g * rows.stride(1), head_dim, dst + (sp[t] * kv_heads + g) * head_dim);
  }
}

// How many weights a layer of these kernels has: its two norms' and each linear layer's tensors.
size_t layer_weights(at::IntArrayRef kernels) {
  size_t count = 2;
  for (const int64_t kernel : kernels) {
    TORCH_CHECK(kernel >= kBf16 && kernel <= kW8A16, "decode_model_bf16: unknown kernel ", kernel);
    count += kTensors[kernel];
  }
  return count;
}

// x [T, H] bf16, the residual stream before the layer; returns it after the layer.
// weights: the input norm [H] and the post-attention norm [H], then each linear layer's tensors, their kernels in
// `kernels`, in this order: qkv [(nq + 2 nkv) D, H], o [H, nq D], then the feed-forward: MoE (5): router [E, H],
// the experts' gate_up [E, 2I, H] and down [E, H, I], the shared expert's gate_up [1, 2I, H] and down [1, H, I];
// dense (2): gate_up [1, 2I, H], down [1, H, I]; the caller, decode_model_bf16, sliced them by layer_weights.
// dims: heads, kv heads, head_dim, rope, qk-norm (0/1). q_scale: NoPE layers' temperature per token, fp32 [T].
// The attention arguments are the paged decode kernel's, and `slots` where this step's K and V go.
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& angles, const std::optional<at::Tensor>& q_scale,
                        at::TensorList weights, at::IntArrayRef kernels, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& table,
                        const at::Tensor& offsets, const at::Tensor& lengths, at::IntArrayRef dims, double scale,
                        double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "decode_model_bf16: x must be a bf16 [T, H]");
  TORCH_CHECK(kernels.size() == 7 || kernels.size() == 4,
              "decode_model_bf16: 2 attention layers and 5 (MoE) or 2 (dense) feed-forward ones, got ",
              kernels.size());
  TORCH_CHECK(dims.size() == 5, "decode_model_bf16: dims must be heads, kv_heads, head_dim, rope, qk_norm");
  std::vector<Linear> layers;
  size_t next = 2;  // after the norms
  for (const int64_t kernel : kernels) {
    layers.push_back({kernel, weights.slice(next, kTensors[kernel])});
    next += kTensors[kernel];
  }
  const int64_t tokens = x.size(0), heads = dims[0], kv_heads = dims[1], head_dim = dims[2];
  const bool rope = dims[3] != 0, qk_norm = dims[4] != 0;
  const at::Tensor qkv = linear(norm(x, weights[0], eps), layers[0]);
  const int64_t q_kv = (heads + kv_heads) * head_dim;
  TORCH_CHECK(qkv.size(1) == q_kv + kv_heads * head_dim, "decode_model_bf16: qkv has ", qkv.size(1),
              " outputs, the heads need ", q_kv + kv_heads * head_dim);
  at::Tensor qk = qkv.narrow(1, 0, q_kv).view({tokens, heads + kv_heads, head_dim});
  const at::Tensor v = qkv.narrow(1, q_kv, kv_heads * head_dim).view({tokens, kv_heads, head_dim});
  if (rope || qk_norm) qk = rope_qk_norm(qk, angles, rope, qk_norm, eps);
  at::Tensor q = qk.narrow(1, 0, heads);
  const at::Tensor k = qk.narrow(1, heads, kv_heads);
  if (q_scale.has_value()) q = scale_rows(q, *q_scale);
  write_slots(k_cache, slots, k);
  write_slots(v_cache, slots, v);
  const at::Tensor attn = decode_attention(q, k_cache, v_cache, table, offsets, lengths, scale);
  const at::Tensor mid = add_bf16(x, linear(attn.flatten(1), layers[1]));
  const at::Tensor h = norm(mid, weights[1], eps);
  const at::Tensor first_expert = at::zeros({tokens}, x.options().dtype(at::kLong));
  if (layers.size() == 4) return add_bf16(mid, experts(h, first_expert, layers[2], layers[3]));
  // Llama 4's MoE, one expert per token: the router's sigmoid scales the expert's input.
  const auto [top_logits, top_ids] = at::topk(linear(h, layers[2]), 1, -1);
  const at::Tensor scores = at::sigmoid(top_logits.to(at::kFloat)).to(x.scalar_type());
  const at::Tensor routed = experts(scale_rows(h, scores), top_ids.reshape({-1}), layers[3], layers[4]);
  return add_bf16(mid, add_bf16(experts(h, first_expert, layers[5], layers[6]), routed));
}

// A decode step's whole text model on a few rows, as the modules compute it: the embedding, RoPE's angles and the
// NoPE layers' temperature (by the ATen ops herd.layers.rotary and Llama4Attention.temperature use), each layer as
// decode_layer, the final norm. Returns the normed hidden states and the outputs of the layers in `aux_layers`
// side by side (EAGLE-3's auxiliary hidden states; [T, 0] without any).
// Per layer: `layer_kernels` says how many of `kernels` are its own (7 MoE, 4 dense), which fixes how many of
// `weights` are; its K and V caches are kv_caches[2i], kv_caches[2i + 1]; `layer_pools` names the 4 attention
// arguments of `pools` it reads (slots, table, offsets, lengths of its kind of pool); dims[6i, 6i + 6) are heads,
// kv heads, head_dim, rope, qk-norm and whether its queries take the temperature; scales[i] its attention scale.
// temperature: floor_scale and attn_scale, or empty where no layer is tuned.
std::tuple<at::Tensor, at::Tensor> decode_model_bf16(
    const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& embed, const at::Tensor& inv_freq,
    at::TensorList weights, at::IntArrayRef kernels, at::IntArrayRef layer_kernels, at::TensorList kv_caches,
    at::TensorList pools, at::IntArrayRef layer_pools, at::IntArrayRef dims, at::ArrayRef<double> scales,
    at::ArrayRef<double> temperature, const at::Tensor& norm_weight, double eps, at::IntArrayRef aux_layers) {
  const size_t layers = layer_kernels.size();
  TORCH_CHECK(kv_caches.size() == 2 * layers && layer_pools.size() == layers && dims.size() == 6 * layers &&
                  scales.size() == layers,
              "decode_model_bf16: per layer 2 caches, a pool, 6 dims and a scale; got ", kv_caches.size(), ", ",
              layer_pools.size(), ", ", dims.size(), ", ", scales.size(), " for ", layers, " layers");
  TORCH_CHECK(temperature.empty() || temperature.size() == 2,
              "decode_model_bf16: temperature is floor_scale and attn_scale, or empty");
  at::Tensor x = at::embedding(embed, input_ids);
  const at::Tensor pos = positions.to(at::kFloat);
  const at::Tensor freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);
  const at::Tensor angles = at::polar(at::ones_like(freqs), freqs);
  std::optional<at::Tensor> q_scale;
  if (!temperature.empty()) q_scale = at::log1p(at::floor((pos + 1.0) / temperature[0])) * temperature[1] + 1.0;
  std::vector<at::Tensor> aux;
  size_t next_weight = 0, next_kernel = 0;
  for (size_t i = 0; i < layers; ++i) {
    TORCH_CHECK(next_kernel + layer_kernels[i] <= kernels.size(), "decode_model_bf16: ", kernels.size(),
                " kernels for layers of ", layer_kernels);
    const at::IntArrayRef own = kernels.slice(next_kernel, layer_kernels[i]);
    const size_t count = layer_weights(own);
    TORCH_CHECK(next_weight + count <= weights.size(), "decode_model_bf16: ", weights.size(), " weights for kernels ",
                kernels);
    const size_t pool = 4 * layer_pools[i];
    TORCH_CHECK(pool + 4 <= pools.size(), "decode_model_bf16: layer ", i, " reads pool ", layer_pools[i], " of ",
                pools.size() / 4);
    const at::IntArrayRef d = dims.slice(6 * i, 6);
    x = decode_layer(x, angles, d[5] ? q_scale : std::nullopt, weights.slice(next_weight, count), own,
                     kv_caches[2 * i], kv_caches[2 * i + 1], pools[pool], pools[pool + 1], pools[pool + 2],
                     pools[pool + 3], d.slice(0, 5), scales[i], eps);
    if (std::find(aux_layers.begin(), aux_layers.end(), static_cast<int64_t>(i)) != aux_layers.end())
      aux.push_back(x);
    next_weight += count;
    next_kernel += layer_kernels[i];
  }
  TORCH_CHECK(next_weight == weights.size() && next_kernel == kernels.size(), "decode_model_bf16: ", weights.size(),
              " weights and ", kernels.size(), " kernels for layers of ", layer_kernels);
  at::Tensor aux_hidden = aux.empty() ? x.new_empty({x.size(0), 0}) : at::cat(aux, -1);
  return {norm(x, norm_weight, eps), aux_hidden};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) {
  m.def(
      "decode_model_bf16(Tensor input_ids, Tensor positions, Tensor embed, Tensor inv_freq, Tensor[] weights, "
      "int[] kernels, int[] layer_kernels, Tensor(a!)[] kv_caches, Tensor[] pools, int[] layer_pools, int[] dims, "
      "float[] scales, float[] temperature, Tensor norm, float eps, int[] aux_layers) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) {
  m.impl("decode_model_bf16", &decode_model_bf16);
}
