// (Included inside an ISA's namespace: the headers it needs come from kernels.h.)
//
// The blocked driver shared by every ISA (included once per ISA file, inside that ISA's namespace and
// target region). The ISA file defines, before including this header, one ops struct per weight kind:
//
//   struct Ops { using X; using W; using WV; using XV; using Acc;
//                static constexpr int KSTEP;               // elements of K per vector step
//                static Acc zero(); static float reduce(Acc);
//                static WV load_w(const W*); static WV load_w_tail(const W*, int n);
//                static XV load_x(const X*); static XV load_x_tail(const X*, int n);
//                static Acc fma(Acc, XV, WV); };
//
// and the constants MB (rows of x per micro-kernel) and NB (output features per micro-kernel). Each
// output element's sum runs over K in KSTEP-wide lanes, in K order, then one fixed lane reduction: the
// same operations whichever micro-kernel shape, row block or thread computes it, so rows are invariant.

#define CLASP_INLINE inline __attribute__((always_inline))

// A tile is TMB rows of x by TNB output features; ``res`` holds its results row by row (stride TNB) and
// ``state`` its partial sums between K-chunks (stride TNB). Every tile shape computes each output element
// with the same operations: one accumulator over K in KSTEP lanes, then one reduction. So the tile can
// be chosen by the row count (tall for many rows, wide for few) without changing any bit.

template <class O, int mb, int nb, int TNB>
CLASP_INLINE void micro(const typename O::X* x, int64_t K, const typename O::W* w, int64_t ldw, int64_t k0, int64_t k1,
                        typename O::Acc* state, bool resume, float* res) {
  // Sums over [k0, k1); starts from ``state`` when resuming a K-chunked sum; ends by reducing into ``res``
  // (the last chunk) or by saving the lanes into ``state``. Chunking never changes the lanes' sequence.
  // No software prefetch: the hardware's stream prefetchers read rows of weights faster (measured: 1-row
  // products at 62-68 GB/s without it, 52-55 with it, on AMD Zen 5).
  typename O::Acc acc[mb][nb];
#pragma GCC unroll 8
  for (int i = 0; i < mb; i++)
#pragma GCC unroll 16
    for (int j = 0; j < nb; j++) acc[i][j] = resume ? state[i * TNB + j] : O::zero();
  int64_t k = k0;
  for (; k + O::KSTEP <= k1; k += O::KSTEP) {
    typename O::WV wv[nb];
#pragma GCC unroll 16
    for (int j = 0; j < nb; j++) wv[j] = O::load_w(w + j * ldw + k);
#pragma GCC unroll 8
    for (int i = 0; i < mb; i++) {
      typename O::XV xv = O::load_x(x + i * K + k);
#pragma GCC unroll 16
      for (int j = 0; j < nb; j++) acc[i][j] = O::fma(acc[i][j], xv, wv[j]);
    }
  }
  if (k < k1) {  // only in the last chunk: the remainder of K, zero-padded
    const int r = static_cast<int>(k1 - k);
    typename O::WV wv[nb];
    for (int j = 0; j < nb; j++) wv[j] = O::load_w_tail(w + j * ldw + k, r);
    for (int i = 0; i < mb; i++) {
      typename O::XV xv = O::load_x_tail(x + i * K + k, r);
      for (int j = 0; j < nb; j++) acc[i][j] = O::fma(acc[i][j], xv, wv[j]);
    }
  }
  if (res) {
#pragma GCC unroll 8
    for (int i = 0; i < mb; i++)
#pragma GCC unroll 16
      for (int j = 0; j < nb; j++) res[i * TNB + j] = O::reduce(acc[i][j]);
  } else {
    for (int i = 0; i < mb; i++)
      for (int j = 0; j < nb; j++) state[i * TNB + j] = acc[i][j];
  }
}

