// Kernels for AVX2 with FMA (AMD Zen 1-3, Intel Haswell and later without AVX-512): weights widened to
// fp32 in registers, fp32 activations, 8 lanes.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

namespace clasp {
namespace avx2 {

constexpr int MB = 2, NB = 4, MB_WIDE = 1, NB_WIDE = 6, MB_I4 = 1, NB_I4 = 4;

template <class T>
static inline void tail(const T* p, int n, T* buf) {  // n < 8 elements, zero-padded to a full step
  std::memset(buf, 0, 8 * sizeof(T));
  std::memcpy(buf, p, n * sizeof(T));
}

struct Base {
  using X = float;
  using XV = __m256;
  using Acc = __m256;
  static constexpr int KSTEP = 8;
  static inline Acc zero() { return _mm256_setzero_ps(); }
  static inline float reduce(Acc a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static inline XV load_x(const X* p) { return _mm256_loadu_ps(p); }
  static inline XV load_x_tail(const X* p, int n) {
    alignas(32) float b[8];
    tail(p, n, b);
    return _mm256_load_ps(b);
  }
  static inline Acc fma(Acc a, XV x, __m256 w) { return _mm256_fmadd_ps(x, w, a); }
};

struct BF16 : Base {
  using W = uint16_t;
  using WV = __m256;
  static inline WV widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static inline WV load_w(const W* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline WV load_w_tail(const W* p, int n) {
    alignas(16) uint16_t b[8];
    tail(p, n, b);
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
  }
};

struct F32 : Base {
  using W = float;
  using WV = __m256;
  static inline WV load_w(const W* p) { return _mm256_loadu_ps(p); }
  static inline WV load_w_tail(const W* p, int n) { return load_x_tail(p, n); }
};

struct I8 : Base {
  using W = int8_t;
  using WV = __m256;
  static inline WV widen(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }
  static inline WV load_w(const W* p) { return widen(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static inline WV load_w_tail(const W* p, int n) {
    alignas(16) int8_t b[16] = {};
    std::memcpy(b, p, n);
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
  }
};

struct Q4 {  // 64 nibbles -> eight vectors of 8 fp32 integers 0..15
  using WV = __m256;
  static constexpr int V = 8;
  static inline void unpack(const uint8_t* p, WV* out) {
    const __m256i f = _mm256_set1_epi32(15);
    for (int q = 0; q < 4; q++) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * q)));
      out[q] = _mm256_cvtepi32_ps(_mm256_and_si256(v, f));             // elements 8q .. 8q + 7
      out[4 + q] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));        // 32 + 8q ..
    }
  }
  static inline __m256 ones() { return _mm256_set1_ps(1.0f); }
  static inline __m256 fma(__m256 a, __m256 x, __m256 w) { return _mm256_fmadd_ps(x, w, a); }
  static inline __m256 scale_add(__m256 tot, __m256 grp, float s) { return _mm256_fmadd_ps(grp, _mm256_set1_ps(s), tot); }
};

struct AOps {  // attention: fp32 lanes
  using V = __m256;
  static constexpr int L = 8;
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline V widen(const uint16_t* p) { return BF16::widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline V set1(float x) { return _mm256_set1_ps(x); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float reduce(V a) { return Base::reduce(a); }
  static inline void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static inline V max(V a, V b) { return _mm256_max_ps(a, b); }
  static inline V floor(V a) { return _mm256_floor_ps(a); }
  static inline V pow2(V n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static inline V below(V x, V limit, V v) { return _mm256_and_ps(_mm256_cmp_ps(x, limit, _CMP_NLT_UQ), v); }
};

#include "kernels_impl.h"

bool x_is_bf16(WeightKind) { return false; }
void linear(const LinearArgs& a, int64_t n0, int64_t n1) { linear_fp32_x<BF16, F32, I8, Base, Q4>(a, n0, n1); }
void attention(const AttnArgs& a, int64_t t0, int64_t t1) { attend<AOps>(a, t0, t1); }
void attention_prepare(const AttnArgs& a, int64_t h0, int64_t h1) { attend_prepare<AOps>(a, h0, h1); }

}  // namespace avx2
}  // namespace clasp
#endif
