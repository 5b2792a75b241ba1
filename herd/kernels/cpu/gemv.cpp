// Weight-streaming matmuls for decoding on a CPU: y[m, n] = sum_k x[m, k] * W[n, k] for a few rows of x.
//
// At decode batch sizes the weight is read once from memory and that read is the whole cost, so each kernel
// keeps the weight in its stored form (bf16, or INT8 with one scale per output channel), widens it to
// fp32 in registers and multiplies in fp32 (AVX-512F; no BF16 or VNNI instructions needed). Activations are
// converted to fp32 once per call. Each thread takes whole strips of kRows weight rows and widens each weight
// vector once for up to four rows of x; more rows of x pass over the strip again while it is still in L1, so the
// weight comes from memory once. Where the CPU has AVX512-BF16 and x is bf16, the bf16 kernel needs no widening
// and reads the weight row after row instead, one contiguous stream per thread (44-48 GB/s against 34 for
// the strips, 40-42 for oneDNN's packed GEMV, on the 2-core EPYC of benchmarks/RESULTS.md).
//
// CPUs without AVX-512F get `supported() == false` and herd keeps PyTorch's kernels (no slow fallback here).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "claim_pool.h"
#include "cpu_features.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using herd_kernels::rms_norm_row;
using herd_kernels::tail_mask;

constexpr int64_t kRows = 4;  // weight rows per strip

// --- activations -------------------------------------------------------------------------------------------

// x [m, k] (bf16, fp16 or fp32) as contiguous fp32 (x itself when it already is).
at::Tensor to_float(const at::Tensor& x2) { return x2.to(at::kFloat).contiguous(); }

// bf16 weights are read as 32-bit words, each holding inputs 2i (low half) and 2i + 1 (high half); x is split
// the same way so that both halves multiply a contiguous run of x: even[m][k/2], odd[m][k/2].
void split_even_odd(const float* x, int64_t m, int64_t k, std::vector<float>& even,
                    std::vector<float>& odd) {
  const int64_t h = k / 2;
  even.resize(m * h);
  odd.resize(m * h);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < h; ++j) {
      even[i * h + j] = x[i * k + 2 * j];
      odd[i * h + j] = x[i * k + 2 * j + 1];
    }
}

template <typename Fn>
void for_strips(int64_t m, int64_t n, int64_t bytes_per_row, const Fn& fn) {
  // A task is a few hundred KiB of weight: big enough to amortise the task, small enough to balance 2-64 cores.
  const int64_t rows_per_task = std::max<int64_t>(kRows, (256 * 1024 / std::max<int64_t>(bytes_per_row, 1)));
  const int64_t strips = (n + kRows - 1) / kRows;
  herd_kernels::parallel_rows(m, 0, strips, std::max<int64_t>(1, rows_per_task / kRows), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) fn(s * kRows, std::min(kRows, n - s * kRows));
  });
}

// The output's raw pointer and dtype, looked up once per call rather than per element.
struct Output {
  explicit Output(at::Tensor& y) : dtype(y.scalar_type()), data(y.data_ptr()) {}
  void store(int64_t index, float v) const {
    if (dtype == at::kFloat)
      static_cast<float*>(data)[index] = v;
    else if (dtype == at::kBFloat16)
      static_cast<at::BFloat16*>(data)[index] = at::BFloat16(v);
    else
      static_cast<at::Half*>(data)[index] = at::Half(v);
  }
  // A strip's results (x rows c0 .. c0 + cc - 1 against weight rows r0 .. r0 + rr - 1, out[c * rr + r]) into
  // the [m, n] output, times the rows' scales where there are.
  void store_strip(const float* out, int64_t rr, int64_t cc, int64_t c0, int64_t r0, int64_t n,
                   const float* scale = nullptr) const {
    for (int64_t c = 0; c < cc; ++c)
      for (int64_t r = 0; r < rr; ++r)
        store((c0 + c) * n + r0 + r, scale == nullptr ? out[c * rr + r] : out[c * rr + r] * scale[r0 + r]);
  }
  at::ScalarType dtype;
  void* data;
};

