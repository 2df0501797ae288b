// The dispatcher: torch operators clasp_kernels::linear / linear_int8 / linear_int4 / attention that check
// their inputs, pick the best kernel this CPU supports (or the one named), and split the work (output
// features; query rows and heads) over torch's intra-op threads. Which thread computes what never changes
// any value.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <string>
#include <vector>

#include "kernels.h"

namespace clasp {
namespace {

using Kernel = void (*)(const LinearArgs&, int64_t, int64_t);
using XIsBf16 = bool (*)(WeightKind);
using AttnKernel = void (*)(const AttnArgs&, int64_t, int64_t);

struct Isa {
  const char* name;
  Kernel kernel;
  XIsBf16 x_bf16;
  AttnKernel attention;
  bool supported;
};

std::vector<Isa> detect() {
  std::vector<Isa> out;
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  out.push_back({"avx512bf16", avx512bf16::linear, avx512bf16::x_is_bf16, avx512bf16::attention,
                 avx512 && __builtin_cpu_supports("avx512bf16")});
  out.push_back({"avx512", avx512::linear, avx512::x_is_bf16, avx512::attention, avx512});
  out.push_back({"avx2", avx2::linear, avx2::x_is_bf16, avx2::attention, avx2});
#endif
  out.push_back({"scalar", scalar::linear, scalar::x_is_bf16, scalar::attention, true});
  return out;
}

const std::vector<Isa>& isas() {
  static const std::vector<Isa> table = detect();
  return table;
}

const Isa& pick(const std::string& name) {
  for (const Isa& isa : isas()) {
    if (!isa.supported) continue;
    if (name.empty() || name == isa.name) return isa;
  }
  TORCH_CHECK(false, "clasp kernels: instruction set '", name, "' is not supported by this CPU");
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Isa& isa : isas())
    if (isa.supported) out.emplace_back(isa.name);
  return out;
}

at::Tensor run(const at::Tensor& x, const at::Tensor& w, WeightKind kind, int64_t N, int64_t K,
               const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& zero, int64_t group,
               const c10::optional<at::Tensor>& bias, const std::string& isa_name) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "clasp kernels run on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "clasp kernels: x has ", x.size(-1), " features, the weight ", K);
  const bool f32 = kind == WeightKind::F32;
  TORCH_CHECK(x.scalar_type() == (f32 ? at::kFloat : at::kBFloat16), "clasp kernels: x must be ",
              f32 ? "float32" : "bfloat16", " for these weights, got ", x.scalar_type());
  const Isa& isa = pick(isa_name);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  const int64_t M = x.numel() / K;
  at::Tensor out = at::empty(sizes, x.options());
  if (M == 0 || N == 0) return out;
  at::Tensor xin = x.reshape({M, K});
  xin = (!f32 && !isa.x_bf16(kind)) ? xin.to(at::kFloat).contiguous() : xin.contiguous();
  at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || b.numel() == N, "clasp kernels: bias has ", b.numel(), " entries, expected ", N);
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
  AttnArgs a{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), R, Hq, Hkv, S, D, Dv,
             q.stride(2), q.stride(1), k.stride(1), k.stride(2), v.stride(1), v.stride(2), start, window,
             static_cast<float>(scale), q.scalar_type() == at::kBFloat16};
  AttnKernel kernel = isa.attention;
  const int64_t tasks = R * Hq;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, S * (D + Dv)));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) { kernel(a, t0, t1); });
  return out;
}

}  // namespace
}  // namespace clasp

TORCH_LIBRARY(clasp_kernels, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None, str isa='') -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale, Tensor? bias=None, str isa='') -> Tensor");
  m.def("linear_int4(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group, Tensor? bias=None, "
        "str isa='') -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, int start, int window, float scale, str isa='') -> Tensor");
  m.def("isas() -> str[]");
}

TORCH_LIBRARY_IMPL(clasp_kernels, CPU, m) {
  m.impl("linear", clasp::linear);
  m.impl("linear_int8", clasp::linear_int8);
  m.impl("linear_int4", clasp::linear_int4);
  m.impl("attention", clasp::attention);
}

TORCH_LIBRARY_IMPL(clasp_kernels, CompositeExplicitAutograd, m) {
  m.impl("isas", clasp::supported_isas);
}