// One block of output features [n, n + nb) against rows [m, m + mb): picks the micro-kernel instance.
template <class O, int mb, int TNB>
CLASP_INLINE void rows(const typename O::X* x, int64_t K, const typename O::W* w, int64_t ldw, int nb, int64_t k0,
                       int64_t k1, typename O::Acc* state, bool resume, float* res) {
  if (nb == TNB) {
    micro<O, mb, TNB, TNB>(x, K, w, ldw, k0, k1, state, resume, res);
  } else {
    for (int j = 0; j < nb; j++) {  // the last few features, one at a time (the same sums)
      float one[8 * TNB];
      micro<O, mb, 1, TNB>(x, K, w + j * ldw, ldw, k0, k1, state + j, resume, res ? one : nullptr);
      if (res)
        for (int i = 0; i < mb; i++) res[i * TNB + j] = one[i * TNB];
    }
  }
}

// rows<O, mb> for a row count known only at run time (1 <= mb <= top).
template <class O, int top, int TNB>
CLASP_INLINE void rows_of(int mb, const typename O::X* x, int64_t K, const typename O::W* w, int64_t ldw, int nb,
                          int64_t k0, int64_t k1, typename O::Acc* state, bool resume, float* res) {
  if constexpr (top >= 1) {
    if (mb == top)
      rows<O, top, TNB>(x, K, w, ldw, nb, k0, k1, state, resume, res);
    else
      rows_of<O, top - 1, TNB>(mb, x, K, w, ldw, nb, k0, k1, state, resume, res);
  }
}

constexpr int64_t KCHUNK_BYTES = 1024;   // K-chunk of x per row when the rows do not fit in cache at once
constexpr int64_t WHOLE_X_BYTES = 512 << 10;  // about half of a core's L2 on the CPUs measured

template <class O, int TMB, int TNB>
void run_tiles(const LinearArgs& a, int64_t n0, int64_t n1) {
  using X = typename O::X;
  using W = typename O::W;
  using Acc = typename O::Acc;
  const X* x = static_cast<const X*>(a.x);
  const W* w = static_cast<const W*>(a.w);
  const int64_t K = a.K, M = a.M;
  // Few rows: each block of weights meets all rows over the whole of K. Many rows: K in chunks, so that
  // the chunk of every row stays in cache while the block's weights are reused (partial sums kept).
  const int64_t kc = M * K * (int64_t)sizeof(X) <= WHOLE_X_BYTES ? K : KCHUNK_BYTES / (int64_t)sizeof(X);
  AlignedBuffer<Acc> state(kc < K ? M * TNB : 0);
  float res[TMB * TNB];
  for (int64_t n = n0; n < n1; n += TNB) {
    const int nb = static_cast<int>(n1 - n < TNB ? n1 - n : TNB);
    const W* wn = w + n * K;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t k1 = k0 + kc < K ? k0 + kc : K;
      const bool last = k1 == K;
      for (int64_t m = 0; m < M; m += TMB) {
        const int mb = static_cast<int>(M - m < TMB ? M - m : TMB);
        Acc* st = state ? state.get() + m * TNB : nullptr;  // partial sums kept across K-chunks
        rows_of<O, TMB, TNB>(mb, x + m * K, K, wn, K, nb, k0, k1, st, k0 > 0, last ? res : nullptr);
        if (last)
          for (int i = 0; i < mb; i++)
            for (int j = 0; j < nb; j++) store(a, m + i, n + j, res[i * TNB + j]);
      }
    }
  }
}

// Wide tiles (few rows: many weight rows streamed at once, which is what reaches the memory's bandwidth),
// tall tiles (many rows: each weight vector reused by more rows).
template <class O>
void run(const LinearArgs& a, int64_t n0, int64_t n1) {
  if (a.M <= MB_WIDE)
    run_tiles<O, MB_WIDE, NB_WIDE>(a, n0, n1);
  else
    run_tiles<O, MB, NB>(a, n0, n1);
}

// ----------------------------------------------------------------------------- int4, grouped
//
// Packed as in quant.py: per 64-element block of a row, 32 bytes; byte j holds element j (low nibble)
// and element j + 32 (high nibble). w = q * scale[group] + zero[group], so a group contributes
// scale * sum(x * q) + zero * sum(x): the first from the block's exact small integers, the second from
// per-row sums of x made once per call (the same for every output feature). The ISA supplies
//   struct Q4 { using WV; static constexpr int V = 64 / KSTEP; static void unpack(const uint8_t*, WV*);
//               static Acc scale_add(Acc tot, Acc grp, float s); };
// working with the X loads and fma of its BF16 (or F32) ops struct XO.