// Each kernel takes R rows of W (a strip) against C rows of x: every weight vector is widened once and used for
// all C rows. With one row of x, two accumulators per weight row keep enough FMAs in flight.
template <int C>
constexpr int kAcc = C == 1 ? 2 : 1;

// A strip reads kRows rows side by side, which the hardware prefetcher follows poorly: each step also touches the
// same columns two strips ahead (the rows a thread reads next), which measured 10-40% more bandwidth per core
// than prefetching ahead within the row.
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// --- bf16 ---------------------------------------------------------------------------------------------------

// 16 words (32 inputs) of R rows of w against C rows of x split into even/odd halves (row stride h floats).
template <int R, int C, int A>
HERD_AVX512 inline void bf16_step(const uint32_t* w, int64_t h, const float* even, const float* odd, int64_t j,
                                  __mmask16 mask, __m512 (&acc)[R][C][A]) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 xe[C], xo[C];
  for (int c = 0; c < C; ++c) {
    xe[c] = _mm512_maskz_loadu_ps(mask, even + c * h + j);
    xo[c] = _mm512_maskz_loadu_ps(mask, odd + c * h + j);
  }
  for (int r = 0; r < R; ++r) {
    prefetch(w + (r + 2 * R) * h + j);
    const __m512i v = _mm512_maskz_loadu_epi32(mask, w + r * h + j);
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    for (int c = 0; c < C; ++c) {
      acc[r][c][0] = _mm512_fmadd_ps(we, xe[c], acc[r][c][0]);
      acc[r][c][A - 1] = _mm512_fmadd_ps(wo, xo[c], acc[r][c][A - 1]);
    }
  }
}

// w: R rows of h = k / 2 words; even/odd: C rows of h floats each; out[c * R + r].
template <int R, int C>
HERD_AVX512 void bf16_block(const uint32_t* w, int64_t h, const float* even, const float* odd, float* out) {
  constexpr int A = kAcc<C>;
  __m512 acc[R][C][A];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int a = 0; a < A; ++a) acc[r][c][a] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= h; j += 16) bf16_step<R, C, A>(w, h, even, odd, j, static_cast<__mmask16>(0xFFFF), acc);
  if (j < h) bf16_step<R, C, A>(w, h, even, odd, j, tail_mask(h - j), acc);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      __m512 sum = acc[r][c][0];
      if constexpr (A == 2) sum = _mm512_add_ps(sum, acc[r][c][1]);
      out[c * R + r] = _mm512_reduce_add_ps(sum);
    }
}

// With AVX512-BF16 and bf16 activations, `vdpbf16ps` takes a word of w and a word of x (two inputs each) straight
// into an fp32 sum: no widening, and the rows of x are read as they are. The products are exact in fp32 either
// way; the sums round in another order.
template <int R, int C, int A>
HERD_AVX512_BF16 inline void bf16_dot_step(const uint32_t* w, int64_t h, const uint32_t* x, int64_t j,
                                           __mmask16 mask, __m512 (&acc)[R][C][A], int a) {
  __m512bh xv[C];
  for (int c = 0; c < C; ++c) xv[c] = (__m512bh)_mm512_maskz_loadu_epi32(mask, x + c * h + j);
  prefetch(w + 1024 + j);  // 4 KiB ahead in the stream of rows
  for (int r = 0; r < R; ++r) {
    const __m512bh v = (__m512bh)_mm512_maskz_loadu_epi32(mask, w + r * h + j);
    for (int c = 0; c < C; ++c) acc[r][c][a] = _mm512_dpbf16_ps(acc[r][c][a], v, xv[c]);
  }
}

