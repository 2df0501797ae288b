// Row-invariant small-batch linear kernels: the interface shared by the dispatcher (linear.cpp) and the
// per-ISA kernels (linear_<isa>.cpp, each compiled for its instruction set, none including torch).
//
// out[m, n] = sum_k x[m, k] * w[n, k] (* scale[n]) (+ bias[n]) for m < M, n0 <= n < n1.
// Every output element is one dot product accumulated in a fixed order that depends on K and the ISA
// only, never on M or on which rows share a call: a row's bits do not depend on the batch it is in.
#pragma once
#include <cstdint>

namespace clasp {

enum class WeightKind : int { BF16 = 0, F32 = 1, I8 = 2, I4 = 3 };

struct LinearArgs {
  const void* x;        // [M, K]: bf16 for the avx512bf16 kernels of BF16/I8/I4 weights, else fp32
  int64_t M, K, N;
  const void* w;        // BF16/F32: [N, K]; I8: [N, K] int8; I4: [N, K / 2] packed (see pack_int4 in quant.py)
  const float* scale;   // I8: [N]; I4: [N, K / group]
  const float* zero;    // I4: [N, K / group] (the group's minimum: w = q * scale + zero)
  int64_t group;        // I4: elements per group (a multiple of 64 dividing K)
  const float* bias;    // [N] or nullptr
  void* out;            // [M, N]: bf16 (BF16, I8, I4 weights) or fp32 (F32 weights)
  WeightKind kind;
};

// Each computes output features [n0, n1) for all M rows.
#define CLASP_DECLARE_ISA(ns)                                        \
  namespace ns {                                                     \
  void linear(const LinearArgs& a, int64_t n0, int64_t n1);          \
  bool x_is_bf16(WeightKind kind);                                   \
  }
CLASP_DECLARE_ISA(scalar)
#if defined(__x86_64__)
CLASP_DECLARE_ISA(avx2)
CLASP_DECLARE_ISA(avx512)
CLASP_DECLARE_ISA(avx512bf16)
#endif

// fp32 -> bf16, round to nearest even, NaN kept quiet (as c10::BFloat16 rounds).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// The epilogue every ISA shares: scale, bias, round, store.
inline void store(const LinearArgs& a, int64_t m, int64_t n, float dot) {
  if (a.kind == WeightKind::I8) dot *= a.scale[n];
  if (a.bias) dot += a.bias[n];
  if (a.kind == WeightKind::F32)
    static_cast<float*>(a.out)[m * a.N + n] = dot;
  else
    static_cast<uint16_t*>(a.out)[m * a.N + n] = to_bf16(dot);
}

}  // namespace clasp
