// The tile kernels' portable half: packing weights into tiles (and reading rows back), and an exact
// scalar emulation of the AMX tiles that runs the same blocking (tile_gemm.h) on any CPU.
//
// What TDPBF16PS computes, bit for bit (measured on a Sapphire Rapids-class Xeon: every output of random
// bf16 inputs over a wide exponent range equal): for each output element, two fp32 partial sums start at
// zero, even = sum over pairs p = 0..15 of a[2p] * b[2p] and odd = the same over a[2p+1] * b[2p+1], each
// added in order with round-to-nearest-even after every addition (a bf16 product is exact in fp32); then
// C <- C + (even + odd), rounded after each of the two additions. Denormal inputs and results are zero.
// The Intel manual's per-element pseudo-code (C += a0 b0, then C += a1 b1) matches only about 15% of the
// outputs; this order matches all of them. A fused multiply-add rounds once, after the exact product and
// sum, which is the same value: so a vector kernel built from FMAs in this order (kernels_tile_avx512.cpp)
// reproduces the tiles too.
#include <cfloat>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace clasp {

void pack_tiles(const uint16_t* w, int64_t N, int64_t K, uint16_t* out, int64_t nb0, int64_t nb1) {
  const int64_t KB = (K + 31) / 32;
  for (int64_t nb = nb0; nb < nb1; nb++) {
    uint16_t* block = out + nb * KB * TILE_ELEMS;
    std::memset(block, 0, KB * TILE_ELEMS * sizeof(uint16_t));
    for (int64_t f = 0; f < 16 && nb * 16 + f < N; f++) {
      const uint16_t* row = w + (nb * 16 + f) * K;
      for (int64_t k = 0; k < K; k++) block[(k / 32) * TILE_ELEMS + ((k % 32) / 2) * 32 + f * 2 + (k % 2)] = row[k];
    }
  }
}

void unpack_tile_rows(const uint16_t* packed, int64_t K, const int64_t* ids, int64_t count, uint16_t* out) {
  const int64_t KB = (K + 31) / 32;
  for (int64_t r = 0; r < count; r++) {
    const int64_t nb = ids[r] / 16, f = ids[r] % 16;
    const uint16_t* block = packed + nb * KB * TILE_ELEMS + f * 2;
    uint16_t* row = out + r * K;
    for (int64_t k = 0; k < K; k++) row[k] = block[(k / 32) * TILE_ELEMS + ((k % 32) / 2) * 32 + (k % 2)];
  }
}

namespace tile_emu {

static inline float flush(float v) { return std::fabs(v) < FLT_MIN ? std::copysign(0.0f, v) : v; }
static inline float input(uint16_t h) { return flush(from_bf16(h)); }

// Eight tile registers of 16 rows x 64 bytes, per thread.
struct Emulated {
  alignas(64) static inline thread_local unsigned char reg[8][16 * 64];

  static void begin() {}
  static void end() {}
  template <int t>
  static void zero() {
    std::memset(reg[t], 0, sizeof(reg[t]));
  }
  template <int t>
  static void load(const void* p, int64_t stride) {
    for (int r = 0; r < 16; r++) std::memcpy(reg[t] + r * 64, static_cast<const char*>(p) + r * stride, 64);
  }
  template <int t>
  static void store(void* p, int64_t stride) {
    for (int r = 0; r < 16; r++) std::memcpy(static_cast<char*>(p) + r * stride, reg[t] + r * 64, 64);
  }
  template <int c, int a, int b>
  static void dp() {
    float C[16][16];
    uint16_t A[16][32], B[16][32];
    std::memcpy(C, reg[c], sizeof(C));
    std::memcpy(A, reg[a], sizeof(A));
    std::memcpy(B, reg[b], sizeof(B));
    for (int m = 0; m < 16; m++)
      for (int n = 0; n < 16; n++) {
        float even = 0.0f, odd = 0.0f;
        for (int p = 0; p < 16; p++) {
          even = flush(std::fma(input(A[m][2 * p]), input(B[p][2 * n]), even));
          odd = flush(std::fma(input(A[m][2 * p + 1]), input(B[p][2 * n + 1]), odd));
        }
        C[m][n] = flush(flush(C[m][n]) + flush(even + odd));
      }
    std::memcpy(reg[c], C, sizeof(C));
  }
};

#include "tile_gemm.h"

void linear(const TileArgs& a, int64_t nb0, int64_t nb1) { tile_linear<Emulated>(a, nb0, nb1); }

}  // namespace tile_emu
}  // namespace clasp
