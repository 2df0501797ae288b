// Row-invariant kernels for decoding on CPUs: the interface shared by the dispatcher (dispatch.cpp) and
// the per-ISA kernels (kernels_<isa>.cpp, each compiled for its instruction set, none including torch).
//
// linear:    out[m, n] = sum_k x[m, k] * w[n, k] (* scale[n]) (+ bias[n]) for m < M, n0 <= n < n1.
// attention: each query row attends keys [lo_r, hi_r) of its own cache (softmax(q k^T * scale) v).
// Every output element is computed by one fixed sequence of operations that depends on the sizes of its
// own row (K; the keys it sees) and the ISA only, never on how many rows share a call or which thread
// runs it: a row's bits do not depend on the batch it is in.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

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

struct AttnArgs {
  const void* q;        // [R, Hq, D] with strides (q_r, q_h); bf16 or fp32 like k, v and out
  const void* k;        // [Hkv, S, D] with strides (k_h, k_s)
  const void* v;        // [Hkv, S, Dv] with strides (v_h, v_s)
  void* out;            // [R, Hq, Dv] contiguous
  int64_t R, Hq, Hkv, S, D, Dv;
  int64_t q_r, q_h, k_h, k_s, v_h, v_s;
  int64_t start;        // row r sees keys [lo_r, start + r + 1): a causal row at position start + r
  int64_t window;       // > 0: a sliding window, lo_r = max(0, start + r + 1 - window); else lo_r = 0
  float scale;
  bool bf16;
  // Filled by the dispatcher before the tasks run (attention_prepare): the keys widened to fp32 and
  // transposed, kt [Hkv][D][SP] (SP = S rounded up to 16, zero-padded), and the values widened, vf
  // [Hkv][S][Dv].
  float* kt = nullptr;
  float* vf = nullptr;
  int64_t SP = 0;
};

// The tile kernels' arguments: a bf16 product with the weight packed in 1 KB tiles (tile_gemm.h).
constexpr int64_t TILE_ELEMS = 16 * 32;  // bf16 in one packed tile: 16 input pairs x 16 output features

struct TileArgs {
  const uint16_t* x;  // bf16 [M, K], rows ldx apart
  int64_t M, K, ldx;
  const uint16_t* w;  // packed tiles: ceil(N / 16) feature blocks of KB tiles each
  int64_t N, KB;      // N real output features; KB = ceil(K / 32)
  const float* bias;  // [N] or nullptr
  uint16_t* out;      // bf16 [M, N]
};

// The tile kernels, all with TDPBF16PS's numerics (identical bits): feature blocks [nb0, nb1).
namespace tile_emu {  // the exact scalar emulation of the tiles (any CPU; the tests' reference)
void linear(const TileArgs& a, int64_t nb0, int64_t nb1);
}
void pack_tiles(const uint16_t* w, int64_t N, int64_t K, uint16_t* out, int64_t nb0, int64_t nb1);
void unpack_tile_rows(const uint16_t* packed, int64_t K, const int64_t* ids, int64_t count, uint16_t* out);
#if defined(__x86_64__)
namespace amx {  // the AMX tiles themselves
void linear(const TileArgs& a, int64_t nb0, int64_t nb1);
}
namespace tile_avx512 {  // the same sums on AVX-512 vector units
void linear(const TileArgs& a, int64_t nb0, int64_t nb1);
}
#endif

// linear computes output features [n0, n1) for all M rows; attention the tasks [t0, t1), each a block of
// ATTN_ROWS query rows of one head (task t = block * Hq + h).
constexpr int64_t ATTN_ROWS = 8;
#define CLASP_DECLARE_ISA(ns)                                        \
  namespace ns {                                                     \
  void linear(const LinearArgs& a, int64_t n0, int64_t n1);          \
  bool x_is_bf16(WeightKind kind);                                   \
  void attention(const AttnArgs& a, int64_t t0, int64_t t1);         \
  void attention_prepare(const AttnArgs& a, int64_t h0, int64_t h1); \
  }
CLASP_DECLARE_ISA(scalar)
#if defined(__x86_64__)
CLASP_DECLARE_ISA(avx2)
CLASP_DECLARE_ISA(avx512)
CLASP_DECLARE_ISA(avx512bf16)
namespace avx512bf16 {
void set_int8_prefetch(bool on);  // int8 products: ask for the next block of weight rows ahead
}
#endif

// The helpers below have internal linkage: each translation unit (compiled with its own instruction-set
// flags) keeps its own copy, so no AVX-512 instance can be the one a portable file calls.
namespace {

// Scratch of ``n`` vector registers' worth (64-byte aligned, freed with the scope); empty when n == 0.
template <class T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n)
      : p_(n > 0 ? static_cast<T*>(std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64)) : nullptr) {}
  ~AlignedBuffer() { std::free(p_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* get() const { return p_; }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  T* p_;
};

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

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace
}  // namespace clasp