template <class XO, class Q, int mb, int nb>
CLASP_INLINE void micro_i4(const typename XO::X* x, int64_t K, const uint8_t* w, int64_t ldw, int64_t group,
                           const float* scale, const float* zero, int64_t ldg, const typename XO::Acc* xsum,
                           float* res) {
  using Acc = typename XO::Acc;
  const int64_t groups = K / group;
  Acc tot[mb][nb];
  for (int i = 0; i < mb; i++)
    for (int j = 0; j < nb; j++) tot[i][j] = XO::zero();
  for (int64_t g = 0; g < groups; g++) {
    Acc acc[mb][nb];
#pragma GCC unroll 8
    for (int i = 0; i < mb; i++)
#pragma GCC unroll 8
      for (int j = 0; j < nb; j++) acc[i][j] = XO::zero();
    for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
      typename Q::WV wv[nb][Q::V];
#pragma GCC unroll 8
      for (int j = 0; j < nb; j++) Q::unpack(w + j * ldw + k / 2, wv[j]);
#pragma GCC unroll 8
      for (int i = 0; i < mb; i++) {
#pragma GCC unroll 8
        for (int v = 0; v < Q::V; v++) {
          typename XO::XV xv = XO::load_x(x + i * K + k + v * XO::KSTEP);
#pragma GCC unroll 8
          for (int j = 0; j < nb; j++) acc[i][j] = Q::fma(acc[i][j], xv, wv[j][v]);
        }
      }
    }
    for (int i = 0; i < mb; i++)
      for (int j = 0; j < nb; j++) {
        tot[i][j] = Q::scale_add(tot[i][j], acc[i][j], scale[j * ldg + g]);
        tot[i][j] = Q::scale_add(tot[i][j], xsum[i * groups + g], zero[j * ldg + g]);
      }
  }
  for (int i = 0; i < mb; i++)
    for (int j = 0; j < nb; j++) res[i * NB + j] = XO::reduce(tot[i][j]);
}

template <class XO, class Q, int mb>
CLASP_INLINE void rows_i4(const typename XO::X* x, int64_t K, const uint8_t* w, int64_t ldw, int64_t group,
                          const float* scale, const float* zero, int64_t ldg, const typename XO::Acc* xsum, int nb,
                          float* res) {
  if (nb == NB_I4) {
    micro_i4<XO, Q, mb, NB_I4>(x, K, w, ldw, group, scale, zero, ldg, xsum, res);
  } else {
    float one[MB * NB];
    for (int j = 0; j < nb; j++) {
      micro_i4<XO, Q, mb, 1>(x, K, w + j * ldw, ldw, group, scale + j * ldg, zero + j * ldg, ldg, xsum, one);
      for (int i = 0; i < mb; i++) res[i * NB + j] = one[i * NB];
    }
  }
}

template <class XO, class Q>
void run_i4(const LinearArgs& a, int64_t n0, int64_t n1) {
  using X = typename XO::X;
  using Acc = typename XO::Acc;
  const X* x = static_cast<const X*>(a.x);
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  const int64_t K = a.K, M = a.M, group = a.group, groups = K / group, ldw = K / 2;
  // Per-row, per-group sums of x in the accumulators' lane layout (x times a vector of ones).
  AlignedBuffer<Acc> sums(M * groups);
  Acc* xsum = sums.get();
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < groups; g++) {
      Acc s = XO::zero();
      for (int64_t k = g * group; k < (g + 1) * group; k += XO::KSTEP)
        s = Q::fma(s, XO::load_x(x + m * K + k), Q::ones());
      xsum[m * groups + g] = s;
    }
  float res[MB * NB];
  for (int64_t n = n0; n < n1; n += NB_I4) {
    const int nb = static_cast<int>(n1 - n < NB_I4 ? n1 - n : NB_I4);
    const uint8_t* wn = w + n * ldw;
    const float* sc = a.scale + n * groups;
    const float* zr = a.zero + n * groups;
    for (int64_t m = 0; m < M; m += MB_I4) {
      const int mb = static_cast<int>(M - m < MB_I4 ? M - m : MB_I4);
      const X* xm = x + m * K;
      const Acc* xs = xsum + m * groups;
      if (mb == MB_I4)
        rows_i4<XO, Q, MB_I4>(xm, K, wn, ldw, group, sc, zr, groups, xs, nb, res);
      else
        rows_i4<XO, Q, 1>(xm, K, wn, ldw, group, sc, zr, groups, xs, nb, res);
      for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) store(a, m + i, n + j, res[i * NB + j]);
    }
  }
}

