// Declarations shared by lorweb_ops.cpp (op registration, cuBLAS GEMMs via ATen) and lorweb_kernels.cu.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lorweb_fast {

// z = u * scale * coeffs[row / rows_per_sample, col / rank]; u: (M, R) contiguous, coeffs: (B, N) fp32 contiguous.
at::Tensor scale_columns(const at::Tensor& u, const at::Tensor& coeffs, int64_t rank, int64_t rows_per_sample,
                         double scale);

// (dz * scaling, d_coeffs (B, N) fp32) with d_coeffs = scale * per-sample, per-LoRA sums of u * dz.
std::tuple<at::Tensor, at::Tensor> scale_and_dcoeffs(const at::Tensor& dz, const at::Tensor& u,
                                                     const at::Tensor& coeffs, int64_t rank,
                                                     int64_t rows_per_sample, double scale);

// True when the kernels of this build can run on GPU ``device_index`` (cudaFuncGetAttributes finds an image).
bool device_supported(int64_t device_index);

}  // namespace lorweb_fast
