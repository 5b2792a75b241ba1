// W4A16 matmul on a CPU with AVX512-BF16: y[m, n] = sum_k x[m, k] * q[n, k] * s[n, k / group], x in bf16.
//
// The weight is herd's INT4 layout (herd.layers.quantization.int4.pack_for_kernel's, the Triton kernels'):
// uint8 [n, k / 2], input 2t in the low nibble of byte t and input 2t + 1 in the high one, each stored as q + 8;
// scales [n, k / group]. Each 32 bytes become two vectors of 32 bf16 values by a table lookup (`vpermw`: nibble
// -> the bf16 of nibble - 8, exact), which `vdpbf16ps` multiplies with x's even and odd inputs (x is split once
// per call) into an fp32 sum per group; each group's sum is scaled by its s and added up in fp32. The weight is
// read row after row, one stream per thread, and each 32 bytes are expanded once for up to eight rows of x.
//
// At one or two rows of x (a decode step) with groups of 128 to 512 inputs, the int16 path runs instead: on the
// AVX512-BF16 cores measured here `vdpbf16ps` takes ~2 cycles of both vector ports and the table lookups compete for
// one of them, which held row_dot to ~12 GB/s a thread from cache; int16 VNNI (`vpdpwssd`, ~0.75 cycle) on the
// nibbles as they lie (masks and shifts, no lookup) reads ~17. x is written once per call as two int16 parts per
// group, hi + lo / 2^15 times a power of two: hi holds every input within 2^7 of the group's largest exactly (all
// of bf16's 8 bits), lo the rest to 2^-22 of it, so the products are those of row_dot but for inputs below that;
// each group's integer sums are exact and the -8 of the nibbles an exact integer correction.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include "claim_pool.h"
#include "cpu_features.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kTileRows = 16;  // weight rows per tile
constexpr int64_t kMaxC = 8;  // rows of x per pass over a weight row (16 accumulators in registers)
constexpr int64_t kInt16MaxRows = 2;  // rows of x up to which the int16 path runs (more: the registers run out)
constexpr int64_t kChunk = 128;  // inputs per 64 weight bytes
constexpr int64_t kLanes = 16;  // int32 sums per vector: lane l sums inputs 8l..8l+7 of each chunk
// Bytes ahead of a weight row's read: with 2048 inputs, four rows ahead. Scout-mini's INT4 decode step, engine alone:
// 512 bytes ahead 22.6 ms, 2048 17.9-19.4, 4096 16.4-18.8 (the host's noise is as large as the last difference).
constexpr int64_t kPrefetch = 4096;

bool int4_bf16_supported() { return herd_kernels::has_avx512_bf16(); }

// x for the int16 path: per row and group, x = (hi + lo / 2^15) * unit with unit a power of two.
struct Int16X {
  // [m][k], each row in the order the nibbles lie: input 4j + r of a row at r * k / 4 + j (a 64-byte chunk of the
  // weight read as 32 int16 words holds inputs 4j..4j+3 of the chunk in word j's four nibbles).
  std::vector<int16_t> hi, lo;
  std::vector<float> unit;  // [m][groups]
  std::vector<int32_t> hi_fix, lo_fix;  // [m][groups][kLanes]: -8 * each lane's sum of hi (lo) over the group
};