// ----------------------------------------------------------------------------- attention
//
// Each query row against its own keys, per head, in a fixed sequence of operations that depends on the
// row's own keys only (so a row's bits are the same alone, in a verification or in a whole prompt):
//   1. scores s_j = scale * (q . k_j) for the keys it sees, each summed over d = 0..D-1 in order, one
//      fused multiply-add after another (vector lanes run over keys: no lane ever mixes two keys);
//   2. the row's maximum m (exact, whatever the order);
//   3. e_j = exp(s_j - m) by exp_lanes (a fixed polynomial, element by element), summed in L lanes by
//      (j - first key) mod L, then one lane reduction;
//   4. out = (sum over keys, in key order, of e_j v_j, in fp32 lanes over Dv) / sum.
// Keys and values are widened to fp32 once per call and kv head (the keys transposed, so that lanes can
// run over keys): attention_prepare. Needs from the ISA
//   struct AOps { using V; static constexpr int L; zero, load, widen (L bf16), set1, fma(a, b, c) = a b + c, add, sub,
//                 mul, max, floor, pow2 (2^n of integral n in [-126, 127]), below (x < y ? 0 : v), reduce,
//                 store; };

// exp(x) for x <= 0 (a softmax's shifted scores): Cephes' range reduction and polynomial; below -87.3,
// zero. Every lane is computed alone, so a value's result never depends on its neighbours.
template <class A>
CLASP_INLINE typename A::V exp_lanes(typename A::V x) {
  using V = typename A::V;
  const V n = A::floor(A::fma(x, A::set1(1.44269504088896341f), A::set1(0.5f)));
  V r = A::sub(x, A::mul(n, A::set1(0.693359375f)));
  r = A::sub(r, A::mul(n, A::set1(-2.12194440e-4f)));
  V y = A::set1(1.9875691500e-4f);
  y = A::fma(y, r, A::set1(1.3981999507e-3f));
  y = A::fma(y, r, A::set1(8.3334519073e-3f));
  y = A::fma(y, r, A::set1(4.1665795894e-2f));
  y = A::fma(y, r, A::set1(1.6666665459e-1f));
  y = A::fma(y, r, A::set1(5.0000001201e-1f));
  y = A::add(A::fma(y, A::mul(r, r), r), A::set1(1.0f));
  return A::below(x, A::set1(-87.33654f), A::mul(y, A::pow2(A::max(n, A::set1(-126.0f)))));
}

inline float widen_one(const char* base, int64_t i, bool bf16) {
  return bf16 ? from_bf16(reinterpret_cast<const uint16_t*>(base)[i]) : reinterpret_cast<const float*>(base)[i];
}

// A row of n bf16 (or fp32) values widened into fp32.
template <class A>
CLASP_INLINE void widen_row(const char* src, int64_t n, bool bf16, float* dst) {
  if (!bf16) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
  int64_t d = 0;
  for (; d + A::L <= n; d += A::L) A::store(dst + d, A::widen(h + d));
  for (; d < n; d++) dst[d] = from_bf16(h[d]);
}

