// Kernels for AVX-512 with BF16 dot products (AMD Zen 4/5, Intel Cooper Lake, Sapphire Rapids and later):
// bf16 pairs multiplied and summed into fp32 lanes by one instruction (vdpbf16ps).
#if defined(__x86_64__)
#include <immintrin.h>


#include "kernels.h"

namespace clasp {
namespace avx512bf16 {

constexpr int MB = 6, NB = 4, MB_WIDE = 2, NB_WIDE = 8, MB_I4 = 2, NB_I4 = 4;

static inline __mmask32 first(int n) { return static_cast<__mmask32>(_bzhi_u32(0xffffffffu, n)); }

struct Base {  // bf16 activations, fp32 accumulation in 16 lanes of pairs
  using X = uint16_t;
  using XV = __m512i;
  using Acc = __m512;
  static constexpr int KSTEP = 32;
  static inline Acc zero() { return _mm512_setzero_ps(); }
  static inline float reduce(Acc a) { return _mm512_reduce_add_ps(a); }
  static inline XV load_x(const X* p) { return _mm512_loadu_si512(p); }
  static inline XV load_x_tail(const X* p, int n) { return _mm512_maskz_loadu_epi16(first(n), p); }
  static inline Acc fma(Acc a, XV x, __m512i w) { return _mm512_dpbf16_ps(a, (__m512bh)x, (__m512bh)w); }
};

struct BF16 : Base {
  using W = uint16_t;
  using WV = __m512i;
  static inline WV load_w(const W* p) { return _mm512_loadu_si512(p); }
  static inline WV load_w_tail(const W* p, int n) { return _mm512_maskz_loadu_epi16(first(n), p); }
};

struct I8 : Base {  // int8 weights widened to bf16 exactly (|q| <= 128 fits bf16's 8-bit significand)
  using W = int8_t;
  using WV = __m512i;
  static inline WV widen(__m256i b) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
  static inline WV load_w(const W* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline WV load_w_tail(const W* p, int n) { return widen(_mm256_maskz_loadu_epi8(first(n), p)); }
};

struct Q4 {  // 64 nibbles -> two vectors of 32 bf16 integers 0..15, through a 16-entry table
  using WV = __m512i;
  static constexpr int V = 2;
  static inline void unpack(const uint8_t* p, WV* out) {
    const __m512i table = _mm512_set_epi16(
        0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040,
        0x4000, 0x3f80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0,
        0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000);
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    out[0] = _mm512_permutexvar_epi16(_mm512_and_si512(v, _mm512_set1_epi16(15)), table);
    out[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
  }
  static inline __m512i ones() { return _mm512_set1_epi16(0x3f80); }
  static inline __m512 fma(__m512 a, __m512i x, __m512i w) { return Base::fma(a, x, w); }
  static inline __m512 scale_add(__m512 tot, __m512 grp, float s) { return _mm512_fmadd_ps(grp, _mm512_set1_ps(s), tot); }
};

#include "kernels_impl.h"

bool x_is_bf16(WeightKind kind) { return kind != WeightKind::F32; }

void linear(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.kind) {
    case WeightKind::BF16: run<BF16>(a, n0, n1); break;
    case WeightKind::I8: run<I8>(a, n0, n1); break;
    case WeightKind::I4: run_i4<Base, Q4>(a, n0, n1); break;
    case WeightKind::F32: avx512::linear(a, n0, n1); break;  // no bf16 to gain: the AVX-512 fp32 kernel
  }
}


void attention(const AttnArgs& a, int64_t t0, int64_t t1) { avx512::attention(a, t0, t1); }  // fp32 lanes
void attention_prepare(const AttnArgs& a, int64_t h0, int64_t h1) { avx512::attention_prepare(a, h0, h1); }

}  // namespace avx512bf16
}  // namespace clasp
#endif
