// Kernels for AVX-512 with BF16 dot products (AMD Zen 4/5, Intel Cooper Lake, Sapphire Rapids and later):
// bf16 pairs multiplied and summed into fp32 lanes by one instruction (vdpbf16ps); int8 weights through
// VNNI's int16 pair products (every CPU with AVX512-BF16 has AVX512-VNNI).
#if defined(__x86_64__)
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <limits>


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

// ----------------------------------------------------------------------------- int8 weights, VNNI
//
// A draft's int8 layers: widening each int8 weight to bf16 (five conversions per 32 weights) made the
// product compute-bound at about half the memory's bandwidth. Here each row of x is written once as two
// int16 parts, x ~= xh * sh + xl * sl (a scale per row: sh = max|x| / B, sl = sh / (2B), |xh|, |xl| <= B;
// the residual part carries what the first rounds off, so a row keeps 28 bits or more of its largest
// value: outlier channels, common in real activations, cost the others no precision), int8 weights widen
// to int16 in one instruction, and VPDPWSSD sums pairs of products into int32 lanes exactly (B, from K,
// keeps every lane below 2^31; lanes are added in int64). Exact integer sums: the result depends on the
// row alone, whatever the row count, block or thread. Drafts only: verification never runs int8
// weights, so these numerics change which tokens are proposed, never the output.

static inline int64_t i8_bound(int64_t K) {
  const int64_t products_per_lane = 2 * ((K + 31) / 32);  // each int32 lane adds two products per step
  const int64_t bound = ((int64_t(1) << 31) - 1) / (128 * products_per_lane);
  return bound < 32767 ? bound : 32767;
}

static inline __m512 load16(const uint16_t* p) {  // 16 bf16 -> fp32 (exact)
  return (__m512)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
}

static inline __m512i round_i32(__m512 v) {
  return _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// Row of x (bf16) as its two int16 parts (K entries each); returns their scales {sh, sl}.
static void split_row(const uint16_t* x, int64_t K, int16_t* xh, int16_t* xl, float* scales) {
  __m512 amax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + k)));
  float top = _mm512_reduce_max_ps(amax);
  for (; k < K; k++) top = std::fmax(top, std::fabs(from_bf16(x[k])));
  if (!(top > 0.0f) || !std::isfinite(top)) {  // all zeros: zero sums; an infinite or NaN maximum: NaN sums
    std::memset(xh, 0, K * sizeof(int16_t));
    std::memset(xl, 0, K * sizeof(int16_t));
    scales[0] = scales[1] = top == 0.0f ? 1.0f : std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float b = static_cast<float>(i8_bound(K));
  const float sh = top / b, sl = sh / (2.0f * b);
  const __m512 inv_h = _mm512_set1_ps(1.0f / sh), inv_l = _mm512_set1_ps(1.0f / sl), vsh = _mm512_set1_ps(sh);
  const __m512 lim = _mm512_set1_ps(b);
  for (k = 0; k + 16 <= K; k += 16) {
    const __m512 v = load16(x + k);
    const __m512i h = round_i32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv_h), -lim), lim));
    const __m512 rest = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(h), vsh, v);  // v - h * sh, one rounding
    const __m512i l = round_i32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(rest, inv_l), -lim), lim));
    _mm256_storeu_si256((__m256i*)(xh + k), _mm512_cvtepi32_epi16(h));
    _mm256_storeu_si256((__m256i*)(xl + k), _mm512_cvtepi32_epi16(l));
  }
  for (; k < K; k++) {
    const float v = from_bf16(x[k]);
    const float h = std::fmin(std::fmax(std::nearbyint(v / sh), -b), b);
    xh[k] = static_cast<int16_t>(h);
    xl[k] = static_cast<int16_t>(std::fmin(std::fmax(std::nearbyint(std::fma(-h, sh, v) / sl), -b), b));
  }
  scales[0] = sh;
  scales[1] = sl;
}

static inline int64_t lanes_total(__m512i acc) {  // the 16 lanes added in int64: their total may pass 2^31
  const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc));
  const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc, 1));
  return _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi));
}

