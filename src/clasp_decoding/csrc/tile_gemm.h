// The tile kernel: a bf16 matrix product (fp32 sums, bf16 result) blocked for matrix tiles, written once
// against a small tile interface so that the same blocking runs on the real AMX tiles (kernels_amx.cpp)
// and on an exact scalar emulation of them (kernels_tile.cpp), which every machine builds and tests.
// (Included inside an implementation's namespace, after its tile struct; headers come from kernels.h.)
//
// Packed weights (pack_tiles in kernels_tile.cpp): the weight [N, K] is cut into blocks of 16 output
// features by 32 inputs, each one 1 KB "B" tile in the pairs layout TDPBF16PS reads:
//   tile(nb, kb)[p][f][i] = w[16 nb + f][32 kb + 2 p + i]     (p < 16 pairs, f < 16 features, i < 2)
// tiles of a feature block in K order, feature blocks one after the other; N and K padded with zeros to
// multiples of 16 and 32.
//
// The tile interface T (tile registers named by compile-time indices):
//   T::begin(), T::end()               claim / release the tile state for this thread's call
//   T::zero<t>()                       tile t = 0
//   T::load<t>(ptr, stride_bytes)      16 rows of 64 bytes
//   T::store<t>(ptr, stride_bytes)
//   T::dp<c, a, b>()                   C[c] += A[a] . B[b], TDPBF16PS's semantics (see kernels_tile.cpp)
//
// Row invariance: C tile row m depends on x row m only, and every output's sum is the same sequence
// (zero, then one dp per 32 inputs in K order, then the bias): whichever rows, tiles or threads share a
// call. Threads split feature blocks, never K.
#pragma once

// Tile registers: C0..C3 accumulators (rows x 16 features, fp32), A0/A1 rows of x, B0/B1 weights.
enum : int { C0 = 0, C1 = 1, C2 = 2, C3 = 3, A0 = 4, A1 = 5, B0 = 6, B1 = 7 };

// x as A tiles: row block rb, K block kb is the 1 KB tile at (rb * KB + kb) * TILE_ELEMS.
// Weights: feature block nb, K block kb at (nb * KB + kb) * TILE_ELEMS (the packed layout).

// One pass: feature blocks nb, nb+1 (if TWO_F) against row blocks rb, rb+1 (if TWO_R), over K blocks
// [kb0, kb1). The sums start from zero (kb0 == 0) or from the partial sums in ``c``, and end in ``c``.
template <class T, bool TWO_F, bool TWO_R>
inline void tile_pass(const uint16_t* x0, const uint16_t* w0, int64_t KB, int64_t kb0, int64_t kb1, float* c) {
  const uint16_t* x1 = x0 + KB * TILE_ELEMS;
  const uint16_t* w1 = w0 + KB * TILE_ELEMS;
  if (kb0 == 0) {
    T::template zero<C0>();
    if (TWO_F) T::template zero<C1>();
    if (TWO_R) T::template zero<C2>();
    if (TWO_F && TWO_R) T::template zero<C3>();
  } else {
    T::template load<C0>(c, 64);
    if (TWO_F) T::template load<C1>(c + 256, 64);
    if (TWO_R) T::template load<C2>(c + 512, 64);
    if (TWO_F && TWO_R) T::template load<C3>(c + 768, 64);
  }
  for (int64_t kb = kb0; kb < kb1; kb++) {
    T::template load<A0>(x0 + kb * TILE_ELEMS, 64);
    T::template load<B0>(w0 + kb * TILE_ELEMS, 64);
    T::template dp<C0, A0, B0>();
    if (TWO_F) {
      T::template load<B1>(w1 + kb * TILE_ELEMS, 64);
      T::template dp<C1, A0, B1>();
    }
    if (TWO_R) {
      T::template load<A1>(x1 + kb * TILE_ELEMS, 64);
      T::template dp<C2, A1, B0>();
      if (TWO_F) T::template dp<C3, A1, B1>();
    }
  }
  T::template store<C0>(c, 64);
  if (TWO_F) T::template store<C1>(c + 256, 64);
  if (TWO_R) T::template store<C2>(c + 512, 64);
  if (TWO_F && TWO_R) T::template store<C3>(c + 768, 64);
}

template <class T>
inline void tile_pass_any(bool two_f, bool two_r, const uint16_t* x0, const uint16_t* w0, int64_t KB, int64_t kb0,
                          int64_t kb1, float* c) {
  if (two_f && two_r)
    tile_pass<T, true, true>(x0, w0, KB, kb0, kb1, c);
  else if (two_f)
    tile_pass<T, true, false>(x0, w0, KB, kb0, kb1, c);
  else if (two_r)
    tile_pass<T, false, true>(x0, w0, KB, kb0, kb1, c);
  else
    tile_pass<T, false, false>(x0, w0, KB, kb0, kb1, c);
}

