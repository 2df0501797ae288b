// The dispatcher: torch operators clasp_kernels::linear / linear_int8 / linear_int4 that check their
// inputs, pick the best kernel this CPU supports (or the one named), and split the output features over
// torch's intra-op threads. Which thread computes which features never changes any value.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <string>
#include <vector>

#include "linear.h"

namespace clasp {
namespace {

using Kernel = void (*)(const LinearArgs&, int64_t, int64_t);
using XIsBf16 = bool (*)(WeightKind);

struct Isa {
  const char* name;
  Kernel kernel;
  XIsBf16 x_bf16;
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
  out.push_back({"avx512bf16", avx512bf16::linear, avx512bf16::x_is_bf16,
                 avx512 && __builtin_cpu_supports("avx512bf16")});
  out.push_back({"avx512", avx512::linear, avx512::x_is_bf16, avx512});
  out.push_back({"avx2", avx2::linear, avx2::x_is_bf16, avx2});
#endif
  out.push_back({"scalar", scalar::linear, scalar::x_is_bf16, true});
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

}  // namespace
}  // namespace clasp

TORCH_LIBRARY(clasp_kernels, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None, str isa='') -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale, Tensor? bias=None, str isa='') -> Tensor");
  m.def("linear_int4(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group, Tensor? bias=None, "
        "str isa='') -> Tensor");
  m.def("isas() -> str[]");
}

TORCH_LIBRARY_IMPL(clasp_kernels, CPU, m) {
  m.impl("linear", clasp::linear);
  m.impl("linear_int8", clasp::linear_int8);
  m.impl("linear_int4", clasp::linear_int4);
}

TORCH_LIBRARY_IMPL(clasp_kernels, CompositeExplicitAutograd, m) {
  m.impl("isas", clasp::supported_isas);
}