// Row row0 of w against C rows of x; its sums (acc lanes) into sums[c * R + row0].
template <int R, int C>
HERD_AVX512_BF16 inline void bf16_dot_row(const uint32_t* w, int64_t h, const uint32_t* x, int row0, __m512* sums) {
  constexpr int A = kAcc<C>;
  __m512 acc[1][C][A];
  for (int c = 0; c < C; ++c)
    for (int a = 0; a < A; ++a) acc[0][c][a] = _mm512_setzero_ps();
  const uint32_t* wr = w + row0 * h;
  int64_t j = 0, step = 0;
  for (; j + 16 <= h; j += 16, ++step)
    bf16_dot_step<1, C, A>(wr, h, x, j, static_cast<__mmask16>(0xFFFF), acc, static_cast<int>(step % A));
  if (j < h) bf16_dot_step<1, C, A>(wr, h, x, j, tail_mask(h - j), acc, 0);
  for (int c = 0; c < C; ++c) {
    sums[c * R + row0] = acc[0][c][0];
    if constexpr (A == 2) sums[c * R + row0] = _mm512_add_ps(sums[c * R + row0], acc[0][c][1]);
  }
}

// w: R rows of h words; x: C rows of h words (bf16 pairs); out[c * R + r]. The rows are read one after another: in
// a model's step every weight comes from memory (the step's other weights have evicted it since the last step),
// and one stream per thread is what the prefetchers follow best. Rows side by side, each dot product's chain kept
// short, were 1.5x faster on a weight in L1/L2 but took 1.5-1.9x as long on one in memory (a [1024, 256] expert:
// 61 against 33 us on one core).
template <int R, int C>
HERD_AVX512_BF16 void bf16_dot_block(const uint32_t* w, int64_t h, const uint32_t* x, float* out) {
  __m512 sums[R * C];
  for (int r = 0; r < R; ++r) bf16_dot_row<R, C>(w, h, x, r, sums);
  if constexpr (C == 1) {
    herd_kernels::reduce_add(sums, R, out);
  } else {  // measured faster here than reducing them together (a strip's runs are short and overlap)
    for (int i = 0; i < R * C; ++i) out[i] = _mm512_reduce_add_ps(sums[i]);
  }
}

bool bf16_dot_supported() { return herd_kernels::has_avx512_bf16(); }

// --- INT8, one scale per output row (applied by the caller) ----------------------------------------------------

// Each 64 inputs are read as 16 dwords; byte b of dword i is input 4i + b. Shifting byte b to the top of its dword
// and clearing the rest gives q * 2^24 as an int32, which converts to float exactly: no byte shuffles (the
// sign-extending loads cost twice as much here), and the 2^24 is taken out of the row's scale. x is laid out to
// match once per call: for each run of 64 inputs, four runs of 16 floats (inputs 4i, 4i + 1, 4i + 2, 4i + 3).
constexpr float kInt8Unit = 1.f / 16777216.f;  // 2^-24

void split_quarters(const float* x, int64_t m, int64_t k, std::vector<float>& quarters) {
  const int64_t k64 = k / 64 * 64;
  quarters.resize(m * k64);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t blk = 0; blk < k64; blk += 64)
      for (int b = 0; b < 4; ++b)
        for (int l = 0; l < 16; ++l) quarters[i * k64 + blk + b * 16 + l] = x[i * k + blk + 4 * l + b];
}

template <int B>
HERD_AVX512 inline __m512 int8_byte_times_2_24(__m512i v) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFF000000u));
  if constexpr (B == 0) return _mm512_cvtepi32_ps(_mm512_slli_epi32(v, 24));
  if constexpr (B == 3) return _mm512_cvtepi32_ps(_mm512_and_si512(v, top));
  return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_slli_epi32(v, 24 - 8 * B), top));
}

