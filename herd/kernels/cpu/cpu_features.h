// What herd's CPU kernel sources share: the target attributes of their vector code, the checks, made once per
// process, that this CPU runs it, and the small vector helpers several sources use. Each op checks before it runs,
// so a call on another CPU is an error, not an illegal instruction.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#define HERD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define HERD_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define HERD_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace herd_kernels {

inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

inline bool has_avx512_bf16() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

inline bool has_avx512_vnni() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
}

// Lanes of a 16-float step that lie before the end: all of them but in the last step.
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// 16 consecutive values as fp32 (bf16 and fp16 widened exactly).
HERD_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
HERD_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
HERD_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Horizontal sums of several vectors at once: out[i] = the sum of v[i]'s 16 lanes. Adding pairs of vectors
// interleaved halves the vectors and the lanes per output at each level, so four sums cost ~14 instructions where
// one `_mm512_reduce_add_ps` each costs ~32 and a chain of dependent shuffles per output. (The lanes are added in
// another order than `_mm512_reduce_add_ps`'s: the sums may differ by a rounding.)
//
// Two levels within 128-bit lanes leave one vector whose every 128-bit lane holds the four outputs' partial sums.
HERD_AVX512 inline __m512 lane_sums4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a b a b per lane
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)), _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
}

HERD_AVX512 inline void reduce_add4(const __m512* v, float* out) {
  const __m512 s = lane_sums4(v[0], v[1], v[2], v[3]);
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(s),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
}

// out[i] = the sum of v[i]'s lanes for n vectors, four at a time where it can.
HERD_AVX512 inline void reduce_add(const __m512* v, int n, float* out) {
  int i = 0;
  for (; i + 4 <= n; i += 4) reduce_add4(v + i, out + i);
  for (; i < n; ++i) out[i] = _mm512_reduce_add_ps(v[i]);
}

// One row: y = dtype(x * rsqrt(mean(x^2) + eps)), then y = dtype(y * weight), as the reference computes it
// (normalised in float32, rounded to the input's dtype, then scaled by the weight in that dtype).
template <typename T>
inline void rms_norm_row(const T* x, const T* weight, T* y, int64_t h, float eps) {
  constexpr int kLanes = 16;  // independent partial sums: the compiler vectorises them
  float partial[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= h; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = static_cast<float>(x[j + l]);
      partial[l] += v * v;
    }
  for (; j < h; ++j) partial[0] += static_cast<float>(x[j]) * static_cast<float>(x[j]);
  float sum = 0.f;
  for (float p : partial) sum += p;
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(h) + eps);
  for (j = 0; j < h; ++j) {
    const T normed = static_cast<T>(static_cast<float>(x[j]) * inv);
    y[j] = weight == nullptr ? normed : static_cast<T>(static_cast<float>(normed) * static_cast<float>(weight[j]));
  }
}

}  // namespace herd_kernels
