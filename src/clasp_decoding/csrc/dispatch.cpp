// The dispatcher: torch operators clasp_kernels::* that check their inputs, pick the kernel named (or the
// best this CPU supports), fix the floating-point mode, and split the work (output features; query rows
// and heads) over torch's intra-op threads. Which thread computes what never changes any value.
//
// Which instruction-set files were built is told by CLASP_HAVE_<ISA> (kernels.py compiles each file with
// its own flags and leaves out any the compiler cannot build).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <xmmintrin.h>
#endif

#include <cstdlib>
#include <string>
#include <vector>

#include "kernels.h"

namespace clasp {

// Whether the AMX tiles can run here, in words: "granted", or why not ("absent", "not built",
// "switched off by CLASP_AMX=0", "refused by the OS"). The tile state is asked for once per process.
std::string amx_status() {
#if defined(__x86_64__)
  static const std::string status = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 22) & 1))
      return std::string("absent");
#if !CLASP_HAVE_AMX
    return std::string("not built (the compiler has no -mamx-tile)");
#endif
    const char* env = std::getenv("CLASP_AMX");
    if (env && std::string(env) == "0") return std::string("switched off by CLASP_AMX=0");
    constexpr long ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    unsigned long mask = 0;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0 ||
        syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mask) != 0 || !((mask >> XFEATURE_XTILEDATA) & 1))
      return std::string("refused by the OS (arch_prctl)");
    return std::string("granted");
  }();
  return status;
#else
  return "absent";
#endif
}

bool amx_granted() { return amx_status() == "granted"; }

namespace {

// The floating-point mode a kernel runs under, whatever the calling thread had: IEEE denormals for the
// vector kernels (torch's default), flush-to-zero and denormals-are-zero for the tile kernels (what the
// tiles do). Restored on exit.
class FpMode {
 public:
  explicit FpMode(bool flush) {
#if defined(__x86_64__)
    saved_ = _mm_getcsr();
    const unsigned bits = 0x8040u;  // FTZ (bit 15) and DAZ (bit 6)
    _mm_setcsr(flush ? (saved_ | bits) : (saved_ & ~bits));
#endif
    (void)flush;
  }
  ~FpMode() {
#if defined(__x86_64__)
    _mm_setcsr(saved_);
#endif
  }
  FpMode(const FpMode&) = delete;
  FpMode& operator=(const FpMode&) = delete;

 private:
  unsigned saved_ = 0;
};

using Kernel = void (*)(const LinearArgs&, int64_t, int64_t);
using XIsBf16 = bool (*)(WeightKind);
using AttnKernel = void (*)(const AttnArgs&, int64_t, int64_t);
using AttnPrepare = void (*)(const AttnArgs&, int64_t, int64_t);
using TileKernel = void (*)(const TileArgs&, int64_t, int64_t);

struct Isa {
  const char* name;
  Kernel kernel;
  XIsBf16 x_bf16;
  AttnKernel attention;
  AttnPrepare attention_prepare;
  bool supported;
};

struct TileIsa {
  const char* name;
  TileKernel kernel;
  bool supported;
};

#if defined(__x86_64__)
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi2");
}
#endif