// out[m, n] = bf16(C[m][n] + bias[n]) for the valid rows and features of one C tile.
inline void tile_store(const TileArgs& a, const float* c, int64_t m0, int64_t n0) {
  const int64_t rows = min64(16, a.M - m0), cols = min64(16, a.N - n0);
  for (int64_t i = 0; i < rows; i++)
    for (int64_t j = 0; j < cols; j++) {
      float v = c[i * 16 + j];
      if (a.bias) v += a.bias[n0 + j];
      a.out[(m0 + i) * a.N + n0 + j] = to_bf16(v);
    }
}

// The four C tiles of a pass (those that exist) to the output.
inline void tile_store_pass(const TileArgs& a, const float* c, int64_t rb, int64_t nb, bool two_f, bool two_r) {
  tile_store(a, c, rb * 16, nb * 16);
  if (two_f) tile_store(a, c + 256, rb * 16, nb * 16 + 16);
  if (two_r) tile_store(a, c + 512, rb * 16 + 16, nb * 16);
  if (two_f && two_r) tile_store(a, c + 768, rb * 16 + 16, nb * 16 + 16);
}

constexpr int64_t FEW_ROW_BLOCKS = 4;   // up to 64 rows: every pass over all of K, weights read once
constexpr int64_t CHUNK_ROW_BLOCKS = 16;  // more rows: 256 rows ...
constexpr int64_t CHUNK_K_BLOCKS = 32;    // ... by 1024 inputs of x at a time (512 KB, in L2), partial sums kept

// Feature blocks [nb0, nb1) for all M rows.
template <class T>
void tile_linear(const TileArgs& a, int64_t nb0, int64_t nb1) {
  const int64_t M = a.M, K = a.K, KB = a.KB;
  const int64_t RB = (M + 15) / 16;
  // x copied into A tiles (zero-padded), so that every tile load reads one contiguous kilobyte.
  AlignedBuffer<uint16_t> xt(RB * KB * TILE_ELEMS);
  std::memset(xt.get(), 0, RB * KB * TILE_ELEMS * sizeof(uint16_t));
  for (int64_t m = 0; m < M; m++) {
    const uint16_t* src = a.x + m * a.ldx;
    uint16_t* dst = xt.get() + (m / 16) * KB * TILE_ELEMS + (m % 16) * 32;
    for (int64_t kb = 0; kb < KB; kb++)
      std::memcpy(dst + kb * TILE_ELEMS, src + kb * 32, min64(32, K - kb * 32) * sizeof(uint16_t));
  }
  T::begin();
  if (RB <= FEW_ROW_BLOCKS) {
    alignas(64) float c[4 * 256];
    for (int64_t nb = nb0; nb < nb1; nb += 2) {
      const bool two_f = nb + 1 < nb1;
      for (int64_t rb = 0; rb < RB; rb += 2) {
        const bool two_r = rb + 1 < RB;
        tile_pass_any<T>(two_f, two_r, xt.get() + rb * KB * TILE_ELEMS, a.w + nb * KB * TILE_ELEMS, KB, 0, KB, c);
        tile_store_pass(a, c, rb, nb, two_f, two_r);
      }
    }
  } else {
    // Partial sums of one chunk of rows, per (feature pair, row pair): four C tiles each.
    const int64_t pairs_f = (nb1 - nb0 + 1) / 2, pairs_r = (CHUNK_ROW_BLOCKS + 1) / 2;
    AlignedBuffer<float> part(pairs_f * pairs_r * 1024);
    for (int64_t rb0 = 0; rb0 < RB; rb0 += CHUNK_ROW_BLOCKS) {
      const int64_t rb1 = min64(RB, rb0 + CHUNK_ROW_BLOCKS);
      for (int64_t kb0 = 0; kb0 < KB; kb0 += CHUNK_K_BLOCKS) {
        const int64_t kb1 = min64(KB, kb0 + CHUNK_K_BLOCKS);
        for (int64_t nb = nb0; nb < nb1; nb += 2) {
          const bool two_f = nb + 1 < nb1;
          for (int64_t rb = rb0; rb < rb1; rb += 2) {
            const bool two_r = rb + 1 < rb1;
            float* c = part.get() + (((nb - nb0) / 2) * pairs_r + (rb - rb0) / 2) * 1024;
            tile_pass_any<T>(two_f, two_r, xt.get() + rb * KB * TILE_ELEMS, a.w + nb * KB * TILE_ELEMS, KB, kb0, kb1, c);
            if (kb1 == KB) tile_store_pass(a, c, rb, nb, two_f, two_r);
          }
        }
      }
    }
  }
  T::end();
}