// kv heads [h0, h1): keys into kt (transposed), values into vf, both fp32.
template <class A>
void attend_prepare(const AttnArgs& a, int64_t h0, int64_t h1) {
  const size_t esz = a.bf16 ? 2 : 4;
  const char* K = static_cast<const char*>(a.k);
  const char* Vv = static_cast<const char*>(a.v);
  constexpr int64_t B = 16;  // keys per block, widened row by row, then written column by column
  AlignedBuffer<float> block(B * a.D);
  for (int64_t h = h0; h < h1; h++) {
    float* kt = a.kt + h * a.D * a.SP;
    float* vf = a.vf + h * a.S * a.Dv;
    for (int64_t j0 = 0; j0 < a.SP; j0 += B) {
      float* blk = block.get();
      for (int64_t j = 0; j < B; j++) {
        if (j0 + j < a.S)
          widen_row<A>(K + (h * a.k_h + (j0 + j) * a.k_s) * esz, a.D, a.bf16, blk + j * a.D);
        else
          std::memset(blk + j * a.D, 0, a.D * sizeof(float));
      }
      for (int64_t d = 0; d < a.D; d++)
        for (int64_t j = 0; j < B; j++) kt[d * a.SP + j0 + j] = blk[j * a.D + d];
    }
    for (int64_t j = 0; j < a.S; j++) widen_row<A>(Vv + (h * a.v_h + j * a.v_s) * esz, a.Dv, a.bf16, vf + j * a.Dv);
  }
}

constexpr int ATTN_BLOCK = 4;  // rows sharing each load of a key or a value

// Scores of keys [j, j + 2L) for B rows (qf rows D apart) into p (rows ldp apart, indexed by key): each
// key's sum runs over d in order, so blocking rows or keys changes no score.
template <class A, int B>
CLASP_INLINE void scores2(const float* qf, int64_t D, const float* kt, int64_t SP, int64_t j, float scale, float* p,
                          int64_t ldp) {
  typename A::V s[B][2];
  for (int i = 0; i < B; i++) s[i][0] = s[i][1] = A::zero();
  for (int64_t d = 0; d < D; d++) {
    const typename A::V k0 = A::load(kt + d * SP + j), k1 = A::load(kt + d * SP + j + A::L);
#pragma GCC unroll 4
    for (int i = 0; i < B; i++) {
      const typename A::V q = A::set1(qf[i * D + d]);
      s[i][0] = A::fma(q, k0, s[i][0]);
      s[i][1] = A::fma(q, k1, s[i][1]);
    }
  }
  const typename A::V sc = A::set1(scale);
  for (int i = 0; i < B; i++) {
    A::store(p + i * ldp + j, A::mul(s[i][0], sc));
    A::store(p + i * ldp + j + A::L, A::mul(s[i][1], sc));
  }
}

template <class A, int B>
CLASP_INLINE void scores1(const float* qf, int64_t D, const float* kt, int64_t SP, int64_t j, float scale, float* p,
                          int64_t ldp) {
  typename A::V s[B];
  for (int i = 0; i < B; i++) s[i] = A::zero();
  for (int64_t d = 0; d < D; d++) {
    const typename A::V k0 = A::load(kt + d * SP + j);
    for (int i = 0; i < B; i++) s[i] = A::fma(A::set1(qf[i * D + d]), k0, s[i]);
  }
  for (int i = 0; i < B; i++) A::store(p + i * ldp + j, A::mul(s[i], A::set1(scale)));
}

// acc rows (B of them, ldp apart for p, Dv apart for acc) += p[i][k] * v[k] over keys [k0, k1) in order,
// W vectors of values from column c.
template <class A, int B, int W>
CLASP_INLINE void values(const float* p, int64_t ldp, const float* vf, int64_t Dv, int64_t c, int64_t k0, int64_t k1,
                         float* acc) {
  typename A::V sum[B][W];
  for (int i = 0; i < B; i++)
    for (int w = 0; w < W; w++) sum[i][w] = A::load(acc + i * Dv + c + w * A::L);
  for (int64_t k = k0; k < k1; k++) {
    const float* row = vf + k * Dv + c;
    typename A::V v[W];
#pragma GCC unroll 8
    for (int w = 0; w < W; w++) v[w] = A::load(row + w * A::L);
#pragma GCC unroll 4
    for (int i = 0; i < B; i++) {
      const typename A::V e = A::set1(p[i * ldp + k]);
#pragma GCC unroll 8
      for (int w = 0; w < W; w++) sum[i][w] = A::fma(e, v[w], sum[i][w]);
    }
  }
  for (int i = 0; i < B; i++)
    for (int w = 0; w < W; w++) A::store(acc + i * Dv + c + w * A::L, sum[i][w]);
}