std::vector<Isa> detect() {
  std::vector<Isa> out;
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = has_avx512();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  (void)avx512;
  (void)avx2;
#if CLASP_HAVE_AVX512BF16 && CLASP_HAVE_AVX512
  out.push_back({"avx512bf16", avx512bf16::linear, avx512bf16::x_is_bf16, avx512bf16::attention,
                 avx512bf16::attention_prepare,
                 avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni")});
#endif
#if CLASP_HAVE_AVX512
  out.push_back({"avx512", avx512::linear, avx512::x_is_bf16, avx512::attention, avx512::attention_prepare, avx512});
#endif
#if CLASP_HAVE_AVX2
  out.push_back({"avx2", avx2::linear, avx2::x_is_bf16, avx2::attention, avx2::attention_prepare, avx2});
#endif
#endif
  out.push_back({"scalar", scalar::linear, scalar::x_is_bf16, scalar::attention, scalar::attention_prepare, true});
  return out;
}

std::vector<TileIsa> detect_tiles() {
  std::vector<TileIsa> out;
#if defined(__x86_64__)
  __builtin_cpu_init();
#if CLASP_HAVE_AMX
  out.push_back({"amx", amx::linear, amx_granted()});
#endif
#if CLASP_HAVE_TILE_AVX512
  out.push_back({"tile_avx512", tile_avx512::linear, has_avx512()});
#endif
#endif
  out.push_back({"tile_emulated", tile_emu::linear, true});
  return out;
}

const std::vector<Isa>& isas() {
  static const std::vector<Isa> table = detect();
  return table;
}

const std::vector<TileIsa>& tile_isas() {
  static const std::vector<TileIsa> table = detect_tiles();
  return table;
}

const Isa& pick(const std::string& name) {
  for (const Isa& isa : isas()) {
    if (!isa.supported) continue;
    if (name.empty() || name == isa.name) return isa;
  }
  TORCH_CHECK(false, "clasp kernels: instruction set '", name, "' is not supported by this CPU");
}

const TileIsa& pick_tile(const std::string& name) {
  for (const TileIsa& isa : tile_isas()) {
    if (!isa.supported) continue;
    if (name.empty() || name == isa.name) return isa;
  }
  TORCH_CHECK(false, "clasp kernels: tile kernel '", name, "' is not supported here");
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Isa& isa : isas())
    if (isa.supported) out.emplace_back(isa.name);
  return out;
}

std::vector<std::string> supported_tile_isas() {
  std::vector<std::string> out;
  for (const TileIsa& isa : tile_isas())
    if (isa.supported) out.emplace_back(isa.name);
  return out;
}

// An output of shape x[..., :-1] + [N]: zeros plus the bias when there is nothing to sum (K == 0).
at::Tensor empty_sum(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::zeros(sizes, x.options());
  if (bias.has_value()) out.add_(bias->to(x.scalar_type()));
  return out;
}

// Checks shared by every linear operator: x [..., K] on the CPU, a bias of N entries.
void check_linear(const at::Tensor& x, int64_t N, int64_t K, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "clasp kernels run on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "clasp kernels: x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "clasp kernels: bias has ", bias->numel(),
              " entries, expected ", N);
}

// The output [..., N] of x [..., K] (K > 0).
at::Tensor output_for(const at::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return at::empty(sizes, x.options());
}

at::Tensor run(const at::Tensor& x, const at::Tensor& w, WeightKind kind, int64_t N, int64_t K,
               const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& zero, int64_t group,
               const c10::optional<at::Tensor>& bias, const std::string& isa_name) {
  TORCH_CHECK(w.device().is_cpu(), "clasp kernels run on the CPU");
  check_linear(x, N, K, bias);
  const bool f32 = kind == WeightKind::F32;
  TORCH_CHECK(x.scalar_type() == (f32 ? at::kFloat : at::kBFloat16), "clasp kernels: x must be ",
              f32 ? "float32" : "bfloat16", " for these weights, got ", x.scalar_type());
  const Isa& isa = pick(isa_name);
  if (K == 0) return empty_sum(x, N, bias);
  const int64_t M = x.numel() / K;
  at::Tensor out = output_for(x, N);
  if (M == 0 || N == 0) return out;
  at::Tensor xin = x.reshape({M, K});
  xin = (!f32 && !isa.x_bf16(kind)) ? xin.to(at::kFloat).contiguous() : xin.contiguous();
  at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor s = scale.has_value() ? scale->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor z = zero.has_value() ? zero->to(at::kFloat).contiguous() : at::Tensor();
  LinearArgs a{xin.data_ptr(), M, K, N, w.data_ptr(), s.defined() ? s.data_ptr<float>() : nullptr,
               z.defined() ? z.data_ptr<float>() : nullptr, group, b.defined() ? b.data_ptr<float>() : nullptr,
               out.data_ptr(), kind};
  // Tasks of 16 output features; at least ~256 KB of weights per task so small layers stay on one thread.
  constexpr int64_t unit = 16;
  const int64_t units = (N + unit - 1) / unit;
  const int64_t bytes_per_unit = unit * w.numel() / N * static_cast<int64_t>(w.element_size());
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, bytes_per_unit));
  Kernel kernel = isa.kernel;
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    FpMode mode(false);
    kernel(a, u0 * unit, std::min(N, u1 * unit));
  });
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  std::string isa) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "clasp kernels: the weight must be a contiguous matrix");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat,
              "clasp kernels: weights must be bfloat16 or float32, got ", w.scalar_type());
  const WeightKind kind = w.scalar_type() == at::kFloat ? WeightKind::F32 : WeightKind::BF16;
  return run(x, w, kind, w.size(0), w.size(1), c10::nullopt, c10::nullopt, 0, bias, isa);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, std::string isa) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar,
              "clasp kernels: int8 weights must be a contiguous int8 matrix");
  TORCH_CHECK(scale.numel() == q.size(0), "clasp kernels: one scale per output feature");
  return run(x, q, WeightKind::I8, q.size(0), q.size(1), scale, c10::nullopt, 0, bias, isa);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& zero, int64_t group, const c10::optional<at::Tensor>& bias,
                       std::string isa) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "clasp kernels: int4 weights must be a contiguous uint8 matrix of packed pairs");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 64 == 0 && K % group == 0, "clasp kernels: int4 groups must be a multiple of 64 "
              "that divides the input features (", K, "), got ", group);
  TORCH_CHECK(scale.numel() == N * (K / group) && zero.numel() == N * (K / group),
              "clasp kernels: one scale and one zero per output feature and group");
  return run(x, packed, WeightKind::I4, N, K, scale, zero, group, bias, isa);
}

