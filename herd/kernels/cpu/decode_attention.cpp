// Decode attention over the paged KV cache on a CPU: one query per sequence, read straight from its blocks.
//
// PyTorch's way (gather the visible blocks, upcast them, masked SDPA) costs a few copies and ~10 small ops per
// layer, which on small models is most of the attention's time. Here each (sequence, KV head) task reads its
// keys once for all the query heads that share them (GQA), keeps the scores in fp32, takes their softmax and
// sums the values, all in fp32 as SDPA's CPU kernel accumulates them; the output is rounded to q's dtype once.
//
// The visible slots of sequence d are the positions [offsets[d], offsets[d] + lengths[d]) of its block table
// row laid end to end (slot p is in block table[d][p / block_size], at p % block_size).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include "claim_pool.h"
#include "cpu_features.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using herd_kernels::load16;
using herd_kernels::tail_mask;

// e^x for the scores less their maximum (x <= 0, or NaN), 16 at a time, as Cephes' expf computes it (within an
// ulp or two of std::exp): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), e^r by its polynomial, times 2^n.
// Scalar std::exp was half of a decode task's time at head_dim 32.
HERD_AVX512 inline __m512 exp_of_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);  // e^-104 is 0 in fp32; a NaN stays (max gives its 2nd operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// s[0, n) in place: e^(s - max) / sum.
HERD_AVX512 inline void softmax(float* s, int64_t n) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = lowest;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(lowest, m, s + j));
  }
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e = exp_of_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), shift));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    _mm512_mask_storeu_ps(s + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), inv));
  }
}

// One (sequence, KV head): `group` query heads (fp32, pre-scaled) against `length` cached rows.
template <typename T>
HERD_AVX512 void attend_group(const float* q, int64_t group, int64_t head_dim, const T* const* k_rows,
                              const T* const* v_rows, int64_t length, float* scores, float* out) {
  const bool vector = head_dim % 16 == 0;
  for (int64_t j = 0; j < length; ++j) {
    const T* k = k_rows[j];
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = q + h * head_dim;
      float dot = 0.f;
      if (vector) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < head_dim; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + c), load16(k + c), acc);
        dot = _mm512_reduce_add_ps(acc);
      } else {
        for (int64_t c = 0; c < head_dim; ++c) dot += qh[c] * static_cast<float>(k[c]);
      }
      scores[h * length + j] = dot;
    }
  }
  for (int64_t h = 0; h < group; ++h) softmax(scores + h * length, length);
  std::fill(out, out + group * head_dim, 0.f);
  for (int64_t j = 0; j < length; ++j) {
    const T* v = v_rows[j];
    for (int64_t h = 0; h < group; ++h) {
      const float p = scores[h * length + j];
      float* oh = out + h * head_dim;
      if (vector) {
        const __m512 pv = _mm512_set1_ps(p);
        for (int64_t c = 0; c < head_dim; c += 16)
          _mm512_storeu_ps(oh + c, _mm512_fmadd_ps(pv, load16(v + c), _mm512_loadu_ps(oh + c)));
      } else {
        for (int64_t c = 0; c < head_dim; ++c) oh[c] += p * static_cast<float>(v[c]);
      }
    }
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& table, const at::Tensor& offsets, const at::Tensor& lengths,
                                  double scale) {
  TORCH_CHECK(herd_kernels::has_avx512(), "paged_decode_attention: this CPU lacks AVX-512F/BW/VL");
  TORCH_CHECK(q.dim() == 3, "paged_decode_attention: q must be [D, heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention: caches must be [blocks, block_size, kv_heads, head_dim], alike");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode_attention: K and V dtypes differ");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "paged_decode_attention: head_dim must be dense");
  const int64_t d_count = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "paged_decode_attention: q's head_dim ", head_dim, ", the cache's ",
              k_cache.size(3));
  TORCH_CHECK(heads % kv_heads == 0, "paged_decode_attention: ", heads, " heads over ", kv_heads, " KV heads");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == d_count && offsets.numel() == d_count &&
                  lengths.numel() == d_count,
              "paged_decode_attention: table [D, W], offsets [D] and lengths [D] for D = ", d_count);
  const int64_t group = heads / kv_heads, width = table.size(1);
  const at::Tensor tab = table.to(at::kLong).contiguous();
  const at::Tensor off = offsets.to(at::kLong).contiguous(), len = lengths.to(at::kLong).contiguous();
  const int64_t* tp = tab.data_ptr<int64_t>();
  const int64_t* op = off.data_ptr<int64_t>();
  const int64_t* lp = len.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t d = 0; d < d_count; ++d) {
    TORCH_CHECK(lp[d] >= 1 && op[d] >= 0 && op[d] + lp[d] <= width * block_size,
                "paged_decode_attention: sequence ", d, " sees slots [", op[d], ", ", op[d] + lp[d],
                ") of a table ", width * block_size, " slots wide");
    longest = std::max(longest, lp[d]);
  }
  // The query as fp32, scaled once (SDPA scales the scores, q . k * scale: the same up to rounding).
  const at::Tensor qf = (q.to(at::kFloat) * scale).contiguous();
  const float* qp = qf.data_ptr<float>();
  at::Tensor out = at::empty({d_count, heads, head_dim}, q.options().dtype(at::kFloat));
  float* outp = out.data_ptr<float>();
  const int64_t tasks = d_count * kv_heads;
  // Inline below ~64k multiply-adds a task: a parallel region costs more than a small one.
  const int64_t work = std::max<int64_t>(1, longest * head_dim * group * 2);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    const int64_t kb = k_cache.stride(0), ks = k_cache.stride(1), kh = k_cache.stride(2);
    const int64_t vb = v_cache.stride(0), vs = v_cache.stride(1), vh = v_cache.stride(2);
    herd_kernels::parallel_rows(d_count, 0, tasks, grain, [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> k_rows(longest), v_rows(longest);
      std::vector<float> scores(group * longest);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t d = t / kv_heads, g = t % kv_heads, length = lp[d];
        for (int64_t j = 0; j < length; ++j) {
          const int64_t p = op[d] + j, block = tp[d * width + p / block_size], slot = p % block_size;
          k_rows[j] = kp + block * kb + slot * ks + g * kh;
          v_rows[j] = vp + block * vb + slot * vs + g * vh;
        }
        const int64_t row = (d * heads + g * group) * head_dim;
        attend_group<scalar_t>(qp + row, group, head_dim, k_rows.data(), v_rows.data(), length, scores.data(),
                               outp + row);
      }
    });
  };
  switch (k_cache.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "paged_decode_attention: a ", k_cache.scalar_type(),
                         " cache; float32, bfloat16 and float16 are supported");
  }
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor table, Tensor offsets, "
      "Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
