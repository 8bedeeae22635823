// CUDA kernels of the lorweb_fast fallback backend. The GEMMs go to cuBLAS through ATen (lorweb_ops.cpp); the
// kernels here are the per-sample parts that cuBLAS cannot express:
//   * scale_columns:      z[m, c] = u[m, c] * scale * coeffs[m / rows_per_sample, c / r]
//   * scale_and_dcoeffs:  dzs[m, c] = dz[m, c] * scaling(m, c) and
//                         dcoeffs[b, n] = scale * sum_{m in sample b, j < r} u[m, n*r + j] * dz[m, n*r + j]
// Every reduction has a fixed order (no atomics), so results are deterministic. Accumulation is in fp32.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "lorweb_ops.h"

namespace lorweb_fast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void scale_columns_kernel(const scalar_t* __restrict__ u, const float* __restrict__ coeffs,
                                     scalar_t* __restrict__ z, int64_t rows, int64_t cols, int64_t rank,
                                     int64_t num_loras, int64_t rows_per_sample, float scale) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t m = i / cols, c = i % cols;
    const float s = coeffs[(m / rows_per_sample) * num_loras + c / rank] * scale;
    z[i] = static_cast<scalar_t>(static_cast<float>(u[i]) * s);
  }
}

// One block per (sample b, LoRA n): writes dzs for that sample's rows and LoRA's r columns and reduces
// u * dz over them in a fixed order (per-thread strided partial sums, then a shared-memory tree).
template <typename scalar_t>
__global__ void scale_and_dcoeffs_kernel(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ u,
                                         const float* __restrict__ coeffs, scalar_t* __restrict__ dzs,
                                         float* __restrict__ dcoeffs, int64_t cols, int64_t rank, int64_t num_loras,
                                         int64_t rows_per_sample, float scale) {
  const int64_t b = blockIdx.x / num_loras, n = blockIdx.x % num_loras;
  const float s = coeffs[b * num_loras + n] * scale;
  const int64_t count = rows_per_sample * rank;
  float partial = 0.f;
  for (int64_t t = threadIdx.x; t < count; t += blockDim.x) {
    const int64_t m = b * rows_per_sample + t / rank;
    const int64_t i = m * cols + n * rank + t % rank;
    const float g = static_cast<float>(dz[i]);
    partial += static_cast<float>(u[i]) * g;
    dzs[i] = static_cast<scalar_t>(g * s);
  }
  __shared__ float shared[kThreads];
  shared[threadIdx.x] = partial;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) dcoeffs[blockIdx.x] = shared[0] * scale;
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

}  // namespace

bool device_supported(int64_t device_index) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, scale_columns_kernel<float>);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later launches are unaffected
    return false;
  }
  return true;
}

at::Tensor scale_columns(const at::Tensor& u, const at::Tensor& coeffs, int64_t rank, int64_t rows_per_sample,
                         double scale) {
  const c10::cuda::CUDAGuard guard(u.device());
  auto z = at::empty_like(u);
  const int64_t rows = u.size(0), cols = u.size(1);
  if (rows == 0) return z;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lorweb_scale_columns", [&] {
    scale_columns_kernel<scalar_t><<<grid_for(rows * cols), kThreads, 0, stream>>>(
        u.data_ptr<scalar_t>(), coeffs.data_ptr<float>(), z.data_ptr<scalar_t>(), rows, cols, rank,
        coeffs.size(1), rows_per_sample, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor> scale_and_dcoeffs(const at::Tensor& dz, const at::Tensor& u,
                                                     const at::Tensor& coeffs, int64_t rank,
                                                     int64_t rows_per_sample, double scale) {
  const c10::cuda::CUDAGuard guard(dz.device());
  auto dzs = at::empty_like(dz);
  auto dcoeffs = at::zeros({coeffs.size(0), coeffs.size(1)}, coeffs.options().dtype(at::kFloat));
  const int64_t blocks = coeffs.size(0) * coeffs.size(1);
  if (blocks == 0 || dz.size(0) == 0) return {dzs, dcoeffs};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "lorweb_scale_and_dcoeffs", [&] {
    scale_and_dcoeffs_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        dz.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), coeffs.data_ptr<float>(), dzs.data_ptr<scalar_t>(),
        dcoeffs.data_ptr<float>(), dz.size(1), rank, coeffs.size(1), rows_per_sample, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dzs, dcoeffs};
}

}  // namespace lorweb_fast
