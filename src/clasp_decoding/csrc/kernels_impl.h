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
// One query row against its own keys, per head: scores = scale * (q . k_j) for the keys it sees (each a
// dot product in fp32 lanes over D, then one lane reduction), softmax by the row's maximum with expf,
// the values summed in fp32 lanes over Dv in key order, divided by the sum. Needs from the ISA
//   struct AOps { using V; static constexpr int L; static V zero(); static V load(const float*);
//                 static V widen(const uint16_t*); static V set1(float); static V fma(V a, V b, V c);
//                 static float reduce(V); static void store(float*, V); };

template <class A>
CLASP_INLINE float attn_dot(const float* q, const void* k, int64_t D, bool bf16) {
  typename A::V acc = A::zero();
  int64_t d = 0;
  for (; d + A::L <= D; d += A::L) {
    typename A::V kv = bf16 ? A::widen(static_cast<const uint16_t*>(k) + d) : A::load(static_cast<const float*>(k) + d);
    acc = A::fma(A::load(q + d), kv, acc);
  }
  float s = A::reduce(acc);
  for (; d < D; d++)
    s += q[d] * (bf16 ? from_bf16(static_cast<const uint16_t*>(k)[d]) : static_cast<const float*>(k)[d]);
  return s;
}

template <class A>
void attend(const AttnArgs& a, int64_t t0, int64_t t1) {
  const size_t esz = a.bf16 ? 2 : 4;
  const char* Q = static_cast<const char*>(a.q);
  const char* K = static_cast<const char*>(a.k);
  const char* Vv = static_cast<const char*>(a.v);
  AlignedBuffer<float> qbuf(a.D), pbuf(a.S), abuf(a.Dv);
  float *qf = qbuf.get(), *p = pbuf.get(), *acc = abuf.get();
  const int64_t group = a.Hq / a.Hkv;
  for (int64_t t = t0; t < t1; t++) {
    const int64_t r = t / a.Hq, h = t % a.Hq, kvh = h / group;
    const int64_t hi = a.start + r + 1;
    const int64_t lo = a.window > 0 && hi > a.window ? hi - a.window : 0;
    const char* qrow = Q + (r * a.q_r + h * a.q_h) * esz;
    for (int64_t d = 0; d < a.D; d++)
      qf[d] = a.bf16 ? from_bf16(reinterpret_cast<const uint16_t*>(qrow)[d]) : reinterpret_cast<const float*>(qrow)[d];
    float m = -INFINITY;
    for (int64_t j = lo; j < hi; j++) {
      const float s = attn_dot<A>(qf, K + (kvh * a.k_h + j * a.k_s) * esz, a.D, a.bf16) * a.scale;
      p[j - lo] = s;
      m = s > m ? s : m;
    }
    float sum = 0.0f;
    for (int64_t j = lo; j < hi; j++) {
      const float e = expf(p[j - lo] - m);
      p[j - lo] = e;
      sum += e;
    }
    for (int64_t d = 0; d < a.Dv; d++) acc[d] = 0.0f;
    for (int64_t j = lo; j < hi; j++) {
      const char* vrow = Vv + (kvh * a.v_h + j * a.v_s) * esz;
      const typename A::V w = A::set1(p[j - lo]);
      int64_t d = 0;
      for (; d + A::L <= a.Dv; d += A::L) {
        typename A::V vv = a.bf16 ? A::widen(reinterpret_cast<const uint16_t*>(vrow) + d)
                                  : A::load(reinterpret_cast<const float*>(vrow) + d);
        A::store(acc + d, A::fma(w, vv, A::load(acc + d)));
      }
      for (; d < a.Dv; d++)
        acc[d] += p[j - lo] * (a.bf16 ? from_bf16(reinterpret_cast<const uint16_t*>(vrow)[d])
                                      : reinterpret_cast<const float*>(vrow)[d]);
    }
    const int64_t o = (r * a.Hq + h) * a.Dv;
    for (int64_t d = 0; d < a.Dv; d++) {
      const float y = acc[d] / sum;
      if (a.bf16)
        static_cast<uint16_t*>(a.out)[o + d] = to_bf16(y);
      else
        static_cast<float*>(a.out)[o + d] = y;
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