// x's parts, or false where a group holds an infinity or NaN (row_dot then carries it to the output).
HERD_AVX512_VNNI bool split_int16(const uint16_t* x, int64_t m, int64_t k, int64_t group, Int16X& out) {
  const int64_t groups = k / group, quarter = k / 4;
  out.hi.resize(m * k);
  out.lo.resize(m * k);
  out.unit.resize(m * groups);
  out.hi_fix.resize(m * groups * kLanes);
  out.lo_fix.resize(m * groups * kLanes);
  // 16 inputs 4j + r (j < 4) as r-major: four runs of four, one per nibble position.
  const __m512i by_nibble = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512 fine = _mm512_set1_ps(32768.0f);
  for (int64_t c = 0; c < m; ++c) {
    int16_t* hi = out.hi.data() + c * k;
    int16_t* lo = out.lo.data() + c * k;
    for (int64_t g = 0; g < groups; ++g) {
      const auto* xg = reinterpret_cast<const c10::BFloat16*>(x + c * k + g * group);
      __m512 amax = _mm512_setzero_ps();
      for (int64_t i = 0; i < group; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(herd_kernels::load16(xg + i)));
      const float largest = _mm512_reduce_max_ps(amax);
      if (!std::isfinite(largest)) return false;
      int exponent = 0;  // largest < 2^exponent
      std::frexp(largest, &exponent);
      // |x| * 2^shift < 2^15, and at most 2^15 - 2^7 (8 significant bits): hi fits an int16. Capped where 2^shift
      // would overflow (a group of values below 2^-111, read as zeros).
      const int shift = largest > 0 ? std::min(15 - exponent, 126) : 0;
      const __m512 up = _mm512_set1_ps(std::ldexp(1.0f, shift));
      out.unit[c * groups + g] = std::ldexp(1.0f, -shift);
      for (int64_t i = 0; i < group; i += 16) {
        const __m512 v = _mm512_mul_ps(herd_kernels::load16(xg + i), up);  // exact: a power of two
        const __m512i h = _mm512_cvtps_epi32(v);  // to nearest, ties to even
        const __m512i l = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, _mm512_cvtepi32_ps(h)), fine));
        alignas(32) int16_t hs[16], ls[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(hs), _mm512_cvtepi32_epi16(_mm512_permutexvar_epi32(by_nibble, h)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(ls), _mm512_cvtepi32_epi16(_mm512_permutexvar_epi32(by_nibble, l)));
        const int64_t j = (g * group + i) / 4;
        for (int r = 0; r < 4; ++r) {
          std::memcpy(hi + r * quarter + j, hs + 4 * r, 4 * sizeof(int16_t));
          std::memcpy(lo + r * quarter + j, ls + 4 * r, 4 * sizeof(int16_t));
        }
      }
      // The nibbles are q + 8: -8 times each lane's sum of x over the group, as the kernel's lanes add it up.
      const __m512i ones = _mm512_set1_epi16(1);
      __m512i hi_sum = _mm512_setzero_si512(), lo_sum = _mm512_setzero_si512();
      for (int64_t t = g * group / 4; t < (g + 1) * group / 4; t += 32)
        for (int r = 0; r < 4; ++r) {
          hi_sum = _mm512_dpwssd_epi32(hi_sum, ones, _mm512_loadu_si512(hi + r * quarter + t));
          lo_sum = _mm512_dpwssd_epi32(lo_sum, ones, _mm512_loadu_si512(lo + r * quarter + t));
        }
      const __m512i minus8 = _mm512_set1_epi32(-8);
      _mm512_storeu_si512(out.hi_fix.data() + (c * groups + g) * kLanes, _mm512_mullo_epi32(hi_sum, minus8));
      _mm512_storeu_si512(out.lo_fix.data() + (c * groups + g) * kLanes, _mm512_mullo_epi32(lo_sum, minus8));
    }
  }
  return true;
}

// R weight rows (rows `stride` bytes apart, their scales `groups` apart) against C rows of x's int16 parts:
// out[i * C + c] = row i times x row c.
template <int R, int C>
HERD_AVX512_VNNI void rows_dot_int16(const uint8_t* w, int64_t stride, const float* scale, int64_t k, int64_t group,
                                     const Int16X& x, float* out) {
  const __m512i nibble = _mm512_set1_epi16(0x000F);
  const __m512 fine = _mm512_set1_ps(1.0f / 32768.0f);
  const int64_t bytes_per_group = group / 2, quarter = k / 4, groups = k / group;
  __m512 total[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) total[i][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i hi[R][C], lo[R][C];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < C; ++c) {
        hi[i][c] = _mm512_loadu_si512(x.hi_fix.data() + (c * groups + g) * kLanes);
        lo[i][c] = _mm512_loadu_si512(x.lo_fix.data() + (c * groups + g) * kLanes);
      }
    for (int64_t t = g * bytes_per_group; t < (g + 1) * bytes_per_group; t += 64) {
      for (int i = 0; i < R; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(w + i * stride + t + kPrefetch), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(w + i * stride + t);
        const __m512i n[4] = {_mm512_and_si512(v, nibble), _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble),
                              _mm512_and_si512(_mm512_srli_epi16(v, 8), nibble), _mm512_srli_epi16(v, 12)};
        for (int c = 0; c < C; ++c)
          for (int r = 0; r < 4; ++r) {
            const int64_t at = c * k + r * quarter + t / 2;
            hi[i][c] = _mm512_dpwssd_epi32(hi[i][c], n[r], _mm512_loadu_si512(x.hi.data() + at));
            lo[i][c] = _mm512_dpwssd_epi32(lo[i][c], n[r], _mm512_loadu_si512(x.lo.data() + at));
          }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < C; ++c) {
        // |each lane| < 2^24: exact in fp32; s * unit is exact (unit is a power of two).
        const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[i][c]), fine, _mm512_cvtepi32_ps(hi[i][c]));
        const __m512 s = _mm512_set1_ps(scale[i * groups + g] * x.unit[c * groups + g]);
        total[i][c] = _mm512_fmadd_ps(s, sum, total[i][c]);
      }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) out[i * C + c] = _mm512_reduce_add_ps(total[i][c]);
}

