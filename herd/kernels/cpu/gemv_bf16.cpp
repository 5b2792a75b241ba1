// bf16 weight x bf16 activations -> bf16, fp32 accumulation: y[m, n] = sum_k x[m, k] * w[n, k].
//
// For decoding on a CPU: few rows of x (M small) against a weight read once from memory, which is the whole
// cost. Each thread streams a contiguous block of the weight's rows, four rows at a time, and dots each chunk
// of 32 weights with up to four rows of x while the chunk is in registers (AVX-512 BF16's vdpbf16ps: pairs of
// bf16 products summed into fp32 lanes). CPUs without AVX-512 BF16 take the plain loop below.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kRows = 4;  // weight rows per inner block
constexpr int64_t kCols = 4;  // rows of x per inner block

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void gemv_plain(const uint16_t* x, const uint16_t* w, c10::BFloat16* y, int64_t m, int64_t k, int64_t n_begin,
                int64_t n_end, int64_t n) {
  for (int64_t r = n_begin; r < n_end; ++r) {
    const uint16_t* wr = w + r * k;
    for (int64_t i = 0; i < m; ++i) {
      const uint16_t* xi = x + i * k;
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) acc += bf16_to_float(wr[j]) * bf16_to_float(xi[j]);
      y[i * n + r] = c10::BFloat16(acc);
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define HERD_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// R weight rows (R <= kRows) against C rows of x (C <= kCols), all of K.
template <int R, int C>
HERD_AVX512BF16 inline void block_avx512(const uint16_t* x, const uint16_t* w, c10::BFloat16* y, int64_t k,
                                          int64_t n, int64_t r0, int64_t c0) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w + (r0 + r) * k + j);
    for (int c = 0; c < C; ++c) {
      __m512i xv = _mm512_loadu_si512(x + (c0 + c) * k + j);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  if (j < k) {  // the tail: masked loads read zeros past the end
    __mmask32 mask = (__mmask32)((1ull << (k - j)) - 1);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + (r0 + r) * k + j);
    for (int c = 0; c < C; ++c) {
      __m512i xv = _mm512_maskz_loadu_epi16(mask, x + (c0 + c) * k + j);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) y[(c0 + c) * n + r0 + r] = c10::BFloat16(_mm512_reduce_add_ps(acc[r][c]));
}

template <int R>
HERD_AVX512BF16 inline void rows_avx512(const uint16_t* x, const uint16_t* w, c10::BFloat16* y, int64_t m, int64_t k,
                                         int64_t n, int64_t r0) {
  int64_t c0 = 0;
  for (; c0 + kCols <= m; c0 += kCols) block_avx512<R, kCols>(x, w, y, k, n, r0, c0);
  switch (m - c0) {
    case 1: block_avx512<R, 1>(x, w, y, k, n, r0, c0); break;
    case 2: block_avx512<R, 2>(x, w, y, k, n, r0, c0); break;
    case 3: block_avx512<R, 3>(x, w, y, k, n, r0, c0); break;
    default: break;
  }
}

HERD_AVX512BF16 void gemv_avx512(const uint16_t* x, const uint16_t* w, c10::BFloat16* y, int64_t m, int64_t k,
                                 int64_t n_begin, int64_t n_end, int64_t n) {
  int64_t r0 = n_begin;
  for (; r0 + kRows <= n_end; r0 += kRows) rows_avx512<kRows>(x, w, y, m, k, n, r0);
  switch (n_end - r0) {
    case 1: rows_avx512<1>(x, w, y, m, k, n, r0); break;
    case 2: rows_avx512<2>(x, w, y, m, k, n, r0); break;
    case 3: rows_avx512<3>(x, w, y, m, k, n, r0); break;
    default: break;
  }
}

bool has_avx512bf16() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
}
#else
bool has_avx512bf16() { return false; }
#endif

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 only");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "gemv_bf16: weight must be a contiguous [N, K]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv_bf16: CPU tensors only");
  const int64_t k = w.size(1), n = w.size(0);
  TORCH_CHECK(x.size(-1) == k, "gemv_bf16: x has ", x.size(-1), " columns, weight ", k);
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y.view(out_shape);
  const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* yp = y.data_ptr<c10::BFloat16>();
  const bool fast = has_avx512bf16();
  // Whole blocks of rows per task, sized so that a few hundred KiB of weight go to each.
  const int64_t grain = std::max<int64_t>(kRows, (256 * 1024 / (2 * std::max<int64_t>(k, 1))) / kRows * kRows);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (fast) {
      gemv_avx512(xp, wp, yp, m, k, begin, end, n);
      return;
    }
#endif
    gemv_plain(xp, wp, yp, m, k, begin, end, n);
  });
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY(herd_cpu, m) { m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) { m.impl("gemv_bf16", &gemv_bf16); }
