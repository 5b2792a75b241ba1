// Llama 4's RoPE and weightless qk-norm for the query and key heads of a step, in one pass over 16-bit rows.
//
// PyTorch's way is eight small ops per layer (widen, view as complex, multiply, view back, round, then the norm);
// at decode batch sizes each costs more in dispatch than in arithmetic. Here each head's row is rotated pair by
// pair in fp32 and rounded to the row's dtype, as the reference rounds after RoPE, then normalised from those
// rounded values in fp32 and rounded once more, as the norm after it does (herd's rms_norm op's own row code).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_features.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

// One head: `x` (head_dim values) into `y`; `angle` holds (cos, sin) per pair. The norm is herd's rms_norm op's,
// on the rounded rotation in `y`.
template <typename T>
void rope_qk_norm_row(const T* x, const float* angle, T* y, int64_t head_dim, bool rope, bool norm, float eps) {
  if (!rope) {
    if (norm) {
      herd_kernels::rms_norm_row<T>(x, nullptr, y, head_dim, eps);
    } else {
      std::copy(x, x + head_dim, y);
    }
    return;
  }
  for (int64_t j = 0; j < head_dim; j += 2) {
    const float a = static_cast<float>(x[j]), b = static_cast<float>(x[j + 1]);
    const float c = angle[j], s = angle[j + 1];
    y[j] = static_cast<T>(a * c - b * s);
    y[j + 1] = static_cast<T>(a * s + b * c);
  }
  if (norm) herd_kernels::rms_norm_row<T>(y, nullptr, y, head_dim, eps);
}

// qk [T, H, D] (the heads of each token may sit in a wider row, e.g. a view of the fused qkv output), angles
// complex64 [T, D / 2]: a new contiguous [T, H, D] in qk's dtype.
at::Tensor rope_qk_norm(const at::Tensor& qk, const at::Tensor& angles, bool rope, bool norm, double eps) {
  TORCH_CHECK(qk.device().is_cpu() && qk.dim() == 3,
              "rope_qk_norm: qk must be a [tokens, heads, head_dim] CPU tensor");
  TORCH_CHECK(qk.scalar_type() == at::kBFloat16 || qk.scalar_type() == at::kHalf,
              "rope_qk_norm: qk must be bfloat16 or float16, not ", qk.scalar_type());
  const int64_t tokens = qk.size(0), heads = qk.size(1), head_dim = qk.size(2);
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 512, "rope_qk_norm: head_dim must be even and at most 512, got ",
              head_dim);
  TORCH_CHECK(angles.scalar_type() == at::kComplexFloat && angles.dim() == 2 && angles.size(0) == tokens &&
                  angles.size(1) == head_dim / 2,
              "rope_qk_norm: angles must be complex64 [tokens, head_dim / 2]");
  const at::Tensor x = qk.stride(2) == 1 ? qk : qk.contiguous();
  const at::Tensor pairs = at::view_as_real(angles).contiguous();  // [T, D / 2, 2]: cos, sin
  at::Tensor y = at::empty({tokens, heads, head_dim}, qk.options());
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  const float* ap = pairs.data_ptr<float>();
  const float e = static_cast<float>(eps);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "rope_qk_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    // Rows are independent; a decode step's few dozen stay on one thread.
    at::parallel_for(0, tokens * heads, std::max<int64_t>(1, 32768 / head_dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t t = r / heads, h = r % heads;
        rope_qk_norm_row(xp + t * token_stride + h * head_stride, ap + t * head_dim, yp + r * head_dim, head_dim,
                         rope, norm, e);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) {
  m.def("rope_qk_norm(Tensor qk, Tensor angles, bool rope, bool norm, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) { m.impl("rope_qk_norm", &rope_qk_norm); }
