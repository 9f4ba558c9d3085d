// The barrier floor: what one step of the persistent kernels (csrc/cuda/recurrence_persistent.cu) costs
// when the step does no arithmetic, i.e. the floor every per-step GPU number is judged against.
//
// Decomposition: a cooperative launch of C CTAs of 256 threads (one per SM, as the product launches them),
// looping over S steps. Each step ends with the product's grid barrier, built from the same primitives
// (rnn_fused::cuda::red_release_gpu_add_one / ld_acquire_gpu, csrc/cuda/device_primitives.cuh): one
// monotonic 64-bit counter in global memory; __syncthreads, thread 0 arrives (red.release.gpu), thread 0
// spins with ld.acquire.gpu until the counter reaches (step + 1) * C, __syncthreads. Dynamic shared memory
// and the cooperative launch go through the product's helpers of that header too.
//   mode "sync": the barrier alone.
//   mode "l2"  : plus the L2 round trip of the state h [rows, H] fp32 that each step of the product makes:
//                every CTA stages the whole previous h into shared memory through L2 (ld.global.cg, as
//                stage_rows does), then writes its 1/C slice of the next h (ping-pong buffers in global),
//                h_s[i] = h_{s-1}[(i + 1) % n] + 1, so that after S steps every element must equal S: a
//                stale read across the barrier shows up as a wrong value (checked on the host).
// Measured: us per step = (t(S1) - t(S0)) / (S1 - S0), t the median of a few event-timed launches, so
// launch overhead and the first stage drop out. Registers: the loop indices; shared: the staged h (at most
// 64 KiB); global: the counter and the two h buffers.
//
// Build (scripts/gpu_validation.sh does it; device_primitives.cuh includes ATen headers, hence torch's
// include paths; nothing of ATen is linked):
//   nvcc -O3 -arch=sm_90 -std=c++20 --expt-relaxed-constexpr $(python3 -c "import torch.utils.cpp_extension as c; \
//        print(' '.join('-I' + p for p in c.include_paths()))") benchmarks/barrier_floor.cu -o barrier_floor
// Run: ./barrier_floor [--json FILE] [--ctas 8,32,66,132]
#include "../csrc/cuda/device_primitives.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kThreads = 256;          // the persistent kernels' CTA size
constexpr int kMaxStageFloats = 16384;  // 64 KiB of shared memory: h of 16 rows x H=1024 in fp32

// ---- device side --------------------------------------------------------------------------------------------

struct Params {
  unsigned long long* counter;  // [1], zero at launch
  float* h;                     // [2, n] ping-pong state (mode l2), zero at launch
  int n;                        // rows * H floats of state; 0 = barrier only
  long long steps;
};

// The product's direction_barrier without the prefetch between arrive and wait.
__device__ __forceinline__ void grid_barrier(unsigned long long* counter, unsigned long long target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    rnn_fused::cuda::red_release_gpu_add_one(counter);
    while (rnn_fused::cuda::ld_acquire_gpu(counter) < target) {
    }
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads, 1) step_loop_kernel(const Params p) {
  RNN_FUSED_DYNAMIC_SMEM(smem);
  float* stage = reinterpret_cast<float*>(smem);  // [n]
  const int ctas = gridDim.x;
  const int slice = (p.n + ctas - 1) / ctas;
  const int i0 = blockIdx.x * slice, i1 = min(p.n, i0 + slice);
  for (long long s = 0; s < p.steps; ++s) {
    if (p.n > 0) {
      const float* prev = p.h + ((s + 1) & 1) * p.n;  // h_{s-1}, written by every CTA before barrier s-1
      float* next = p.h + (s & 1) * p.n;
      for (int i = threadIdx.x; i < p.n; i += kThreads) stage[i] = __ldcg(prev + i);
      __syncthreads();
      for (int i = i0 + threadIdx.x; i < i1; i += kThreads) next[i] = stage[(i + 1) % p.n] + 1.0f;
    }
    grid_barrier(p.counter, static_cast<unsigned long long>(s + 1) * ctas);
  }
}

// ---- host side ----------------------------------------------------------------------------------------------

#define CHECK_CUDA(call)                                                                              \
  do {                                                                                                \
    const cudaError_t err_ = (call);                                                                  \
    if (err_ != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

struct Launch {
  int ctas, n;
  unsigned long long* counter;
  float* h;
  cudaEvent_t start, stop;
};

// Milliseconds of one launch of `steps` steps (counter and state zeroed first, outside the timed region).
float time_launch(Launch& l, long long steps) {
  CHECK_CUDA(cudaMemset(l.counter, 0, sizeof(unsigned long long)));
  if (l.n > 0) CHECK_CUDA(cudaMemset(l.h, 0, 2 * sizeof(float) * l.n));
  const Params p{l.counter, l.h, l.n, steps};
  CHECK_CUDA(cudaEventRecord(l.start));
  CHECK_CUDA(rnn_fused::cuda::launch_cooperative_kernel(step_loop_kernel, dim3(l.ctas), dim3(kThreads),
                                                        sizeof(float) * l.n, cudaStream_t{0}, p));
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaEventRecord(l.stop));
  CHECK_CUDA(cudaEventSynchronize(l.stop));
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, l.start, l.stop));
  return ms;
}

