// The few things the kernels of csrc/cuda/ do that are not plain C++: the two memory-ordered operations of
// the persistent kernels' grid barrier (inline PTX), L2-only loads, dynamic shared memory, kernel launches,
// and the one cuBLAS call of the stepwise path.
//
// Each has its CPU twin right beside it, compiled only when RNN_FUSED_SIMT_CPU is defined: the test-only
// SIMT harness (tests/simt/, never a backend) compiles these exact kernel files with g++ and runs every CUDA
// thread as an OS thread. Whoever edits one side edits the other. With the macro off (every real build) the
// GPU side is what the kernels always had, and nvcc's PTX is unchanged.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>

#include <cuda_runtime.h>

namespace rnn_fused {
namespace cuda {

// red.release.gpu: *counter += 1, ordered after this thread's earlier writes (and, through the caller's
// __syncthreads, its CTA's) for any thread that later acquires the counter.
__device__ __forceinline__ void red_release_gpu_add_one(unsigned long long* counter) {
#if defined(RNN_FUSED_SIMT_CPU)
  __atomic_fetch_add(counter, 1ull, __ATOMIC_RELEASE);
#else
  asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(counter) : "memory");
#endif
}

// ld.acquire.gpu: reads *counter; later reads see every write released before the value it returns.
__device__ __forceinline__ unsigned long long ld_acquire_gpu(const unsigned long long* counter) {
#if defined(RNN_FUSED_SIMT_CPU)
  ::simt::on_spin();  // a spinner yields its core to the CTAs it waits for; the watchdog sees where it is
  return __atomic_load_n(counter, __ATOMIC_ACQUIRE);
#else
  unsigned long long seen;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(seen) : "l"(counter) : "memory");
  return seen;
#endif
}

// The kernel's dynamic shared memory, as `unsigned char NAME[]` aligned to 16 bytes: one buffer per CTA of
// exactly the launch's size (the CPU twin fills it with NaN bytes, so a read before a write shows).
#if defined(RNN_FUSED_SIMT_CPU)
#define RNN_FUSED_DYNAMIC_SMEM(NAME) unsigned char* const NAME = ::simt::dynamic_shared_memory()
#else
#define RNN_FUSED_DYNAMIC_SMEM(NAME) extern __shared__ __align__(16) unsigned char NAME[]
#endif

// kernel<<<grid, block, smem, stream>>>(args...); errors surface through cudaGetLastError as usual.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args... args) {
#if defined(RNN_FUSED_SIMT_CPU)
  ::simt::launch(grid, block, smem, /*cooperative=*/false, [=] { kernel(args...); });
#else
  kernel<<<grid, block, smem, stream>>>(args...);
#endif
}

// cudaLaunchCooperativeKernel of a kernel taking one parameter struct: every CTA co-resident, or an error.
template <typename Params>
cudaError_t launch_cooperative_kernel(void (*kernel)(Params), dim3 grid, dim3 block, size_t smem,
                                      cudaStream_t stream, Params params) {
#if defined(RNN_FUSED_SIMT_CPU)
  return ::simt::launch(grid, block, smem, /*cooperative=*/true, [=] { kernel(params); });
#else
  void* args[] = {&params};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, args, smem, stream);
#endif
}

// out[rows, H] (opmath dtype) = a[rows, H] @ b[H, H] through cuBLAS; a and b may be strided views (cuBLAS
// takes the leading dimensions), fp16/bf16 inputs accumulate and store in fp32. The CPU twin upcasts the
// inputs first (the CPU has no mixed-dtype mm): products of fp16/bf16 values are exact in fp32, so it
// computes the same sums.
inline void mm_opmath(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
#if defined(RNN_FUSED_SIMT_CPU)
    at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
#else
    at::mm_out(out, a, b, out.scalar_type());
#endif
  }
}

}  // namespace cuda
}  // namespace rnn_fused
