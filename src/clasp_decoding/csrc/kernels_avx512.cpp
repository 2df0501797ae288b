// Kernels for AVX-512 without BF16 instructions (Intel Skylake-X to Ice Lake): weights widened to fp32
// in registers (bf16 is the top half of an fp32; int8 and int4 convert exactly), fp32 activations.
#if defined(__x86_64__)
#include <immintrin.h>


#include "kernels.h"

namespace clasp {
namespace avx512 {

constexpr int MB = 6, NB = 4, MB_WIDE = 2, NB_WIDE = 8, MB_I4 = 2, NB_I4 = 4;

static inline __mmask16 first(int n) { return static_cast<__mmask16>(_bzhi_u32(0xffffu, n)); }

struct Base {
  using X = float;
  using XV = __m512;
  using Acc = __m512;
  static constexpr int KSTEP = 16;
  static inline Acc zero() { return _mm512_setzero_ps(); }
  static inline float reduce(Acc a) { return _mm512_reduce_add_ps(a); }
  static inline XV load_x(const X* p) { return _mm512_loadu_ps(p); }
  static inline XV load_x_tail(const X* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static inline Acc fma(Acc a, XV x, __m512 w) { return _mm512_fmadd_ps(x, w, a); }
};

struct BF16 : Base {
  using W = uint16_t;
  using WV = __m512;
  static inline WV widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static inline WV load_w(const W* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline WV load_w_tail(const W* p, int n) { return widen(_mm256_maskz_loadu_epi16(first(n), p)); }
};

struct F32 : Base {
  using W = float;
  using WV = __m512;
  static inline WV load_w(const W* p) { return _mm512_loadu_ps(p); }
  static inline WV load_w_tail(const W* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
};

struct I8 : Base {
  using W = int8_t;
  using WV = __m512;
  static inline WV load_w(const W* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline WV load_w_tail(const W* p, int n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(first(n), p)));
  }
};

struct Q4 {  // 64 nibbles -> four vectors of 16 fp32 integers 0..15
  using WV = __m512;
  static constexpr int V = 4;
  static inline void unpack(const uint8_t* p, WV* out) {
    const __m128i* q = reinterpret_cast<const __m128i*>(p);
    __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(q)), hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(q + 1));
    const __m512i f = _mm512_set1_epi32(15);
    out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(lo, f));   // elements 0..15
    out[1] = _mm512_cvtepi32_ps(_mm512_and_si512(hi, f));   // 16..31
    out[2] = _mm512_cvtepi32_ps(_mm512_srli_epi32(lo, 4));  // 32..47
    out[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(hi, 4));  // 48..63
  }
  static inline __m512 ones() { return _mm512_set1_ps(1.0f); }
  static inline __m512 fma(__m512 a, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, a); }
  static inline __m512 scale_add(__m512 tot, __m512 grp, float s) { return _mm512_fmadd_ps(grp, _mm512_set1_ps(s), tot); }
};

struct AOps {  // attention: fp32 lanes
  using V = __m512;
  static constexpr int L = 16;
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline V widen(const uint16_t* p) {
    return BF16::widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline V set1(float x) { return _mm512_set1_ps(x); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float reduce(V a) { return _mm512_reduce_add_ps(a); }
  static inline void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline V max(V a, V b) { return _mm512_max_ps(a, b); }
  static inline V floor(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static inline V pow2(V n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static inline V below(V x, V limit, V v) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, limit, _CMP_NLT_UQ), v);
  }
};

#include "kernels_impl.h"

bool x_is_bf16(WeightKind) { return false; }
void linear(const LinearArgs& a, int64_t n0, int64_t n1) { linear_fp32_x<BF16, F32, I8, Base, Q4>(a, n0, n1); }
void attention(const AttnArgs& a, int64_t t0, int64_t t1) { attend<AOps>(a, t0, t1); }
void attention_prepare(const AttnArgs& a, int64_t h0, int64_t h1) { attend_prepare<AOps>(a, h0, h1); }

}  // namespace avx512
}  // namespace clasp
#endif