// q: R rows of k; quarters: C rows of k / 64 * 64 floats; x: C rows of k (for the last k % 64 inputs).
template <int R, int C>
HERD_AVX512 void int8_block(const int8_t* q, int64_t k, const float* quarters, const float* x, float* out) {
  const int64_t k64 = k / 64 * 64;
  __m512 acc[R][C][2], tail[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c][0] = acc[r][c][1] = tail[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k64; j += 64) {
    for (int r = 0; r < R; ++r) {
      prefetch(q + (r + 2 * R) * k + j);
      const __m512i v = _mm512_loadu_si512(q + r * k + j);
      const __m512 w[4] = {int8_byte_times_2_24<0>(v), int8_byte_times_2_24<1>(v), int8_byte_times_2_24<2>(v),
                           int8_byte_times_2_24<3>(v)};
      for (int c = 0; c < C; ++c)
        for (int b = 0; b < 4; ++b) {
          const __m512 xv = _mm512_loadu_ps(quarters + c * k64 + j + 16 * b);
          acc[r][c][b & 1] = _mm512_fmadd_ps(w[b], xv, acc[r][c][b & 1]);
        }
    }
  }
  for (int64_t j = k64; j < k; j += 16) {
    const __mmask16 mask = tail_mask(k - j);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, q + r * k + j)));
      for (int c = 0; c < C; ++c)
        tail[r][c] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + c * k + j), tail[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      out[c * R + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][c][0], acc[r][c][1])) * kInt8Unit +
                       _mm512_reduce_add_ps(tail[r][c]);
}

// Calls block<R, C>(out, c0) for a strip of `rows` (1..kRows) weight rows and every run of up to MaxC rows of
// x, C known at compile time; `out` holds C * R results, x row c0 + c and weight row r at out[c * R + r].
template <int MaxC, typename Block, typename Emit>
void over_strip(int64_t rows, int64_t m, const Block& block, const Emit& emit) {
  float out[kRows * MaxC];
  auto with_r = [&](auto r) {
    constexpr int R = decltype(r)::value;
    int64_t c0 = 0;
    for (; c0 + MaxC <= m; c0 += MaxC) {
      block(std::integral_constant<int, R>{}, std::integral_constant<int, MaxC>{}, c0, out);
      emit(R, MaxC, c0, out);
    }
    const int64_t left = m - c0;
    if (left == 0) return;
    if constexpr (MaxC > 1) {
      if (left == 1) block(std::integral_constant<int, R>{}, std::integral_constant<int, 1>{}, c0, out);
      if constexpr (MaxC > 2) {
        if (left == 2) block(std::integral_constant<int, R>{}, std::integral_constant<int, 2>{}, c0, out);
        if constexpr (MaxC > 3) {
          if (left == 3) block(std::integral_constant<int, R>{}, std::integral_constant<int, 3>{}, c0, out);
        }
      }
    }
    emit(R, left, c0, out);
  };
  switch (rows) {
    case 4: with_r(std::integral_constant<int, 4>{}); break;
    case 3: with_r(std::integral_constant<int, 3>{}); break;
    case 2: with_r(std::integral_constant<int, 2>{}); break;
    default: with_r(std::integral_constant<int, 1>{}); break;
  }
}

// --- ops ----------------------------------------------------------------------------------------------------

bool supported() { return herd_kernels::has_avx512(); }

