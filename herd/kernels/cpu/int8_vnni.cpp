// W8A8 INT8 matmuls on AVX-512 VNNI: y[m, n] = sum_k x[m, k] * W[n, k] with both sides in INT8.
//
// The weight is INT8, symmetric, one scale per output row (quantized at load); each row of x is quantized here,
// symmetric with one scale per row (s = max|x| / 127, x_q = round(x / s)). Products are summed exactly in int32
// and the result is float(sum) * s_x * s_w, in x's dtype. At decode batch sizes the weight's bytes are the cost,
// and VNNI's `vpdpbusd` consumes 64 weight bytes per instruction against one row of x, where the fp32 kernels in
// gemv.cpp spend about a dozen instructions widening and multiplying the same 64 bytes.
//
// `vpdpbusd` multiplies unsigned bytes by signed bytes, so x_q is stored as x_q + 128 (0..254) and the 128 *
// sum_k W[n, k] that this adds is taken off again with the row sums the caller computed at load. 4 products of at
// most 255 * 127 fit an int32 lane easily; over K the sum stays below 2^31 while K <= 65536 (checked).
//
// Each 64-byte step of a weight row lines up with 64 bytes of x, and each dword lane sums 4 adjacent inputs, so no
// shuffles are needed; the lanes are added once at the end of the row. CPUs without VNNI get
// `vnni_supported() == false` and herd calls torch._int_mm instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "claim_pool.h"
#include "cpu_features.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using herd_kernels::tail_mask;

constexpr int64_t kRows = 4;     // weight rows per strip, interleaved in memory (see pack_for_vnni)
constexpr int kMaxC = 4;         // rows of x per pass over a strip (R * C accumulators + R + C loads < 32 zmm)
constexpr int64_t kMBlock = 64;  // rows of x per block: a block of quantized x stays in L2 while a task's strips pass
constexpr int64_t kMaxK = 65536;
// Software prefetch this far ahead in a strip's stream (bytes): the hardware prefetcher follows one stream well,
// but a few KiB of lead keeps more lines in flight per core.
constexpr int64_t kPrefetch = 2048;

bool vnni_supported() { return herd_kernels::has_avx512_vnni(); }

inline int64_t padded(int64_t k) { return (k + 63) / 64 * 64; }
inline int64_t padded_rows(int64_t n) { return (n + kRows - 1) / kRows * kRows; }

// The weight is packed at load (herd.kernels.cpu.int8_vnni.pack_for_vnni) into strips of kRows rows: for each 64
// inputs, 64 bytes of row 0, of row 1, ... of row kRows - 1, so a strip is one contiguous stream of kp * kRows
// bytes (the four rows side by side were four streams, which the hardware prefetcher follows less well). Rows are
// zero-padded to a multiple of kRows and inputs to a multiple of 64: zero weights add nothing, and x's padding is
// zero too.
template <int C>
HERD_AVX512_VNNI void vnni_block(const int8_t* strip, int64_t kp, const uint8_t* xu, int32_t* out) {
  __m512i acc[kRows][C];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t j = 0; j < kp; j += 64) {
    const int8_t* w = strip + j * kRows;
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 128), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 192), _MM_HINT_T0);
    __m512i xv[C];
    for (int c = 0; c < C; ++c) xv[c] = _mm512_loadu_si512(xu + c * kp + j);
    for (int r = 0; r < kRows; ++r) {
      const __m512i wv = _mm512_loadu_si512(w + r * 64);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], xv[c], wv);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) out[c * kRows + r] = _mm512_reduce_add_epi32(acc[r][c]);
}

// One strip against m rows of x: out [m, kRows].
void strip_rows(const int8_t* strip, int64_t kp, const uint8_t* xu, int64_t m, int32_t* out) {
  int64_t c0 = 0;
  for (; c0 + kMaxC <= m; c0 += kMaxC) vnni_block<kMaxC>(strip, kp, xu + c0 * kp, out + c0 * kRows);
  switch (m - c0) {
    case 3: vnni_block<3>(strip, kp, xu + c0 * kp, out + c0 * kRows); break;
    case 2: vnni_block<2>(strip, kp, xu + c0 * kp, out + c0 * kRows); break;
    case 1: vnni_block<1>(strip, kp, xu + c0 * kp, out + c0 * kRows); break;
    default: break;
  }
}