// ----------------------------------------------------------------------------- the tile kernels

int64_t packed_elements(int64_t N, int64_t K) { return ((N + 15) / 16) * ((K + 31) / 32) * TILE_ELEMS; }

void check_packed(const at::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.dim() == 1,
              "clasp kernels: packed tiles must be a contiguous 1-D bfloat16 CPU tensor");
  TORCH_CHECK(N >= 0 && K >= 0 && packed.numel() == packed_elements(N, K), "clasp kernels: ", packed.numel(),
              " packed elements do not hold a ", N, " x ", K, " weight");
}

// w [N, K] bf16 -> its tiles (tile_gemm.h), 1-D, written into ``out``.
void pack_tiles_into(const at::Tensor& w, const at::Tensor& out) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kBFloat16,
              "clasp kernels: tiles pack a 2-D bfloat16 CPU weight");
  at::Tensor wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1);
  check_packed(out, N, K);
  if (out.numel() == 0) return;
  const auto* src = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, (N + 15) / 16, 64, [&](int64_t b0, int64_t b1) { pack_tiles(src, N, K, dst, b0, b1); });
}

at::Tensor pack_tiles_op(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "clasp kernels: tiles pack a 2-D weight");
  at::Tensor out = at::empty({packed_elements(w.size(0), w.size(1))}, w.options());
  pack_tiles_into(w, out);
  return out;
}

// Rows ``ids`` of the weight that ``packed`` holds, [len(ids), K].
at::Tensor unpack_tile_rows_op(const at::Tensor& packed, int64_t N, int64_t K, const at::Tensor& ids) {
  check_packed(packed, N, K);
  at::Tensor idx = ids.to(at::kLong).contiguous().view(-1);
  if (idx.numel()) {
    TORCH_CHECK(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < N, "clasp kernels: row ids must lie in "
                "[0, ", N, ")");
  }
  at::Tensor out = at::empty({idx.numel(), K}, packed.options());
  if (out.numel() == 0) return out;
  const auto* src = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  const int64_t* id = idx.data_ptr<int64_t>();
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, idx.numel(), 64, [&](int64_t r0, int64_t r1) {
    unpack_tile_rows(src, K, id + r0, r1 - r0, dst + r0 * K);
  });
  return out;
}

// x [..., K] bf16 times the packed weight [N, K] (+ bias): bf16 [..., N], with the tiles' numerics.
at::Tensor tile_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t K,
                       const c10::optional<at::Tensor>& bias, std::string isa_name) {
  check_packed(packed, N, K);
  check_linear(x, N, K, bias);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "clasp tile kernels take bfloat16 inputs, got ", x.scalar_type());
  const TileIsa& isa = pick_tile(isa_name);
  if (K == 0) return empty_sum(x, N, bias);
  const int64_t M = x.numel() / K;
  at::Tensor out = output_for(x, N);
  if (M == 0 || N == 0) return out;
  at::Tensor xin = x.reshape({M, K}).contiguous();
  at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t KB = (K + 31) / 32;
  TileArgs a{reinterpret_cast<const uint16_t*>(xin.data_ptr()), M, K, K,
             reinterpret_cast<const uint16_t*>(packed.data_ptr()), N, KB, b.defined() ? b.data_ptr<float>() : nullptr,
             reinterpret_cast<uint16_t*>(out.data_ptr())};
  // Tasks of two feature blocks (one tile pass); at least ~256 KB of weights per task.
  const int64_t blocks = (N + 15) / 16, pairs = (blocks + 1) / 2;
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, 2 * KB * TILE_ELEMS * 2));
  TileKernel kernel = isa.kernel;
  at::parallel_for(0, pairs, grain, [&](int64_t p0, int64_t p1) {
    FpMode mode(true);
    kernel(a, 2 * p0, std::min(blocks, 2 * p1));
  });
  return out;
}