// Checks x against a weight of `k` inputs and gives x as [m, k], the output [m, n] in x's dtype and its shape.
std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>> prepare(const at::Tensor& x, int64_t k, int64_t n,
                                                                 const char* op) {
  TORCH_CHECK(supported(), op, ": this CPU lacks AVX-512F/BW/VL");
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, not ", x.scalar_type());
  TORCH_CHECK(x.size(-1) == k, op, ": x has ", x.size(-1), " columns, the weight ", k);
  auto shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor x2 = x.reshape({-1, k});
  return {x2, at::empty({x2.size(0), n}, x.options()), shape};
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(),
              "gemv_bf16: the weight must be a contiguous bf16 [N, K]");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(k % 2 == 0, "gemv_bf16: K must be even, got ", k);
  auto [x2, y, shape] = prepare(x, k, n, "gemv_bf16");
  const int64_t m = x2.size(0), h = k / 2;
  if (m == 0 || n == 0) return y.view(shape);
  const auto* words = reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>());
  const Output dst(y);
  if (x2.scalar_type() == at::kBFloat16 && bf16_dot_supported()) {
    const at::Tensor xc = x2.contiguous();
    const auto* xw = reinterpret_cast<const uint32_t*>(xc.data_ptr<at::BFloat16>());
    // One row of x: a strip of four weight rows, their sums reduced together. Several rows of x: one weight row
    // at a time against runs of four of them, so that it comes from memory once and from L1 after.
    for_strips(m, n, 2 * k, [&](int64_t s0, int64_t strip_rows) {
      const auto block = [&](int64_t r0, int64_t rows) {
        over_strip<4>(
            rows, m,
            [&](auto r, auto c, int64_t c0, float* out) {
              bf16_dot_block<decltype(r)::value, decltype(c)::value>(words + r0 * h, h, xw + c0 * h, out);
            },
            [&](int64_t rr, int64_t cc, int64_t c0, const float* out) { dst.store_strip(out, rr, cc, c0, r0, n); });
      };
      if (m == 1) {
        block(s0, strip_rows);
      } else {
        for (int64_t r0 = s0; r0 < s0 + strip_rows; ++r0) block(r0, 1);
      }
    });
    return y.view(shape);
  }
  std::vector<float> even, odd;
  split_even_odd(to_float(x2).data_ptr<float>(), m, k, even, odd);
  for_strips(m, n, 2 * k, [&](int64_t r0, int64_t rows) {
    over_strip<4>(
        rows, m,
        [&](auto r, auto c, int64_t c0, float* out) {
          bf16_block<decltype(r)::value, decltype(c)::value>(words + r0 * h, h, &even[c0 * h], &odd[c0 * h], out);
        },
        [&](int64_t rr, int64_t cc, int64_t c0, const float* out) { dst.store_strip(out, rr, cc, c0, r0, n); });
  });
  return y.view(shape);
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "gemv_int8: the weight must be a contiguous int8 [N, K]");
  const int64_t n = q.size(0), k = q.size(1);
  TORCH_CHECK(scale.numel() == n, "gemv_int8: ", scale.numel(), " scales for ", n, " rows");
  auto [x2, y, shape] = prepare(x, k, n, "gemv_int8");
  const int64_t m = x2.size(0);
  if (m == 0 || n == 0) return y.view(shape);
  const at::Tensor xf = to_float(x2);
  const float* xp = xf.data_ptr<float>();
  std::vector<float> quarters;
  split_quarters(xp, m, k, quarters);
  const int64_t k64 = k / 64 * 64;
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  const float* sp = s.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const Output dst(y);
  for_strips(m, n, k, [&](int64_t s0, int64_t strip_rows) {
    const auto block = [&](int64_t r0, int64_t rows) {
      over_strip<2>(
          rows, m,
          [&](auto r, auto c, int64_t c0, float* out) {
            int8_block<decltype(r)::value, decltype(c)::value>(qp + r0 * k, k, quarters.data() + c0 * k64,
                                                                xp + c0 * k, out);
          },
          [&](int64_t rr, int64_t cc, int64_t c0, const float* out) {
            dst.store_strip(out, rr, cc, c0, r0, n, sp);
          });
    };
    // One row of x: the strip's rows one after another, one stream from memory (0.69-0.96x the time of four rows
    // side by side on weights beyond the cache); several rows of x: side by side, each widened weight vector
    // shared by more dot products (row by row took 1.22-1.28x as long at four rows).
    if (m == 1) {
      for (int64_t r0 = s0; r0 < s0 + strip_rows; ++r0) block(r0, 1);
    } else {
      block(s0, strip_rows);
    }
  });
  return y.view(shape);
}

// --- RMSNorm ------------------------------------------------------------------------------------------------

at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "rms_norm: CPU tensors only");
  const int64_t h = x.size(-1);
  at::Tensor x2 = x.reshape({-1, h}).contiguous();
  at::Tensor y = at::empty_like(x2);
  at::Tensor w;
  if (weight.has_value()) {
    TORCH_CHECK(weight->numel() == h, "rms_norm: weight of ", weight->numel(), " for rows of ", h);
    TORCH_CHECK(weight->scalar_type() == x.scalar_type(), "rms_norm: weight and x must share a dtype");
    w = weight->contiguous();
  }
  const int64_t rows = x2.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * h, wp, yp + r * h, h, static_cast<float>(eps));
    });
  });
  return y.view(x.sizes());
}