// Sums of biased x rows [m, kp] against every weight row, handed strip by strip to
// emit(r0, rows, c0, cc, sums), sums[c * kRows + r] for x row c0 + c and weight row r0 + r (r < rows).
template <typename Emit>
void vnni_gemm(const int8_t* q, int64_t n, int64_t k, const uint8_t* xu, int64_t m, const Emit& emit) {
  const int64_t kp = padded(k);
  const int64_t strips = padded_rows(n) / kRows;
  // A task is a few hundred KiB of weight: big enough to amortise the task, small enough to balance 2-64 cores.
  const int64_t grain = std::max<int64_t>(1, 256 * 1024 / kp / kRows);
  herd_kernels::parallel_rows(m, 0, strips, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> sums(kRows * std::min(m, kMBlock));
    for (int64_t c0 = 0; c0 < m; c0 += kMBlock) {
      const int64_t cc = std::min(kMBlock, m - c0);
      for (int64_t s = begin; s < end; ++s) {
        strip_rows(q + s * kRows * kp, kp, xu + c0 * kp, cc, sums.data());
        emit(s * kRows, std::min(kRows, n - s * kRows), c0, cc, sums.data());
      }
    }
  });
}

// Checks the packed weight and the row sums; n is the weight's rows (q_sum's length), k its inputs.
void check_weight(const at::Tensor& q, const at::Tensor& q_sum, int64_t k, const char* op) {
  TORCH_CHECK(vnni_supported(), op, ": this CPU lacks AVX-512 VNNI");
  TORCH_CHECK(q_sum.scalar_type() == at::kInt && q_sum.dim() == 1, op,
              ": weight_sum must be int32 [N], one entry per weight row, got ", q_sum.scalar_type(), " of shape ",
              q_sum.sizes());
  const int64_t n = q_sum.size(0);
  TORCH_CHECK(k <= kMaxK, op, ": K = ", k, " could overflow the int32 sums (at most ", kMaxK, ")");
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kChar && q.is_contiguous() &&
                  q.numel() == padded_rows(n) * padded(k),
              op, ": the weight must be a contiguous int8 CPU tensor packed by pack_for_vnni for ", n, " rows of ",
              k, " (", padded_rows(n) * padded(k), " bytes), got ", q.scalar_type(), " ", q.sizes());
}

// x_q [m, k] int8 (already quantized) @ W.T -> int32 [m, n], exactly: the kernel's integer part on its own.
at::Tensor int8_mm_vnni(const at::Tensor& xq, const at::Tensor& q, const at::Tensor& q_sum) {
  TORCH_CHECK(xq.scalar_type() == at::kChar && xq.dim() == 2, "int8_mm_vnni: x must be int8 [M, K]");
  const int64_t m = xq.size(0), k = xq.size(1), n = q_sum.numel(), kp = padded(k);
  check_weight(q, q_sum, k, "int8_mm_vnni");
  at::Tensor y = at::empty({m, n}, xq.options().dtype(at::kInt));
  if (m == 0 || n == 0) return y;
  const at::Tensor xc = xq.contiguous();
  std::vector<uint8_t> xu(m * kp, 0);
  const int8_t* xp = xc.data_ptr<int8_t>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) xu[i * kp + j] = static_cast<uint8_t>(xp[i * k + j] + 128);
  const int32_t* sp = q_sum.contiguous().data_ptr<int32_t>();
  int32_t* yp = y.data_ptr<int32_t>();
  vnni_gemm(q.data_ptr<int8_t>(), n, k, xu.data(), m,
            [&](int64_t r0, int64_t rows, int64_t c0, int64_t cc, const int32_t* sums) {
              for (int64_t c = 0; c < cc; ++c)
                for (int64_t r = 0; r < rows; ++r)
                  yp[(c0 + c) * n + r0 + r] = sums[c * kRows + r] - 128 * sp[r0 + r];
            });
  return y;
}

