// The tile kernel's sums on AVX-512 vector units: the same bits as the AMX tiles (kernels_tile.cpp says
// why), for CPUs without tiles, or where the OS refuses them, or row counts where vectors are faster.
// Lanes run over the 16 output features of a packed tile; per 32 inputs, two accumulators (the even and
// the odd inputs) are summed pair by pair with FMAs, then added to the running sum as (even + odd).
// Needs flush-to-zero and denormals-are-zero set (the dispatcher sets them around every call).
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

namespace clasp {
namespace tile_avx512 {

constexpr int ROWS = 6;  // rows per micro-kernel: 3 x 6 accumulators + 2 weight vectors fit in 32 registers

// Rows ``R`` of x (fp32, K padded to 32, rows ``ldx`` apart) against one feature block's tiles.
template <int R>
static inline void block(const float* x, int64_t ldx, const uint16_t* w, int64_t KB, float* res) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t kb = 0; kb < KB; kb++) {
    const uint16_t* t = w + kb * TILE_ELEMS;
    const float* xk = x + kb * 32;
    __m512 even[R], odd[R];
    for (int r = 0; r < R; r++) even[r] = odd[r] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int p = 0; p < 16; p++) {
      const __m512i v = _mm512_loadu_si512(t + p * 32);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, high));
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) {
        even[r] = _mm512_fmadd_ps(_mm512_set1_ps(xk[r * ldx + 2 * p]), we, even[r]);
        odd[r] = _mm512_fmadd_ps(_mm512_set1_ps(xk[r * ldx + 2 * p + 1]), wo, odd[r]);
      }
    }
    for (int r = 0; r < R; r++) acc[r] = _mm512_add_ps(acc[r], _mm512_add_ps(even[r], odd[r]));
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(res + r * 16, acc[r]);
}

template <int R>
static void rows_of(int r, const float* x, int64_t ldx, const uint16_t* w, int64_t KB, float* res) {
  if constexpr (R >= 1) {
    if (r == R)
      block<R>(x, ldx, w, KB, res);
    else
      rows_of<R - 1>(r, x, ldx, w, KB, res);
  }
}

void linear(const TileArgs& a, int64_t nb0, int64_t nb1) {
  const int64_t Kp = a.KB * 32;
  constexpr int64_t CHUNK = 64;  // rows widened to fp32 at a time
  AlignedBuffer<float> xf(min64(a.M, CHUNK) * Kp);
  alignas(64) float res[ROWS * 16];
  for (int64_t m0 = 0; m0 < a.M; m0 += CHUNK) {
    const int64_t rows = min64(CHUNK, a.M - m0);
    for (int64_t i = 0; i < rows; i++) {
      const uint16_t* src = a.x + (m0 + i) * a.ldx;
      float* dst = xf.get() + i * Kp;
      for (int64_t k = 0; k < a.K; k++) dst[k] = from_bf16(src[k]);
      std::memset(dst + a.K, 0, (Kp - a.K) * sizeof(float));
    }
    for (int64_t nb = nb0; nb < nb1; nb++) {
      const uint16_t* w = a.w + nb * a.KB * TILE_ELEMS;
      const int64_t cols = min64(16, a.N - nb * 16);
      for (int64_t i = 0; i < rows; i += ROWS) {
        const int r = static_cast<int>(min64(ROWS, rows - i));
        rows_of<ROWS>(r, xf.get() + i * Kp, Kp, w, a.KB, res);
        for (int q = 0; q < r; q++)
          for (int64_t j = 0; j < cols; j++) {
            float v = res[q * 16 + j];
            if (a.bias) v += a.bias[nb * 16 + j];
            a.out[(m0 + i + q) * a.N + nb * 16 + j] = to_bf16(v);
          }
      }
    }
  }
}

}  // namespace tile_avx512
}  // namespace clasp
#endif
