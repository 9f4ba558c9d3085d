// Self-tests of the emulation (simt_cpu.h): tiny kernels that break one rule each, so tests/test_simt.py can
// check that the shim's own checks fire (a check that never fires would make the harness a test that cannot
// fail). `rnn_fused_simt::selftest(name)` runs one; the misuse cases end the process, in a child.
#include "simt_cpu.h"

#include "../../csrc/cuda/device_primitives.cuh"

#include <torch/library.h>

#include <cmath>

namespace rnn_fused_simt {
namespace {

using rnn_fused::cuda::launch_cooperative_kernel;
using rnn_fused::cuda::launch_kernel;

struct Buffers {
  float* out;
  unsigned long long* counter;
};

// Lanes 0..15 and 16..31 reach different shuffles.
__global__ void divergent_shuffle(Buffers b) {
  float v = 1.0f;
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  }
  b.out[threadIdx.x] = v;
}

// Lane 31 exits before the others shuffle.
__global__ void exited_lane(Buffers b) {
  if (threadIdx.x == 31) return;
  b.out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// A 16-byte load from an address that is only 4-byte aligned.
__global__ void misaligned_load(Buffers b) {
  const uint4 v = __ldcg(reinterpret_cast<const uint4*>(b.out + 1));
  b.out[0] = static_cast<float>(v.x);
}

// Thread 0 waits for an arrival that never comes; the rest wait for it at __syncthreads.
__global__ void unreachable_barrier(Buffers b) {
  if (threadIdx.x == 0) {
    while (rnn_fused::cuda::ld_acquire_gpu(b.counter) < 1) {
    }
  }
  __syncthreads();
}

// Reads dynamic shared memory nobody wrote: the emulation fills it with NaN bytes.
__global__ void unwritten_shared(Buffers b) {
  RNN_FUSED_DYNAMIC_SMEM(smem);
  b.out[threadIdx.x] = reinterpret_cast<const float*>(smem)[threadIdx.x];
}

// Every CTA of a cooperative grid is alive at once: CTA 0 waits for CTA 1's release, CTA 1 for CTA 0's
// (a plain launch, one CTA at a time, would deadlock here). Shuffles and __syncthreads around it.
__global__ void grid_barrier(Buffers b) {
  __syncthreads();
  if (threadIdx.x == 0) rnn_fused::cuda::red_release_gpu_add_one(b.counter);
  if (threadIdx.x == 0) {
    while (rnn_fused::cuda::ld_acquire_gpu(b.counter) < gridDim.x) {
    }
  }
  __syncthreads();
  float v = static_cast<float>(threadIdx.x % 32);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  b.out[blockIdx.x * blockDim.x + threadIdx.x] = v;  // 0 + 1 + ... + 31 = 496 in every lane
}

int64_t selftest(c10::string_view name) {
  ::simt::configure(2, 48 * 1024);
  at::Tensor out = at::zeros({1024}, at::kFloat);
  at::Tensor counter = at::zeros({2}, at::kLong);
  Buffers b{out.data_ptr<float>(), reinterpret_cast<unsigned long long*>(counter.data_ptr<int64_t>())};
  if (name == "divergent_shuffle") launch_kernel(divergent_shuffle, 1, 32, 0, nullptr, b);
  else if (name == "exited_lane") launch_kernel(exited_lane, 1, 32, 0, nullptr, b);
  else if (name == "misaligned_load") launch_kernel(misaligned_load, 1, 1, 0, nullptr, b);
  else if (name == "unreachable_barrier") launch_kernel(unreachable_barrier, 1, 64, 0, nullptr, b);
  else if (name == "unwritten_shared") {
    launch_kernel(unwritten_shared, 1, 32, 32 * sizeof(float), nullptr, b);
    for (int i = 0; i < 32; ++i) TORCH_CHECK(std::isnan(out[i].item<float>()), "unwritten shared memory read ", out[i].item<float>());
  } else if (name == "cooperative_too_large") {
    // 2 SMs x (2048 / 1024) CTAs fit; 5 do not.
    return static_cast<int64_t>(launch_cooperative_kernel(grid_barrier, 5, 1024, 0, nullptr, b));
  } else if (name == "grid_barrier") {
    const cudaError_t e = launch_cooperative_kernel(grid_barrier, 2, 64, 0, nullptr, b);
    TORCH_CHECK(e == cudaSuccess, "cooperative launch failed: ", static_cast<int>(e));
    TORCH_CHECK(out.narrow(0, 0, 128).eq(496).all().item<bool>(), "grid_barrier: wrong shuffle sums");
  } else {
    TORCH_CHECK(false, "unknown self-test ", std::string(name));
  }
  return 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnn_fused_simt, m) { m.def("selftest(str name) -> int", &selftest); }

}  // namespace rnn_fused_simt