// Routed SwiGLU experts for a few rows in one call: each expert once on the rows that chose it, gate/up through
// gemv_bf16, then silu(gate) * up rounded as PyTorch rounds it (each op's result to bf16), then down. In Python the
// same takes ~6 ops per expert and a sort to group the rows, which at the demo model's size cost as much as the
// matmuls (a speculative verify's 8 rows on 3-4 experts: 0.34 -> 0.25 ms a layer).
// x [n, h] bf16; expert_ids [n] int64; gate_up [E, 2i, h] (gate's rows, then up's); down [E, h, i].
at::Tensor swiglu_experts_bf16(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& gate_up,
                               const at::Tensor& down) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "swiglu_experts_bf16: x must be a bf16 [n, h]");
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.dim() == 3 && gate_up.is_contiguous() &&
                  down.scalar_type() == at::kBFloat16 && down.dim() == 3 && down.is_contiguous(),
              "swiglu_experts_bf16: gate_up [E, 2I, H] and down [E, H, I] must be contiguous bf16");
  const int64_t n = x.size(0), h = x.size(1), experts = gate_up.size(0), inter = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(2) == h && gate_up.size(1) == 2 * inter && down.size(0) == experts &&
                  down.size(1) == h && down.size(2) == inter,
              "swiglu_experts_bf16: x [", n, ", ", h, "], gate_up ", gate_up.sizes(), " and down ", down.sizes(),
              " do not fit");
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong && expert_ids.numel() == n && expert_ids.device().is_cpu(),
              "swiglu_experts_bf16: expert_ids must be n int64 on the CPU");
  const at::Tensor xc = x.contiguous(), ids_c = expert_ids.contiguous();
  const int64_t* ids = ids_c.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> rows(experts);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(ids[r] >= 0 && ids[r] < experts, "swiglu_experts_bf16: expert ", ids[r], " of ", experts);
    rows[ids[r]].push_back(r);
  }
  at::Tensor out = at::empty({n, h}, x.options());
  const auto* src = xc.data_ptr<at::BFloat16>();
  auto* dst = out.data_ptr<at::BFloat16>();
  for (int64_t e = 0; e < experts; ++e) {
    const std::vector<int64_t>& mine = rows[e];
    if (mine.empty()) continue;
    const auto count = static_cast<int64_t>(mine.size());
    at::Tensor xe = xc;
    if (count < n) {
      xe = at::empty({count, h}, x.options());
      auto* p = xe.data_ptr<at::BFloat16>();
      for (int64_t j = 0; j < count; ++j) std::copy_n(src + mine[j] * h, h, p + j * h);
    }
    const at::Tensor gu = gemv_bf16(xe, gate_up[e]);
    at::Tensor act = at::empty({count, inter}, x.options());
    const auto* g = gu.data_ptr<at::BFloat16>();
    auto* a = act.data_ptr<at::BFloat16>();
    for (int64_t j = 0; j < count; ++j)
      for (int64_t c = 0; c < inter; ++c) {
        const float gate = static_cast<float>(g[j * 2 * inter + c]);
        const at::BFloat16 silu(gate / (1.f + std::exp(-gate)));
        a[j * inter + c] = at::BFloat16(static_cast<float>(silu) * static_cast<float>(g[j * 2 * inter + inter + c]));
      }
    const at::Tensor ye = gemv_bf16(act, down[e]);
    const auto* y = ye.data_ptr<at::BFloat16>();
    for (int64_t j = 0; j < count; ++j) std::copy_n(y + j * h, h, dst + mine[j] * h);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(herd_cpu, m) {
  m.def("supported() -> bool", &supported);  // a catch-all: it takes no tensor to dispatch on
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.def("swiglu_experts_bf16(Tensor x, Tensor expert_ids, Tensor gate_up, Tensor down) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("rms_norm", &rms_norm);
  m.impl("swiglu_experts_bf16", &swiglu_experts_bf16);
}