// Row i of x (fp32) -> x_q + 128 into xu (kp bytes, zero past k), and its scale. The rounding is to nearest,
// ties to even (torch.round's), fixed in the instruction rather than taken from MXCSR; with 127 / amax and
// x * inv each rounded once in fp32, these are the torch reference's operations (herd.kernels.cpu.int8_vnni).
HERD_AVX512_VNNI void quantize_row(const float* x, int64_t k, uint8_t* xu, float* scale) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += 16) {
    const __mmask16 mask = tail_mask(k - j);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, x + j)));
  }
  const float amax = _mm512_reduce_max_ps(mx);
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *scale = amax / 127.f;
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512i bias = _mm512_set1_epi32(128);
  for (int64_t j = 0; j < k; j += 16) {
    const __mmask16 mask = tail_mask(k - j);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + j), vinv);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    // 1..255 fits a byte: the truncating narrow is exact.
    _mm512_mask_cvtepi32_storeu_epi8(xu + j, mask, _mm512_add_epi32(_mm512_cvtps_epi32(v), bias));
  }
}

// x [..., K] (fp32, bf16 or fp16) -> [..., N] in x's dtype: float(x_q @ q.T) * s_x * w_scale.
at::Tensor w8a8_int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& w_scale,
                            const at::Tensor& q_sum) {
  TORCH_CHECK(x.device().is_cpu(), "w8a8_int8_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "w8a8_int8_linear: x must be float32, bfloat16 or float16, not ", x.scalar_type());
  const int64_t n = q_sum.numel(), k = x.size(-1), kp = padded(k);
  check_weight(q, q_sum, k, "w8a8_int8_linear");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == n,
              "w8a8_int8_linear: w_scale must be float32 with one entry per weight row (", n, ")");
  auto shape = x.sizes().vec();
  shape.back() = n;
  const at::Tensor xf = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t m = xf.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y.view(shape);
  std::vector<uint8_t> xu(m * kp, 0);
  std::vector<float> xs(m);
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_row(xp + i * k, k, xu.data() + i * kp, &xs[i]);
  });
  const at::Tensor ws = w_scale.contiguous();
  const float* wsp = ws.data_ptr<float>();
  const int32_t* sp = q_sum.contiguous().data_ptr<int32_t>();
  const at::ScalarType dtype = y.scalar_type();
  void* yp = y.data_ptr();
  vnni_gemm(q.data_ptr<int8_t>(), n, k, xu.data(), m,
            [&](int64_t r0, int64_t rows, int64_t c0, int64_t cc, const int32_t* sums) {
              for (int64_t c = 0; c < cc; ++c)
                for (int64_t r = 0; r < rows; ++r) {
                  const int32_t acc = sums[c * kRows + r] - 128 * sp[r0 + r];
                  // Left to right, as the reference: (float(acc) * s_x) * s_w.
                  const float v = static_cast<float>(acc) * xs[c0 + c] * wsp[r0 + r];
                  const int64_t idx = (c0 + c) * n + r0 + r;
                  if (dtype == at::kFloat)
                    static_cast<float*>(yp)[idx] = v;
                  else if (dtype == at::kBFloat16)
                    static_cast<at::BFloat16*>(yp)[idx] = at::BFloat16(v);
                  else
                    static_cast<at::Half*>(yp)[idx] = at::Half(v);
                }
            });
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) {
  m.def("vnni_supported() -> bool", &vnni_supported);  // a catch-all: it takes no tensor to dispatch on
  m.def("int8_mm_vnni(Tensor xq, Tensor q, Tensor q_sum) -> Tensor");
  m.def("w8a8_int8_linear(Tensor x, Tensor q, Tensor w_scale, Tensor q_sum) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) {
  m.impl("int8_mm_vnni", &int8_mm_vnni);
  m.impl("w8a8_int8_linear", &w8a8_int8_linear);
}
