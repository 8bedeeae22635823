// lorweb_fast._C: the CUDA C++ fallback backend. Same op contract as the Triton backend (see lorweb_fast/ops.py):
//
//   lorweb_fast_cuda::fwd(x (M, in), weight (out, in)?, bias (out,)?, base (M, out)?, lora_a (N, in, r),
//                         lora_b (N, r, out), coeffs (B, N) fp32, scale, rows_per_sample)
//       -> (y (M, out), u (M, R), z (M, R))
//   lorweb_fast_cuda::bwd(dy (M, out), x, weight?, lora_a, lora_b, coeffs, u, z, scale, rows_per_sample,
//                         need_dx=True, need_dbasis=True)
//       -> (dx (M, in), d_lora_a (N, in, r), d_lora_b (N, r, out), d_coeffs (B, N) fp32)
//       dx is an empty (0,) tensor when need_dx is false; d_lora_a and d_lora_b when need_dbasis is false.
//
// Plain GEMMs use cuBLAS through ATen on PyTorch's current stream (so CUDA-graph capture works); the per-sample
// scaling and the coefficient-gradient reduction are the hand-written kernels in lorweb_kernels.cu.

#include <torch/extension.h>
#include <torch/library.h>

#include "lorweb_ops.h"

namespace lorweb_fast {
namespace {

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "lorweb_fast_cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "lorweb_fast_cuda: ", name, " is on ", t.device(), " but x is on ",
              like.device());
  TORCH_CHECK(t.dim() == dim, "lorweb_fast_cuda: ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "lorweb_fast_cuda: ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", like.scalar_type());
}

struct Dims {
  int64_t m, k, n, r, out, batch;
};

Dims check_common(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& coeffs,
                  int64_t rows_per_sample) {
  TORCH_CHECK(x.is_cuda(), "lorweb_fast_cuda: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "lorweb_fast_cuda: x must be 2-D (M, in), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "lorweb_fast_cuda: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  check_tensor(lora_a, "lora_a", 3, x);
  check_tensor(lora_b, "lora_b", 3, x);
  TORCH_CHECK(coeffs.is_cuda() && coeffs.device() == x.device(), "lorweb_fast_cuda: coeffs must be on ", x.device());
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat, "lorweb_fast_cuda: coeffs must be float32, got ",
              coeffs.scalar_type());
  TORCH_CHECK(coeffs.dim() == 2, "lorweb_fast_cuda: coeffs must be 2-D (B, N), got shape ", coeffs.sizes());
  Dims d{x.size(0), x.size(1), lora_a.size(0), lora_a.size(2), lora_b.size(2), coeffs.size(0)};
  TORCH_CHECK(lora_a.size(1) == d.k, "lorweb_fast_cuda: lora_a must be (N, in=", d.k, ", r), got ", lora_a.sizes());
  TORCH_CHECK(lora_b.size(0) == d.n && lora_b.size(1) == d.r, "lorweb_fast_cuda: lora_b must be (N=", d.n, ", r=",
              d.r, ", out), got ", lora_b.sizes());
  TORCH_CHECK(coeffs.size(1) == d.n, "lorweb_fast_cuda: coeffs must be (B, N=", d.n, "), got ", coeffs.sizes());
  // rows_per_sample is 0 for a (B, 0, in) input: no rows, nothing to mix
  TORCH_CHECK((rows_per_sample >= 1 || d.m == 0) && rows_per_sample >= 0 && d.batch * rows_per_sample == d.m,
              "lorweb_fast_cuda: x has ", d.m, " rows but coeffs has ", d.batch, " samples of rows_per_sample=",
              rows_per_sample);
  return d;
}

// The basis packed once per call into contiguous row-major panels (one copy of N * r * in elements):
// A_cat (R, in) with row n*r + j = lora_a[n, :, j], and B_cat (R, out) with row n*r + j = lora_b[n, j, :].
at::Tensor pack_a(const at::Tensor& lora_a) {
  return lora_a.transpose(1, 2).contiguous().view({lora_a.size(0) * lora_a.size(2), lora_a.size(1)});
}

at::Tensor pack_b(const at::Tensor& lora_b) {
  return lora_b.contiguous().view({lora_b.size(0) * lora_b.size(1), lora_b.size(2)});
}

void check_weight(const at::Tensor& weight, const at::Tensor& x, const Dims& d) {
  check_tensor(weight, "weight", 2, x);
  TORCH_CHECK(weight.size(0) == d.out && weight.size(1) == d.k, "lorweb_fast_cuda: weight must be (out=", d.out,
              ", in=", d.k, "), got ", weight.sizes());
}

// Forward, composed so that y is written once by the small low-rank GEMM and then read only in the epilogue of the
// large GEMM (beta = 1), where the compute-bound main loop hides it:
//   y = addmm(bias | base, z, B_cat);  y.addmm_(x, W^T)
// Without a weight (the delta added to a base output) it is the single y = addmm(base, z, B_cat).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                   const c10::optional<at::Tensor>& bias,
                                                   const c10::optional<at::Tensor>& base, const at::Tensor& lora_a,
                                                   const at::Tensor& lora_b, const at::Tensor& coeffs, double scale,
                                                   int64_t rows_per_sample) {
  const Dims d = check_common(x, lora_a, lora_b, coeffs, rows_per_sample);
  if (weight.has_value()) check_weight(*weight, x, d);
  if (bias.has_value()) {
    TORCH_CHECK(weight.has_value(), "lorweb_fast_cuda: bias without weight is not supported");
    check_tensor(*bias, "bias", 1, x);
    TORCH_CHECK(bias->size(0) == d.out, "lorweb_fast_cuda: bias must be (out=", d.out, ",), got ", bias->sizes());
  }
  if (base.has_value()) {
    check_tensor(*base, "base", 2, x);
    TORCH_CHECK(base->size(0) == d.m && base->size(1) == d.out, "lorweb_fast_cuda: base must be (M=", d.m,
                ", out=", d.out, "), got ", base->sizes());
  }
  const auto coeffs_c = coeffs.contiguous();
  const auto a_cat = pack_a(lora_a);  // (R, in)
  const auto b_cat = pack_b(lora_b);  // (R, out)
  auto u = at::mm(x, a_cat.t());      // (M, R), cuBLAS
  auto z = scale_columns(u, coeffs_c, d.r, rows_per_sample, scale);
  at::Tensor y;
  if (base.has_value()) {
    y = at::addmm(*base, z, b_cat);
    if (bias.has_value()) y.add_(*bias);  // both given: one extra pass (no caller of ops.py passes both)
  } else if (bias.has_value()) {
    y = at::addmm(*bias, z, b_cat);
  } else {
    y = at::mm(z, b_cat);
  }
  if (weight.has_value()) y.addmm_(x, weight->t());  // beta = 1: y is read in the cuBLAS epilogue
  return {y, u, z};
}