// query [1, Hq, R, D], key [1, Hkv, S, D], value [1, Hkv, S, Dv] (views of a cache: any strides with
// contiguous last dimension) -> [1, R, Hq, Dv]: row r is the query at position start + r, seeing keys up to
// its own (and, with window > 0, only the last ``window`` of them).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start, int64_t window,
                     double scale, std::string isa_name) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "clasp kernels run on the CPU");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(0) == 1 && k.size(0) == 1 && v.size(0) == 1,
              "clasp attention: batch-1 [1, heads, rows, dim] tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              "clasp attention: query, key and value must all be bfloat16 or all float32");
  const int64_t Hq = q.size(1), R = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && v.size(1) == Hkv && v.size(2) == S && k.size(3) == D,
              "clasp attention: shapes do not agree (query heads a multiple of key heads)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "clasp attention: the last dimension "
              "must be contiguous");
  TORCH_CHECK(start >= 0 && start + R <= S, "clasp attention: rows at positions ", start, "..", start + R - 1,
              " need ", start + R, " keys, got ", S);
  const Isa& isa = pick(isa_name);
  at::Tensor out = at::empty({1, R, Hq, Dv}, q.options());
  if (R == 0 || Hq == 0 || Dv == 0) return out;
  AttnArgs a{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), R, Hq, Hkv, S, D, Dv,
             q.stride(2), q.stride(1), k.stride(1), k.stride(2), v.stride(1), v.stride(2), start, window,
             static_cast<float>(scale), q.scalar_type() == at::kBFloat16};
  a.SP = (S + 15) / 16 * 16;
  at::Tensor kt = at::empty({Hkv * D * a.SP + 64}, q.options().dtype(at::kFloat));  // + a vector past the end
  at::Tensor vf = at::empty({Hkv * S * Dv}, q.options().dtype(at::kFloat));
  a.kt = kt.data_ptr<float>();
  a.vf = vf.data_ptr<float>();
  AttnPrepare prepare = isa.attention_prepare;
  at::parallel_for(0, Hkv, 1, [&](int64_t h0, int64_t h1) {
    FpMode mode(false);
    prepare(a, h0, h1);
  });
  AttnKernel kernel = isa.attention;
  const int64_t tasks = ((R + ATTN_ROWS - 1) / ATTN_ROWS) * Hq;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, ATTN_ROWS * S * (D + Dv)));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    FpMode mode(false);
    kernel(a, t0, t1);
  });
  return out;
}

// Whether the int8 products prefetch the next block of weight rows (where they have a choice); the
// previous setting.
bool set_int8_prefetch(bool on) {
  static bool current = false;
  const bool before = current;
  current = on;
#if defined(__x86_64__) && CLASP_HAVE_AVX512BF16 && CLASP_HAVE_AVX512
  avx512bf16::set_int8_prefetch(on);
#endif
  return before;
}

}  // namespace
}  // namespace clasp

TORCH_LIBRARY(clasp_kernels, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None, str isa='') -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale, Tensor? bias=None, str isa='') -> Tensor");
  m.def("linear_int4(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group, Tensor? bias=None, "
        "str isa='') -> Tensor");
  m.def("tile_linear(Tensor x, Tensor packed, int N, int K, Tensor? bias=None, str isa='') -> Tensor");
  m.def("pack_tiles(Tensor w) -> Tensor");
  m.def("pack_tiles_into(Tensor w, Tensor(a!) out) -> ()");
  m.def("unpack_tile_rows(Tensor packed, int N, int K, Tensor ids) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, int start, int window, float scale, str isa='') -> Tensor");
  m.def("isas() -> str[]");
  m.def("tile_isas() -> str[]");
  m.def("amx_status() -> str");
  m.def("set_int8_prefetch(bool on) -> bool");
}

TORCH_LIBRARY_IMPL(clasp_kernels, CPU, m) {
  m.impl("linear", clasp::linear);
  m.impl("linear_int8", clasp::linear_int8);
  m.impl("linear_int4", clasp::linear_int4);
  m.impl("tile_linear", clasp::tile_linear);
  m.impl("pack_tiles", clasp::pack_tiles_op);
  m.impl("pack_tiles_into", clasp::pack_tiles_into);
  m.impl("unpack_tile_rows", clasp::unpack_tile_rows_op);
  m.impl("attention", clasp::attention);
}

TORCH_LIBRARY_IMPL(clasp_kernels, CompositeExplicitAutograd, m) {
  m.impl("isas", clasp::supported_isas);
  m.impl("tile_isas", clasp::supported_tile_isas);
  m.impl("amx_status", clasp::amx_status);
  m.impl("set_int8_prefetch", clasp::set_int8_prefetch);
}