// The last launch's results: the counter reached steps * ctas, and every state element equals steps.
bool check_last(const Launch& l, long long steps, std::string* why) {
  unsigned long long counter = 0;
  CHECK_CUDA(cudaMemcpy(&counter, l.counter, sizeof(counter), cudaMemcpyDeviceToHost));
  if (counter != static_cast<unsigned long long>(steps) * l.ctas) {
    *why = "counter " + std::to_string(counter) + " != steps x ctas";
    return false;
  }
  if (l.n == 0 || steps == 0) return true;
  std::vector<float> h(l.n);
  CHECK_CUDA(cudaMemcpy(h.data(), l.h + ((steps - 1) & 1) * l.n, sizeof(float) * l.n, cudaMemcpyDeviceToHost));
  for (int i = 0; i < l.n; ++i) {
    if (h[i] != static_cast<float>(steps)) {
      *why = "h[" + std::to_string(i) + "] = " + std::to_string(h[i]) + " != " + std::to_string(steps) +
             " (a stale read across the barrier)";
      return false;
    }
  }
  return true;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const char* json_path = nullptr;
  std::vector<int> cta_counts = {8, 32, 66, 132};
  for (int a = 1; a < argc; ++a) {
    if (!std::strcmp(argv[a], "--json") && a + 1 < argc) {
      json_path = argv[++a];
    } else if (!std::strcmp(argv[a], "--ctas") && a + 1 < argc) {
      cta_counts.clear();
      for (char* tok = std::strtok(argv[++a], ","); tok; tok = std::strtok(nullptr, ",")) {
        cta_counts.push_back(std::atoi(tok));
      }
    } else {
      std::fprintf(stderr, "usage: %s [--json FILE] [--ctas 8,32,66,132]\n", argv[0]);
      return 2;
    }
  }
  int dev = 0, sms = 0, cooperative = 0, clock_khz = 0, l2 = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  if (!cooperative) {
    std::fprintf(stderr, "%s does not support cooperative launches\n", prop.name);
    return 1;
  }
  CHECK_CUDA(cudaFuncSetAttribute(step_loop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  sizeof(float) * kMaxStageFloats));
  std::printf("%s: %d SMs, %d MHz max SM clock, %d MiB L2\n", prop.name, sms, clock_khz / 1000, l2 >> 20);

  // (label, floats of h): the barrier alone, then h of 1 x 1024 and of 16 x 1024 (the B=1 and B=16 rows of
  // gpu-quick at H=1024, fp32 staging).
  const std::vector<std::pair<std::string, int>> modes = {{"sync", 0}, {"l2 h[1x1024]", 1024},
                                                          {"l2 h[16x1024]", kMaxStageFloats}};
  constexpr long long kS0 = 1000, kS1 = 11000;
  constexpr int kRepeats = 5;
  unsigned long long* counter = nullptr;
  float* h = nullptr;
  CHECK_CUDA(cudaMalloc(&counter, 128));
  CHECK_CUDA(cudaMalloc(&h, 2 * sizeof(float) * kMaxStageFloats));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));

  std::string rows;
  bool all_ok = true;
  std::printf("%-14s %6s %12s %12s %8s\n", "mode", "ctas", "us/step", "launch us", "check");
  for (const auto& mode : modes) {
    for (int ctas : cta_counts) {
      int per_sm = 0;
      CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, step_loop_kernel, kThreads,
                                                               sizeof(float) * mode.second));
      if (ctas > per_sm * sms) {
        std::printf("%-14s %6d %12s %12s %8s\n", mode.first.c_str(), ctas, "-", "-", "skipped");
        continue;
      }
      Launch l{ctas, mode.second, counter, h, start, stop};
      time_launch(l, kS1);  // warm-up (module load, clocks)
      std::vector<float> t0, t1;
      for (int r = 0; r < kRepeats; ++r) {
        t0.push_back(time_launch(l, kS0));
        t1.push_back(time_launch(l, kS1));
      }
      std::string why;
      const bool ok = check_last(l, kS1, &why);
      all_ok = all_ok && ok;
      const double us_step = 1e3 * (median(t1) - median(t0)) / double(kS1 - kS0);
      const double launch_us = 1e3 * median(t0) - us_step * kS0;
      std::printf("%-14s %6d %12.3f %12.1f %8s %s\n", mode.first.c_str(), ctas, us_step, launch_us,
                  ok ? "ok" : "WRONG", why.c_str());
      char row[512];
      std::snprintf(row, sizeof(row),
                    "%s\n  {\"mode\": \"%s\", \"ctas\": %d, \"state_floats\": %d, \"us_per_step\": %.4f, "
                    "\"launch_us\": %.2f, \"steps\": [%lld, %lld], \"repeats\": %d, \"check\": \"%s\"}",
                    rows.empty() ? "" : ",", mode.first.c_str(), ctas, mode.second, us_step, launch_us, kS0, kS1,
                    kRepeats, ok ? "ok" : why.c_str());
      rows += row;
    }
  }
  if (json_path) {
    FILE* f = std::fopen(json_path, "w");
    if (!f) {
      std::perror(json_path);
      return 1;
    }
    std::fprintf(f,
                 "{\"device\": \"%s\", \"sm_count\": %d, \"max_sm_clock_mhz\": %d, \"l2_bytes\": %d, "
                 "\"cuda_runtime\": %d, \"threads_per_cta\": %d,\n \"results\": [%s\n]}\n",
                 prop.name, sms, clock_khz / 1000, l2, CUDART_VERSION, kThreads, rows.c_str());
    std::fclose(f);
  }
  CHECK_CUDA(cudaFree(counter));
  CHECK_CUDA(cudaFree(h));
  return all_ok ? 0 : 1;
}