// Backward: dZ = dy B_cat^T (cuBLAS); dzs = dZ * scaling and d_coeffs (two deterministic kernels); then, composed
// as in the forward, dx = dzs A_cat followed by dx += dy W (beta = 1); d_lora_a = dzs^T x, d_lora_b = z^T dy.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& coeffs, const at::Tensor& u, const at::Tensor& z, double scale,
    int64_t rows_per_sample, bool need_dx, bool need_dbasis) {
  const Dims d = check_common(x, lora_a, lora_b, coeffs, rows_per_sample);
  check_tensor(dy, "dy", 2, x);
  check_tensor(u, "u", 2, x);
  check_tensor(z, "z", 2, x);
  TORCH_CHECK(dy.size(0) == d.m && dy.size(1) == d.out, "lorweb_fast_cuda: dy must be (M, out), got ", dy.sizes());
  TORCH_CHECK(u.size(0) == d.m && u.size(1) == d.n * d.r && u.sizes() == z.sizes(),
              "lorweb_fast_cuda: u and z must be (M, N*r), got ", u.sizes(), " and ", z.sizes());
  if (weight.has_value()) check_weight(*weight, x, d);
  const auto coeffs_c = coeffs.contiguous();
  const auto a_cat = pack_a(lora_a);  // (R, in)
  const auto b_cat = pack_b(lora_b);  // (R, out)
  auto dz = at::mm(dy, b_cat.t());    // (M, R), cuBLAS
  auto [dzs, dcoeffs] = scale_and_dcoeffs(dz, u.contiguous(), coeffs_c, d.r, rows_per_sample, scale);
  // what autograd does not need is not computed (an input that needs no gradient: the first layer's x, a frozen
  // basis), and comes back as an empty (0,) tensor
  auto dx = x.new_empty({0});
  if (need_dx) {
    dx = at::mm(dzs, a_cat);                           // (M, in)
    if (weight.has_value()) dx.addmm_(dy, *weight);    // beta = 1
  }
  auto d_lora_a = lora_a.new_empty({0});
  auto d_lora_b = lora_b.new_empty({0});
  if (need_dbasis) {
    d_lora_a = at::mm(dzs.t(), x).view({d.n, d.r, d.k}).transpose(1, 2).contiguous();
    d_lora_b = at::mm(z.t(), dy).view({d.n, d.r, d.out});
  }
  return {dx, d_lora_a, d_lora_b, dcoeffs};
}

}  // namespace
}  // namespace lorweb_fast

TORCH_LIBRARY(lorweb_fast_cuda, m) {
  m.def(
      "fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor lora_a, Tensor lora_b, Tensor coeffs, "
      "float scale, SymInt rows_per_sample) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bwd(Tensor dy, Tensor x, Tensor? weight, Tensor lora_a, Tensor lora_b, Tensor coeffs, Tensor u, Tensor z, "
      "float scale, SymInt rows_per_sample, bool need_dx=True, bool need_dbasis=True) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lorweb_fast_cuda, CUDA, m) {
  m.impl("fwd", &lorweb_fast::fwd);
  m.impl("bwd", &lorweb_fast::bwd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lorweb_fast CUDA C++ fallback (ops registered as torch.ops.lorweb_fast_cuda.*)";
  m.def("device_supported", &lorweb_fast::device_supported, pybind11::arg("device_index"),
        "whether the compiled kernels can run on that GPU (a binary or PTX for its architecture is present)");
}
