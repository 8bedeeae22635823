// CUDA kernels of the lorweb_fast fallback backend. The GEMMs go to cuBLAS through ATen (lorweb_ops.cpp); the
// kernels here are the per-sample parts that cuBLAS cannot express:
//   * scale_columns:   z[m, c] = u[m, c] * scale * coeffs[m / rows_per_sample, c / r]
//   * scale_and_dcoeffs, two launches:
//       1. scale_dz_column_partials: dzs[m, c] = dz[m, c] * scaling(m, c) and, per chunk of rows_per_chunk rows of
//          one sample, the column sums partial[b, chunk, c] = sum_m u[m, c] * dz[m, c] (fp32). The grid is
//          (chunks per sample, B), so it fills the GPU whatever B * N is.
//       2. reduce_dcoeffs: one block per (b, n) sums the r columns of LoRA n over the chunks, in a fixed order:
//          dcoeffs[b, n] = scale * sum_{chunk, j < r} partial[b, chunk, n*r + j]. (One warp per (b, n), 32 loads
//          per lane in turn, took 6.3 us in the H200 record's profile at M = 8192, N = 32.)
// Rows are read with 16-byte vector loads when R and the pointers allow it (else one element at a time). Every
// reduction has a fixed order (no atomics), and rows_per_chunk depends only on (R, dtype, whether the pointers
// allow 16-byte loads), so the same call is bit-identical run to run (a view of u at a misaligned offset takes
// the one-element path, whose order differs from an aligned copy's). Row offsets are int64 (M * R may exceed
// 2^31); column indices are int (R < 2^31).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "lorweb_ops.h"

namespace lorweb_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMinRowsPerChunk = 32;
constexpr int kWarp = 32;
constexpr int64_t kMaxGridY = 65535;  // CUDA limit of gridDim.y

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

template <typename scalar_t, int V>
__device__ __forceinline__ Pack<scalar_t, V> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, V>*>(p);
}

template <typename scalar_t, int V>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, V>& pack) {
  *reinterpret_cast<Pack<scalar_t, V>*>(p) = pack;
}

// One thread per V consecutive columns of one row (grid-stride loop over rows * cols / V packs).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    scale_columns_kernel(const scalar_t* __restrict__ u, const float* __restrict__ coeffs, scalar_t* __restrict__ z,
                         int64_t rows, int cols, int rank, int num_loras, int64_t rows_per_sample, float scale) {
  const int packs_per_row = cols / V;
  const int64_t total = rows * packs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / packs_per_row;
    const int c0 = static_cast<int>(i - m * packs_per_row) * V;
    const float* crow = coeffs + (m / rows_per_sample) * num_loras;
    const int64_t offset = m * cols + c0;
    const Pack<scalar_t, V> in = load_pack<scalar_t, V>(u + offset);
    Pack<scalar_t, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      out.v[v] = static_cast<scalar_t>(static_cast<float>(in.v[v]) * (crow[(c0 + v) / rank] * scale));
    }
    store_pack<scalar_t, V>(z + offset, out);
  }
}

