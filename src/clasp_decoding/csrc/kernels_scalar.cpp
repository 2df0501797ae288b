// Portable kernels (any CPU): plain loops in fp32. Slow, but exact to the same contract as the vector
// kernels (each output one dot product in K order), so rows stay invariant on any machine.

#include "kernels.h"

namespace clasp {
namespace scalar {

constexpr int MB = 1, NB = 4, MB_WIDE = 1, NB_WIDE = 4, MB_I4 = 1, NB_I4 = 4;

struct Base {
  using X = float;
  using XV = float;
  using Acc = float;
  static constexpr int KSTEP = 1;
  static inline Acc zero() { return 0.0f; }
  static inline float reduce(Acc a) { return a; }
  static inline XV load_x(const X* p) { return *p; }
  static inline XV load_x_tail(const X* p, int) { return *p; }
  static inline Acc fma(Acc a, XV x, float w) { return a + x * w; }  // built without fp contraction
};

struct BF16 : Base {
  using W = uint16_t;
  using WV = float;
  static inline WV load_w(const W* p) { return from_bf16(*p); }
  static inline WV load_w_tail(const W* p, int) { return from_bf16(*p); }
};

struct F32 : Base {
  using W = float;
  using WV = float;
  static inline WV load_w(const W* p) { return *p; }
  static inline WV load_w_tail(const W* p, int) { return *p; }
};

struct I8 : Base {
  using W = int8_t;
  using WV = float;
  static inline WV load_w(const W* p) { return static_cast<float>(*p); }
  static inline WV load_w_tail(const W* p, int) { return static_cast<float>(*p); }
};

struct Q4 {
  using WV = float;
  static constexpr int V = 64;
  static inline void unpack(const uint8_t* p, WV* out) {
    for (int j = 0; j < 32; j++) {
      out[j] = static_cast<float>(p[j] & 15);
      out[32 + j] = static_cast<float>(p[j] >> 4);
    }
  }
  static inline float ones() { return 1.0f; }
  static inline float fma(float a, float x, float w) { return a + x * w; }
  static inline float scale_add(float tot, float grp, float s) { return tot + grp * s; }
};

struct AOps {  // attention: one lane
  using V = float;
  static constexpr int L = 1;
  static inline V zero() { return 0.0f; }
  static inline V load(const float* p) { return *p; }
  static inline V widen(const uint16_t* p) { return from_bf16(*p); }
  static inline V set1(float x) { return x; }
  static inline V fma(V a, V b, V c) { return a * b + c; }  // built without fp contraction
  static inline float reduce(V a) { return a; }
  static inline void store(float* p, V a) { *p = a; }
  static inline V add(V a, V b) { return a + b; }
  static inline V sub(V a, V b) { return a - b; }
  static inline V mul(V a, V b) { return a * b; }
  static inline V max(V a, V b) { return a > b ? a : b; }
  static inline V floor(V a) { return std::floor(a); }
  static inline V pow2(V n) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static inline V below(V x, V limit, V v) { return x < limit ? 0.0f : v; }
};

#include "kernels_impl.h"

bool x_is_bf16(WeightKind) { return false; }
void linear(const LinearArgs& a, int64_t n0, int64_t n1) { linear_fp32_x<BF16, F32, I8, Base, Q4>(a, n0, n1); }
void attention(const AttnArgs& a, int64_t t0, int64_t t1) { attend<AOps>(a, t0, t1); }
void attention_prepare(const AttnArgs& a, int64_t h0, int64_t h1) { attend_prepare<AOps>(a, h0, h1); }

}  // namespace scalar
}  // namespace clasp