// Weight rows [begin, end) against the C rows of x, two weight rows at a time: y [C, n] in bf16.
template <int C>
void int16_rows(const uint8_t* w, const float* scales, int64_t n, int64_t k, int64_t group, const Int16X& x,
                int64_t begin, int64_t end, at::BFloat16* y) {
  const int64_t half = k / 2, groups = k / group;
  float out[2 * C];
  int64_t r = begin;
  for (; r + 2 <= end; r += 2) {
    rows_dot_int16<2, C>(w + r * half, half, scales + r * groups, k, group, x, out);
    for (int i = 0; i < 2; ++i)
      for (int c = 0; c < C; ++c) y[c * n + r + i] = at::BFloat16(out[i * C + c]);
  }
  if (r < end) {
    rows_dot_int16<1, C>(w + r * half, half, scales + r * groups, k, group, x, out);
    for (int c = 0; c < C; ++c) y[c * n + r] = at::BFloat16(out[c]);
  }
}

uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);  // exact for the small integers used here
}

// One weight row (k / 2 bytes) against C rows of x split into even/odd inputs (rows of k / 2 bf16 each).
template <int C>
HERD_AVX512_BF16 void row_dot(const uint8_t* w, const float* scale, int64_t k, int64_t group, const uint16_t* even,
                              const uint16_t* odd, int64_t half, const uint16_t* entries, float* out) {
  const __m512i low_nibble = _mm512_set1_epi16(0x000F);
  const __m512i table = _mm512_loadu_si512(entries);
  __m512 total[C];
  for (int c = 0; c < C; ++c) total[c] = _mm512_setzero_ps();
  const int64_t bytes_per_group = group / 2;
  for (int64_t g0 = 0; g0 < k / 2; g0 += bytes_per_group) {
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t t = g0; t < g0 + bytes_per_group; t += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w + t + 1024), _MM_HINT_T0);
      const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t)));
      const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(bytes, low_nibble), table);
      const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
      for (int c = 0; c < C; ++c) {
        acc[c] = _mm512_dpbf16_ps(acc[c], lo, (__m512bh)_mm512_loadu_si512(even + c * half + t));
        acc[c] = _mm512_dpbf16_ps(acc[c], hi, (__m512bh)_mm512_loadu_si512(odd + c * half + t));
      }
    }
    const __m512 s = _mm512_set1_ps(scale[g0 / bytes_per_group]);
    for (int c = 0; c < C; ++c) total[c] = _mm512_fmadd_ps(s, acc[c], total[c]);
  }
  for (int c = 0; c < C; ++c) out[c] = _mm512_reduce_add_ps(total[c]);
}