// Block (b = blockIdx.y, chunk = blockIdx.x) covers rows [chunk * rows_per_chunk, ...) of sample b and all R columns.
// Threads form a (threads_y, threads_x) grid; thread (ty, tx) owns column pack tx (+ k * threads_x for wide R) and
// rows ty, ty + threads_y, ... of the chunk. Per-thread fp32 sums go through shared memory and are added over ty in
// a fixed order.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    scale_dz_column_partials_kernel(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ u,
                                    const float* __restrict__ coeffs, scalar_t* __restrict__ dzs,
                                    float* __restrict__ partials, int cols, int rank, int num_loras,
                                    int64_t rows_per_sample, int rows_per_chunk, int threads_x, float scale) {
  __shared__ float sums[kThreads * V];
  const int threads_y = kThreads / threads_x;
  const int tx = threadIdx.x % threads_x, ty = threadIdx.x / threads_x;
  const int64_t b = blockIdx.y;
  const int64_t chunk = blockIdx.x;
  const int64_t chunk_start = chunk * rows_per_chunk;
  // int (not int64) row counter: a 64-bit trip-count division would need a stack frame.
  const int chunk_rows =
      static_cast<int>(min(static_cast<int64_t>(rows_per_chunk), rows_per_sample - chunk_start));
  const int64_t row0 = b * rows_per_sample + chunk_start;
  const float* crow = coeffs + b * num_loras;
  const int packs_per_row = cols / V;
  const int strip_cols = threads_x * V;
  float* out = partials + (b * gridDim.x + chunk) * cols;
  for (int strip = 0; strip < packs_per_row; strip += threads_x) {
    const int pack = strip + tx;
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.f;
    if (pack < packs_per_row) {
      const int c0 = pack * V;
      float s[V];
#pragma unroll
      for (int v = 0; v < V; ++v) s[v] = crow[(c0 + v) / rank] * scale;
      for (int rr = ty; rr < chunk_rows; rr += threads_y) {
        const int64_t offset = (row0 + rr) * cols + c0;
        const Pack<scalar_t, V> g = load_pack<scalar_t, V>(dz + offset);
        const Pack<scalar_t, V> x = load_pack<scalar_t, V>(u + offset);
        Pack<scalar_t, V> o;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float gv = static_cast<float>(g.v[v]);
          acc[v] += static_cast<float>(x.v[v]) * gv;
          o.v[v] = static_cast<scalar_t>(gv * s[v]);
        }
        store_pack<scalar_t, V>(dzs + offset, o);
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) sums[ty * strip_cols + tx * V + v] = acc[v];
    __syncthreads();
    for (int local = threadIdx.x; local < strip_cols; local += kThreads) {
      const int c = strip * V + local;
      if (c < cols) {
        float total = 0.f;
        for (int y = 0; y < threads_y; ++y) total += sums[y * strip_cols + local];
        out[c] = total;
      }
    }
    __syncthreads();
  }
}

// One block per (b, n) = blockIdx.x (kThreads threads, always): thread t sums the (chunk, j) terms t, t + kThreads,
// ... in order, each warp adds its lanes by a fixed xor-shuffle tree, and thread 0 adds the warp totals in warp
// order.
__global__ void __launch_bounds__(kThreads)
    reduce_dcoeffs_kernel(const float* __restrict__ partials, float* __restrict__ dcoeffs, int num_loras, int rank,
                          int cols, int64_t chunks, float scale) {
  __shared__ float warp_totals[kThreads / kWarp];
  const int64_t b = blockIdx.x / num_loras;
  const int n = static_cast<int>(blockIdx.x - b * num_loras);
  const int64_t terms = chunks * rank;
  const float* column = partials + b * chunks * cols + n * rank;
  float total = 0.f;
  for (int64_t t = threadIdx.x; t < terms; t += kThreads) {
    const int64_t chunk = t / rank;
    total += column[chunk * cols + (t - chunk * rank)];
  }
#pragma unroll
  for (int width = kWarp / 2; width > 0; width >>= 1) total += __shfl_xor_sync(0xffffffffu, total, width);
  if (threadIdx.x % kWarp == 0) warp_totals[threadIdx.x / kWarp] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / kWarp; ++w) sum += warp_totals[w];
    dcoeffs[blockIdx.x] = sum * scale;
  }
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 8));
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

int next_pow2_at_most(int v, int cap) {
  int p = 1;
  while (p < v && p < cap) p <<= 1;
  return p;
}

// Calls f(scalar_t tag, vector width) for float / half / bfloat16 with the widest width allowed.
template <typename F>
void dispatch_packed(at::ScalarType dtype, bool vectorizable, F&& f) {
  switch (dtype) {
    case at::kFloat:
      vectorizable ? f(float{}, std::integral_constant<int, 4>{}) : f(float{}, std::integral_constant<int, 1>{});
      break;
    case at::kHalf:
      vectorizable ? f(at::Half{}, std::integral_constant<int, 8>{})
                   : f(at::Half{}, std::integral_constant<int, 1>{});
      break;
    case at::kBFloat16:
      vectorizable ? f(at::BFloat16{}, std::integral_constant<int, 8>{})
                   : f(at::BFloat16{}, std::integral_constant<int, 1>{});
      break;
    default:
      TORCH_CHECK(false, "lorweb_fast_cuda: unsupported dtype ", dtype, " (float32, float16 or bfloat16)");
  }
}

void check_int32_columns(int64_t cols, int64_t rank, int64_t num_loras) {
  TORCH_CHECK(cols <= INT32_MAX && rank <= INT32_MAX && num_loras <= INT32_MAX,
              "lorweb_fast_cuda: R = N * r = ", cols, " is too large");
}

}  // namespace

bool device_supported(int64_t device_index) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, reduce_dcoeffs_kernel);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error so later launches are unaffected
    return false;
  }
  return true;
}

