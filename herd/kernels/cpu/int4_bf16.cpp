// W4A16 matmul on a CPU with AVX512-BF16: y[m, n] = sum_k x[m, k] * q[n, k] * s[n, k / group], x in bf16.
//
// The weight is herd's INT4 layout (herd.layers.quantization.int4.pack_for_kernel's, the Triton kernels'):
// uint8 [n, k / 2], input 2t in the low nibble of byte t and input 2t + 1 in the high one, each stored as q + 8;
// scales [n, k / group]. Each 32 bytes become two vectors of 32 bf16 values by a table lookup (`vpermw`: nibble
// -> the bf16 of nibble - 8, exact), which `vdpbf16ps` multiplies with x's even and odd inputs (x is split once
// per call) into an fp32 sum per group; each group's sum is scaled by its s and added up in fp32. The weight is
// read row after row, one stream per thread, and each 32 bytes are expanded once for up to eight rows of x.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include "claim_pool.h"
#include "cpu_features.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kTileRows = 16;  // weight rows per tile
constexpr int64_t kMaxC = 8;  // rows of x per pass over a weight row (16 accumulators in registers)

bool int4_bf16_supported() { return herd_kernels::has_avx512_bf16(); }

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
  const at::Tensor x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0), half = k / 2;
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return y.to(x.scalar_type()).view(shape);
  // x's even and odd inputs, each row [k / 2] bf16, matching the low and high nibbles.
  const at::Tensor pairs = x2.contiguous().view({m, half, 2});
  const at::Tensor even_t = pairs.select(2, 0).contiguous(), odd_t = pairs.select(2, 1).contiguous();
  const auto* even = reinterpret_cast<const uint16_t*>(even_t.data_ptr<at::BFloat16>());
  const auto* odd = reinterpret_cast<const uint16_t*>(odd_t.data_ptr<at::BFloat16>());
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const float* sp = s.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  alignas(64) uint16_t entries[32] = {};
  for (int v = 0; v < 16; ++v) entries[v] = bf16_bits(static_cast<float>(v - 8));
  const int64_t groups = k / group;
  // A task is ~256 KiB of weight, as in gemv.cpp.
  const int64_t rows_per_task = std::max<int64_t>(1, 256 * 1024 / std::max<int64_t>(half, 1));
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
          for (int64_t c = 0; c < cc; ++c) yp[(c0 + c) * n + r] = out[c];
        }
      }
    }
  });
  return y.to(x.scalar_type()).view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) {
  m.def("int4_bf16_supported() -> bool", &int4_bf16_supported);  // a catch-all: no tensor to dispatch on
  m.def("w4a16_linear(Tensor x, Tensor packed, Tensor scales, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) { m.impl("w4a16_linear", &w4a16_linear); }