at::Tensor w4a16_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t group) {
  TORCH_CHECK(int4_bf16_supported(), "w4a16_linear: this CPU lacks AVX512-BF16");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "w4a16_linear: x must be bf16 on the CPU");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "w4a16_linear: the weight must be a contiguous uint8 [N, K / 2]");
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  TORCH_CHECK(x.size(-1) == k, "w4a16_linear: x has ", x.size(-1), " columns, the weight ", k);
  TORCH_CHECK(group % 64 == 0 && k % group == 0, "w4a16_linear: groups of ", group, " over ", k,
              " inputs (groups must be a multiple of 64 that divides K)");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == k / group,
              "w4a16_linear: scales must be [N, K / group] = [", n, ", ", k / group, "]");
  auto shape = x.sizes().vec();
  shape.back() = n;
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0), half = k / 2;
  // bf16 out, each fp32 sum rounded once as a conversion of an fp32 result would; no TensorIterator call per
  // step (a decode step makes dozens of these calls, each a few microseconds of setup around a short read).
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y.view(shape);
  const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const float* sp = s.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  auto* yp = y.data_ptr<at::BFloat16>();
  const int64_t groups = k / group;
  // A task is ~256 KiB of weight, as in gemv.cpp.
  const int64_t rows_per_task = std::max<int64_t>(1, 256 * 1024 / std::max<int64_t>(half, 1));
  Int16X parts;
  if (m <= kInt16MaxRows && group % kChunk == 0 && group <= 4 * kChunk && herd_kernels::has_avx512_vnni() &&
      split_int16(xp, m, k, group, parts)) {
    herd_kernels::parallel_rows(m, 0, n, rows_per_task, [&](int64_t begin, int64_t end) {
      if (m == 1)
        int16_rows<1>(wp, sp, n, k, group, parts, begin, end, yp);
      else
        int16_rows<2>(wp, sp, n, k, group, parts, begin, end, yp);
    });
    return y.view(shape);
  }
  // x's even and odd inputs, each row [k / 2] bf16, matching the low and high nibbles.
  std::vector<uint16_t> split(2 * m * half);
  uint16_t* even = split.data();
  uint16_t* odd = even + m * half;
  for (int64_t i = 0; i < m * half; ++i) {
    even[i] = xp[2 * i];
    odd[i] = xp[2 * i + 1];
  }
  alignas(64) uint16_t entries[32] = {};
  for (int v = 0; v < 16; ++v) entries[v] = bf16_bits(static_cast<float>(v - 8));
  herd_kernels::parallel_rows(m, 0, n, rows_per_task, [&](int64_t begin, int64_t end) {
    float out[kMaxC];
    // Weight rows in tiles: with many rows of x (a prefill), each block of x rows meets a tile of weight rows
    // while both sit in L1, rather than every weight row passing over all of x.
    for (int64_t t0 = begin; t0 < end; t0 += kTileRows) {
      const int64_t t1 = std::min(end, t0 + kTileRows);
      for (int64_t c0 = 0; c0 < m; c0 += kMaxC) {
        const int64_t cc = std::min(kMaxC, m - c0);
        const uint16_t* e = even + c0 * half;
        const uint16_t* o = odd + c0 * half;
        for (int64_t r = t0; r < t1; ++r) {
          const uint8_t* w = wp + r * half;
          const float* scale = sp + r * groups;
          switch (cc) {
            case 8: row_dot<8>(w, scale, k, group, e, o, half, entries, out); break;
            case 7: row_dot<7>(w, scale, k, group, e, o, half, entries, out); break;
            case 6: row_dot<6>(w, scale, k, group, e, o, half, entries, out); break;
            case 5: row_dot<5>(w, scale, k, group, e, o, half, entries, out); break;
            case 4: row_dot<4>(w, scale, k, group, e, o, half, entries, out); break;
            case 3: row_dot<3>(w, scale, k, group, e, o, half, entries, out); break;
            case 2: row_dot<2>(w, scale, k, group, e, o, half, entries, out); break;
            default: row_dot<1>(w, scale, k, group, e, o, half, entries, out); break;
          }
          for (int64_t c = 0; c < cc; ++c) yp[(c0 + c) * n + r] = at::BFloat16(out[c]);
        }
      }
    }
  });
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) {
  m.def("int4_bf16_supported() -> bool", &int4_bf16_supported);  // a catch-all: no tensor to dispatch on
  m.def("w4a16_linear(Tensor x, Tensor packed, Tensor scales, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) { m.impl("w4a16_linear", &w4a16_linear); }