at::Tensor scale_columns(const at::Tensor& u, const at::Tensor& coeffs, int64_t rank, int64_t rows_per_sample,
                         double scale) {
  const c10::cuda::CUDAGuard guard(u.device());
  auto z = at::empty_like(u, at::MemoryFormat::Contiguous);
  const int64_t rows = u.size(0), cols = u.size(1);
  if (rows == 0 || cols == 0) return z;
  check_int32_columns(cols, rank, coeffs.size(1));
  const int64_t width = 16 / static_cast<int64_t>(u.element_size());
  const bool vectorizable = cols % width == 0 && aligned16(u.data_ptr()) && aligned16(z.data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_packed(u.scalar_type(), vectorizable, [&](auto tag, auto vec) {
    using scalar_t = decltype(tag);
    constexpr int V = decltype(vec)::value;
    scale_columns_kernel<scalar_t, V><<<grid_for(rows * (cols / V)), kThreads, 0, stream>>>(
        u.data_ptr<scalar_t>(), coeffs.data_ptr<float>(), z.data_ptr<scalar_t>(), rows, static_cast<int>(cols),
        static_cast<int>(rank), static_cast<int>(coeffs.size(1)), rows_per_sample, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor> scale_and_dcoeffs(const at::Tensor& dz, const at::Tensor& u,
                                                     const at::Tensor& coeffs, int64_t rank,
                                                     int64_t rows_per_sample, double scale) {
  const c10::cuda::CUDAGuard guard(dz.device());
  auto dzs = at::empty_like(dz, at::MemoryFormat::Contiguous);
  const int64_t batch = coeffs.size(0), num_loras = coeffs.size(1), cols = dz.size(1);
  if (batch * num_loras == 0 || dz.size(0) == 0) {
    return {dzs, at::zeros({batch, num_loras}, coeffs.options().dtype(at::kFloat))};
  }
  check_int32_columns(cols, rank, num_loras);
  TORCH_CHECK(batch * num_loras <= INT32_MAX, "lorweb_fast_cuda: B * N = ", batch * num_loras, " is too large");
  const int64_t width = 16 / static_cast<int64_t>(dz.element_size());
  const bool vectorizable =
      cols % width == 0 && aligned16(dz.data_ptr()) && aligned16(u.data_ptr()) && aligned16(dzs.data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  auto dcoeffs = at::empty({batch, num_loras}, coeffs.options().dtype(at::kFloat));
  dispatch_packed(dz.scalar_type(), vectorizable, [&](auto tag, auto vec) {
    using scalar_t = decltype(tag);
    constexpr int V = decltype(vec)::value;
    const int packs_per_row = static_cast<int>(cols / V);
    const int threads_x = next_pow2_at_most(packs_per_row, kWarp);
    const int threads_y = kThreads / threads_x;
    const int rows_per_chunk = std::max(kMinRowsPerChunk, threads_y);
    const int64_t chunks = (rows_per_sample + rows_per_chunk - 1) / rows_per_chunk;
    TORCH_CHECK(chunks <= INT32_MAX, "lorweb_fast_cuda: rows_per_sample=", rows_per_sample, " is too large");
    auto partials = at::empty({batch, chunks, cols}, coeffs.options().dtype(at::kFloat));
    // grid.y (the sample) is at most 65535: more samples (a 2-D input has one row per sample) go in slices
    for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridY) {
      const int64_t samples = std::min(kMaxGridY, batch - b0);
      const int64_t row0 = b0 * rows_per_sample * cols;
      const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(samples));
      scale_dz_column_partials_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
          dz.data_ptr<scalar_t>() + row0, u.data_ptr<scalar_t>() + row0, coeffs.data_ptr<float>() + b0 * num_loras,
          dzs.data_ptr<scalar_t>() + row0, partials.data_ptr<float>() + b0 * chunks * cols, static_cast<int>(cols),
          static_cast<int>(rank), static_cast<int>(num_loras), rows_per_sample, rows_per_chunk, threads_x,
          static_cast<float>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    reduce_dcoeffs_kernel<<<static_cast<unsigned>(batch * num_loras), kThreads, 0, stream>>>(
        partials.data_ptr<float>(), dcoeffs.data_ptr<float>(), static_cast<int>(num_loras),
        static_cast<int>(rank), static_cast<int>(cols), chunks, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dzs, dcoeffs};
}

}  // namespace lorweb_fast
