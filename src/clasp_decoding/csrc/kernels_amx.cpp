// The tile kernel on Intel's AMX tiles (Sapphire Rapids and later): TDPBF16PS over the blocking of
// tile_gemm.h. Built with -mamx-tile -mamx-bf16; run only where the CPU has the tiles and Linux grants
// this process their state (amx_granted() in dispatch.cpp asks, once).
#if defined(__x86_64__)
#include <immintrin.h>

#include "kernels.h"

namespace clasp {
namespace amx {

// gcc's tile intrinsics paste their register numbers into assembly text, so each one is spelled out.
#define CLASP_EACH_TILE(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7)

struct Tiles {
  static void begin() {
    // palette 1, every tile 16 rows of 64 bytes
    alignas(64) unsigned char cfg[64] = {};
    cfg[0] = 1;
    for (int t = 0; t < 8; t++) {
      cfg[16 + 2 * t] = 64;
      cfg[48 + t] = 16;
    }
    _tile_loadconfig(cfg);
  }
  static void end() { _tile_release(); }
  template <int t>
  static void zero() {
#define CLASP_ZERO(i) if constexpr (t == i) _tile_zero(i);
    CLASP_EACH_TILE(CLASP_ZERO)
#undef CLASP_ZERO
  }
  template <int t>
  static void load(const void* p, int64_t stride) {
#define CLASP_LOAD(i) if constexpr (t == i) _tile_loadd(i, p, stride);
    CLASP_EACH_TILE(CLASP_LOAD)
#undef CLASP_LOAD
  }
  template <int t>
  static void store(void* p, int64_t stride) {
#define CLASP_STORE(i) if constexpr (t == i) _tile_stored(i, p, stride);
    CLASP_EACH_TILE(CLASP_STORE)
#undef CLASP_STORE
  }
  template <int c, int a, int b>
  static void dp() {  // the combinations tile_gemm.h uses
    if constexpr (c == 0 && a == 4 && b == 6)
      _tile_dpbf16ps(0, 4, 6);
    else if constexpr (c == 1 && a == 4 && b == 7)
      _tile_dpbf16ps(1, 4, 7);
    else if constexpr (c == 2 && a == 5 && b == 6)
      _tile_dpbf16ps(2, 5, 6);
    else if constexpr (c == 3 && a == 5 && b == 7)
      _tile_dpbf16ps(3, 5, 7);
    else
      static_assert(c < 0, "tile combination not spelled out in kernels_amx.cpp");
  }
};

#include "tile_gemm.h"

void linear(const TileArgs& a, int64_t nb0, int64_t nb1) { tile_linear<Tiles>(a, nb0, nb1); }

}  // namespace amx
}  // namespace clasp
#endif