template <class A, int B, int W>
CLASP_INLINE void values_w(int w, const float* p, int64_t ldp, const float* vf, int64_t Dv, int64_t c, int64_t k0,
                           int64_t k1, float* acc) {
  if constexpr (W >= 1) {
    if (w == W)
      values<A, B, W>(p, ldp, vf, Dv, c, k0, k1, acc);
    else
      values_w<A, B, W - 1>(w, p, ldp, vf, Dv, c, k0, k1, acc);
  }
}

// All of Dv for B rows over keys [k0, k1): whole vectors in chunks held in registers, the rest one by one.
template <class A, int B>
void values_rows(const float* p, int64_t ldp, const float* vf, int64_t Dv, int64_t k0, int64_t k1, float* acc) {
  constexpr int CH = B <= 2 ? 8 : 4;
  const int64_t whole = Dv / A::L * A::L;
  for (int64_t c = 0; c < whole; c += CH * A::L)
    values_w<A, B, CH>(static_cast<int>(min64(CH, (whole - c) / A::L)), p, ldp, vf, Dv, c, k0, k1, acc);
  for (int i = 0; i < B; i++)
    for (int64_t c = whole; c < Dv; c++)
      for (int64_t k = k0; k < k1; k++) acc[i * Dv + c] += p[i * ldp + k] * vf[k * Dv + c];
}

// One block of B rows (consecutive positions) of one head.
template <class A, int B>
void attend_block(const AttnArgs& a, const float* qf, const float* kt, const float* vf, const int64_t* lo,
                  const int64_t* hi, float* p, int64_t ldp, float* acc, float* sums) {
  using V = typename A::V;
  int64_t first = lo[0], last = hi[0], common_lo = lo[0], common_hi = hi[0];
  for (int i = 1; i < B; i++) {
    first = lo[i] < first ? lo[i] : first;
    last = hi[i] > last ? hi[i] : last;
    common_lo = lo[i] > common_lo ? lo[i] : common_lo;
    common_hi = hi[i] < common_hi ? hi[i] : common_hi;
  }
  // 1. scores of every key any of the rows sees (a row's unseen keys are computed and ignored)
  int64_t j = first;
  for (; j + 2 * A::L <= last; j += 2 * A::L) scores2<A, B>(qf, a.D, kt, a.SP, j, a.scale, p, ldp);
  for (; j < last; j += A::L) scores1<A, B>(qf, a.D, kt, a.SP, j, a.scale, p, ldp);
  for (int i = 0; i < B; i++) {  // 2, 3: each row's maximum, exponentials and their sum
    float* row = p + i * ldp + lo[i];
    const int64_t n = hi[i] - lo[i];
    V mx = A::set1(-INFINITY);
    int64_t k = 0;
    for (; k + A::L <= n; k += A::L) mx = A::max(mx, A::load(row + k));
    alignas(64) float lanes[64];
    A::store(lanes, mx);
    float m = -INFINITY;  // a maximum is exact in any order
    for (int q = 0; q < A::L; q++) m = lanes[q] > m ? lanes[q] : m;
    for (; k < n; k++) m = row[k] > m ? row[k] : m;
    const V mv = A::set1(m);
    V sum = A::zero();
    k = 0;
    for (; k + A::L <= n; k += A::L) {
      const V e = exp_lanes<A>(A::sub(A::load(row + k), mv));
      A::store(row + k, e);
      sum = A::add(sum, e);
    }
    if (k < n) {  // the last few keys in a zero-padded vector (padding lanes are not added)
      alignas(64) float tail[64] = {};
      for (int64_t q = 0; q < n - k; q++) tail[q] = row[k + q] - m;
      A::store(tail, exp_lanes<A>(A::load(tail)));
      for (int64_t q = n - k; q < A::L; q++) tail[q] = 0.0f;
      sum = A::add(sum, A::load(tail));
      for (int64_t q = 0; q < n - k; q++) row[k + q] = tail[q];
    }
    sums[i] = A::reduce(sum);
    for (int64_t c = 0; c < a.Dv; c++) acc[i * a.Dv + c] = 0.0f;
  }
  // 4. values in key order for every row: its own first keys, the keys all rows see, its own last keys
  for (int i = 0; i < B; i++)
    if (lo[i] < common_lo) values_rows<A, 1>(p + i * ldp, ldp, vf, a.Dv, lo[i], common_lo, acc + i * a.Dv);
  if (common_lo < common_hi) values_rows<A, B>(p, ldp, vf, a.Dv, common_lo, common_hi, acc);
  for (int i = 0; i < B; i++)
    if (common_hi < hi[i]) values_rows<A, 1>(p + i * ldp, ldp, vf, a.Dv, common_hi, hi[i], acc + i * a.Dv);
}

