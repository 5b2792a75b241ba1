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
