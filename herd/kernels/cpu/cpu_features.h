// What herd's CPU kernel sources share: the target attributes of their vector code and the checks, made once per
// process, that this CPU runs it. Each op checks before it runs, so a call on another CPU is an error, not an
// illegal instruction.
#pragma once

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

}  // namespace herd_kernels