template <class A, int B>
CLASP_INLINE void attend_block_of(int b, const AttnArgs& a, const float* qf, const float* kt, const float* vf,
                                  const int64_t* lo, const int64_t* hi, float* p, int64_t ldp, float* acc, float* sums) {
  if constexpr (B >= 1) {
    if (b == B)
      attend_block<A, B>(a, qf, kt, vf, lo, hi, p, ldp, acc, sums);
    else
      attend_block_of<A, B - 1>(b, a, qf, kt, vf, lo, hi, p, ldp, acc, sums);
  }
}

// Tasks are (block of ATTN_ROWS rows, query head): task t = block * Hq + head.
template <class A>
void attend(const AttnArgs& a, int64_t t0, int64_t t1) {
  const size_t esz = a.bf16 ? 2 : 4;
  const char* Q = static_cast<const char*>(a.q);
  const int64_t ldp = a.SP + 2 * A::L;
  AlignedBuffer<float> qbuf(ATTN_BLOCK * a.D), pbuf(ATTN_BLOCK * ldp), abuf(ATTN_BLOCK * a.Dv);
  float *qf = qbuf.get(), *p = pbuf.get(), *acc = abuf.get();
  const int64_t group = a.Hq / a.Hkv;
  for (int64_t t = t0; t < t1; t++) {
    const int64_t h = t % a.Hq, kvh = h / group;
    const float* kt = a.kt + kvh * a.D * a.SP;
    const float* vf = a.vf + kvh * a.S * a.Dv;
    const int64_t end = min64(a.R, (t / a.Hq + 1) * ATTN_ROWS);
    for (int64_t r0 = (t / a.Hq) * ATTN_ROWS; r0 < end; r0 += ATTN_BLOCK) {
      const int b = static_cast<int>(min64(ATTN_BLOCK, end - r0));
      int64_t lo[ATTN_BLOCK], hi[ATTN_BLOCK];
      float sums[ATTN_BLOCK];
      for (int i = 0; i < b; i++) {
        hi[i] = a.start + r0 + i + 1;
        lo[i] = a.window > 0 && hi[i] > a.window ? hi[i] - a.window : 0;
        const char* qrow = Q + ((r0 + i) * a.q_r + h * a.q_h) * esz;
        for (int64_t d = 0; d < a.D; d++) qf[i * a.D + d] = widen_one(qrow, d, a.bf16);
      }
      attend_block_of<A, ATTN_BLOCK>(b, a, qf, kt, vf, lo, hi, p, ldp, acc, sums);
      for (int i = 0; i < b; i++) {
        const int64_t o = ((r0 + i) * a.Hq + h) * a.Dv;
        for (int64_t c = 0; c < a.Dv; c++) {
          const float y = acc[i * a.Dv + c] / sums[i];
          if (a.bf16)
            static_cast<uint16_t*>(a.out)[o + c] = to_bf16(y);
          else
            static_cast<float*>(a.out)[o + c] = y;
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- entry points
//
// For an ISA whose activations are fp32 for every weight kind (all but AVX-512 with BF16, which has a
// bf16 path of its own for bf16, int8 and int4 weights).

template <class BF16, class F32, class I8, class Base, class Q4>
void linear_fp32_x(const LinearArgs& a, int64_t n0, int64_t n1) {
  switch (a.kind) {
    case WeightKind::BF16: run<BF16>(a, n0, n1); break;
    case WeightKind::F32: run<F32>(a, n0, n1); break;
    case WeightKind::I8: run<I8>(a, n0, n1); break;
    case WeightKind::I4: run_i4<Base, Q4>(a, n0, n1); break;
  }
}