// Dots of one row's two parts with ``nb`` int8 weight rows (nb <= NBQ), exact: {high, low} per row.
template <int NBQ>
static inline void i8_dots(const int16_t* xh, const int16_t* xl, int64_t K, const int8_t* w, int64_t ldw, int nb,
                           int64_t (*out)[2], const int8_t* next) {
  __m512i ah[NBQ], al[NBQ];
#pragma GCC unroll 16
  for (int j = 0; j < NBQ; j++) ah[j] = al[j] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512i hv = _mm512_loadu_si512(xh + k), lv = _mm512_loadu_si512(xl + k);
    if (next && (k & 63) == 0)
#pragma GCC unroll 16
      for (int j = 0; j < NBQ; j++) _mm_prefetch(reinterpret_cast<const char*>(next + j * ldw + k), _MM_HINT_T1);
#pragma GCC unroll 16
    for (int j = 0; j < NBQ; j++) {
      if (j < nb) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + j * ldw + k)));
        ah[j] = _mm512_dpwssd_epi32(ah[j], hv, wv);
        al[j] = _mm512_dpwssd_epi32(al[j], lv, wv);
      }
    }
  }
  if (k < K) {
    const int r = static_cast<int>(K - k);
    const __m512i hv = _mm512_maskz_loadu_epi16(first(r), xh + k), lv = _mm512_maskz_loadu_epi16(first(r), xl + k);
    for (int j = 0; j < nb; j++) {
      const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(first(r), w + j * ldw + k));
      ah[j] = _mm512_dpwssd_epi32(ah[j], hv, wv);
      al[j] = _mm512_dpwssd_epi32(al[j], lv, wv);
    }
  }
  for (int j = 0; j < nb; j++) {
    out[j][0] = lanes_total(ah[j]);
    out[j][1] = lanes_total(al[j]);
  }
}

// Whether each block of weight rows asks for the next block's lines ahead (the rows of a draft's
// layers are short, 1.5-9 KB: the hardware's stream prefetchers restart at every block). Chosen by
// measurement at first use (cpu_linear.int8_prefetch): up to 1.4x faster on a Sapphire Rapids's short
// rows, unmeasured elsewhere.
static std::atomic<bool> g_i8_prefetch{false};
void set_int8_prefetch(bool on) { g_i8_prefetch.store(on, std::memory_order_relaxed); }

static void run_i8_vnni(const LinearArgs& a, int64_t n0, int64_t n1) {
  constexpr int NBQ = 8;  // weight rows streamed together (what reaches the memory's bandwidth)
  const int64_t K = a.K, M = a.M;
  const auto* x = static_cast<const uint16_t*>(a.x);
  const auto* w = static_cast<const int8_t*>(a.w);
  const bool prefetch = g_i8_prefetch.load(std::memory_order_relaxed);
  AlignedBuffer<int16_t> xh(M * K), xl(M * K);
  AlignedBuffer<float> sc(2 * M);
  for (int64_t m = 0; m < M; m++) split_row(x + m * K, K, xh.get() + m * K, xl.get() + m * K, sc.get() + 2 * m);
  int64_t dots[NBQ][2];
  for (int64_t n = n0; n < n1; n += NBQ) {
    const int nb = static_cast<int>(n1 - n < NBQ ? n1 - n : NBQ);
    for (int64_t m = 0; m < M; m++) {  // the block's weights stay in cache for the next row
      const int8_t* next = prefetch && m == 0 && n + 2 * NBQ <= n1 ? w + (n + NBQ) * K : nullptr;
      i8_dots<NBQ>(xh.get() + m * K, xl.get() + m * K, K, w + n * K, K, nb, dots, next);
      const double sh = sc.get()[2 * m], sl = sc.get()[2 * m + 1];
      for (int j = 0; j < nb; j++)
        store(a, m, n + j, static_cast<float>(static_cast<double>(dots[j][0]) * sh + static_cast<double>(dots[j][1]) * sl));
    }
  }
}

bool x_is_bf16(WeightKind kind) { return kind != WeightKind::F32; }

void linear(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.kind) {
    case WeightKind::BF16: run<BF16>(a, n0, n1); break;
    case WeightKind::I8: run_i8_vnni(a, n0, n1); break;
    case WeightKind::I4: run_i4<Base, Q4>(a, n0, n1); break;
    case WeightKind::F32: avx512::linear(a, n0, n1); break;  // no bf16 to gain: the AVX-512 fp32 kernel
  }
}


void attention(const AttnArgs& a, int64_t t0, int64_t t1) { avx512::attention(a, t0, t1); }  // fp32 lanes
void attention_prepare(const AttnArgs& a, int64_t h0, int64_t h1) { avx512::attention_prepare(a, h0, h1); }

}  // namespace avx512bf16
}  // namespace clasp
#endif
