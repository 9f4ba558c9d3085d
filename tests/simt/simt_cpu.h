// SIMT emulation on the CPU, for tests only: lets g++ compile the exact kernel files of csrc/cuda/ and run
// them, so indexing, tiling, staging, schedule, barrier and race bugs show on a machine without a GPU. Never
// a backend: nothing in rnn_fused/ uses it. Included first by tests/simt/kernels_*.cpp, with
// RNN_FUSED_SIMT_CPU defined (which switches csrc/cuda/device_primitives.cuh to its CPU twins).
//
// The model:
//   threads   every CUDA thread is an OS thread. A cooperative launch starts every thread of every CTA at
//             once (the persistent kernels spin on a grid barrier, so all CTAs must be alive together) and
//             refuses, like cudaErrorCooperativeLaunchTooLarge, a grid the fake device cannot hold at once.
//             A plain launch runs its CTAs one after another: a legal GPU schedule, which exposes a kernel
//             that wrongly relies on progress of other CTAs.
//   barriers  __syncthreads is a counting barrier per CTA that drops exited threads, as bar.sync does.
//   shuffles  __shfl_*_sync go through a per-warp exchange buffer between two warp barriers; a partial
//             mask, an exited lane, or lanes at different shuffles abort with a message (the GPU would hang
//             or compute garbage).
//   memory    dynamic shared memory is one malloc per CTA of exactly the launch's size (AddressSanitizer
//             sees overruns), filled with 0xFF bytes (NaN in every float type), so a read before a write
//             poisons the result; static __shared__ is a function-level static, valid because only plain
//             launches (one CTA at a time) use it; __ldcg aborts on a misaligned address (the GPU faults
//             there, x86 does not).
//   device    a fake device (SM count, opt-in shared memory per block) answers the host planner's queries,
//             so the real launch plans run; it is set per case by simt::configure.
//   watchdog  a launch that has not finished after SIMT_TIMEOUT_S seconds (default 120) prints where every
//             thread waits and exits the process with status 3.
// What it cannot see: PTX memory-model scopes (.cta vs .gpu), L1 non-coherence (__ldcg is a plain load),
// ordering weaker than C++ acquire/release, real warp scheduling and lockstep, occupancy and register
// pressure on real hardware, nvcc/ptxas code generation (device tanh ULPs differ from the host's), CUDA
// streams, graphs and pinned memory, and performance.
#pragma once

#if !defined(RNN_FUSED_SIMT_CPU)
#error "simt_cpu.h is the SIMT harness's shim; compile with -DRNN_FUSED_SIMT_CPU"
#endif

// Everything the kernel files include, before the shim redefines a few CUDA spellings below.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace simt {

// ---- failure -----------------------------------------------------------------------------------------------

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "simt: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// ---- the fake device -----------------------------------------------------------------------------------------

struct Device {
  int sms = 4;                       // cudaDevAttrMultiProcessorCount
  int smem_optin = 48 * 1024;        // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
  int smem_per_sm = 48 * 1024 + 1024;  // what one SM holds for all its CTAs (H100: 227 + 1 KiB)
  int max_threads_per_sm = 2048;
  int cooperative = 1;               // cudaDevAttrCooperativeLaunch
};

inline Device& device() {
  static Device d;
  return d;
}

inline void configure(int sms, int smem_optin) {
  device().sms = sms;
  device().smem_optin = smem_optin;
  device().smem_per_sm = smem_optin + 1024;
}

inline std::mutex& attribute_mutex() {
  static std::mutex m;
  return m;
}

// cudaFuncAttributeMaxDynamicSharedMemorySize of each kernel (default 48 KiB, as on a GPU).
inline std::map<const void*, int>& max_dynamic_smem() {
  static std::map<const void*, int> m;
  return m;
}

inline int max_dynamic_smem_of(const void* kernel) {
  std::lock_guard<std::mutex> lock(attribute_mutex());
  auto it = max_dynamic_smem().find(kernel);
  return it == max_dynamic_smem().end() ? 48 * 1024 : it->second;
}

// CTAs of `threads` threads and `smem` dynamic bytes one SM can hold.
inline int blocks_per_sm(int threads, size_t smem) {
  int n = device().max_threads_per_sm / std::max(threads, 1);
  if (smem > 0) n = std::min<int64_t>(n, device().smem_per_sm / static_cast<int64_t>(smem));
  return n;
}

inline thread_local cudaError_t last_error = cudaSuccess;

inline cudaError_t record(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}

// ---- CUDA runtime stand-ins (the kernel files' calls are renamed to these below) ----------------------------

inline cudaError_t get_device(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = device().sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = device().smem_optin; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = device().cooperative; return cudaSuccess;
    default: fail("cudaDeviceGetAttribute(" + std::to_string(static_cast<int>(attr)) + ") is not modelled");
  }
}

template <typename Kernel>
cudaError_t func_set_attribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) fail("cudaFuncSetAttribute: attribute not modelled");
  if (value < 0 || value > device().smem_optin) return record(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(attribute_mutex());
  max_dynamic_smem()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// As on a GPU, a kernel whose dynamic shared memory exceeds its attribute fits 0 CTAs per SM.
template <typename Kernel>
cudaError_t occupancy(int* blocks, Kernel* kernel, int threads, size_t smem) {
  *blocks = smem > static_cast<size_t>(max_dynamic_smem_of(reinterpret_cast<const void*>(kernel)))
                ? 0
                : blocks_per_sm(threads, smem);
  return cudaSuccess;
}

inline cudaError_t get_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

inline const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    default: return "error";
  }
}

inline void check(cudaError_t e, const char* expr, const char* file, int line) {
  TORCH_CHECK(e == cudaSuccess, "CUDA error (SIMT emulation): ", error_string(e), " (", static_cast<int>(e),
              ") from ", expr, " at ", file, ":", line);
}

struct Stream {
  cudaStream_t stream() const { return nullptr; }
};

// ---- threads, CTAs, warps ------------------------------------------------------------------------------------

// A counting barrier whose expected count shrinks as threads exit (bar.sync waits for non-exited threads).
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t gen = generation_;
    if (++arrived_ == expected_) {
      open();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }
  void drop() {
    std::lock_guard<std::mutex> lock(m_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) open();
  }

 private:
  void open() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_, arrived_ = 0;
  uint64_t generation_ = 0;
};

enum class Where : int { Running, SyncThreads, Shuffle, GridSpin, Exited };

struct Warp {
  explicit Warp(int lanes) : lanes(lanes), bar(lanes) {}
  int lanes;
  Barrier bar;
  std::atomic<int> exited{0};
  alignas(16) unsigned char slot[32][16];
  int site_line[32];
  uint64_t site_count[32];
};

struct Cta {
  dim3 idx;
  unsigned char* smem = nullptr;  // dynamic shared memory, exactly the launch's bytes
  std::unique_ptr<Barrier> sync;
  std::vector<std::unique_ptr<Warp>> warps;
};

struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  Cta* cta = nullptr;
  int lane = 0, warp = 0;
  std::atomic<int> where{static_cast<int>(Where::Running)};
  std::atomic<int> line{0};        // of the last shuffle
  std::atomic<uint64_t> shuffles{0};
};

inline thread_local ThreadState* current = nullptr;

inline ThreadState& self() {
  if (current == nullptr) fail("a device builtin was used outside a kernel launch");
  return *current;
}

inline unsigned char* dynamic_shared_memory() { return self().cta->smem; }

inline void set_where(Where w) { self().where.store(static_cast<int>(w), std::memory_order_relaxed); }

inline void on_spin() {
  ThreadState& t = self();
  if (t.where.load(std::memory_order_relaxed) == static_cast<int>(Where::GridSpin)) sched_yield();
  t.where.store(static_cast<int>(Where::GridSpin), std::memory_order_relaxed);
}

inline void syncthreads() {
  ThreadState& t = self();
  t.where.store(static_cast<int>(Where::SyncThreads), std::memory_order_relaxed);
  t.cta->sync->arrive_and_wait();
  t.where.store(static_cast<int>(Where::Running), std::memory_order_relaxed);
}

// One exchange of a __shfl_*_sync: every lane of the warp deposits `v`, then reads lane src(lane)'s.
template <typename T, typename Src>
T shuffle(unsigned mask, T v, Src src_of, const char* name, const std::source_location& loc) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffled type not modelled");
  ThreadState& t = self();
  Warp& w = *t.cta->warps[t.warp];
  const unsigned full = w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1);
  if (mask != full) {
    fail(std::string(name) + " at line " + std::to_string(loc.line()) + ": mask " + std::to_string(mask) +
         " is not the full mask of warp " + std::to_string(t.warp) + " (partial masks are not modelled)");
  }
  const uint64_t count = t.shuffles.fetch_add(1, std::memory_order_relaxed) + 1;
  t.line.store(static_cast<int>(loc.line()), std::memory_order_relaxed);
  t.where.store(static_cast<int>(Where::Shuffle), std::memory_order_relaxed);
  std::memcpy(w.slot[t.lane], &v, sizeof(T));
  w.site_line[t.lane] = static_cast<int>(loc.line());
  w.site_count[t.lane] = count;
  w.bar.arrive_and_wait();
  if (w.exited.load() > 0) {
    fail(std::string(name) + " at line " + std::to_string(loc.line()) + " in CTA " + std::to_string(t.block_idx.x) +
         ", warp " + std::to_string(t.warp) + ": a lane named in the mask has exited");
  }
  // Every lane must be at this same shuffle: comparing each lane with the next one round the warp checks all.
  const int next = (t.lane + 1) % w.lanes;
  if (w.site_line[next] != static_cast<int>(loc.line()) || w.site_count[next] != count) {
    fail(std::string(name) + ": lanes of CTA " + std::to_string(t.block_idx.x) + ", warp " + std::to_string(t.warp) +
         " reached different shuffles: lane " + std::to_string(t.lane) + " at line " + std::to_string(loc.line()) +
         " (its shuffle #" + std::to_string(count) + "), lane " + std::to_string(next) + " at line " +
         std::to_string(w.site_line[next]) + " (#" + std::to_string(w.site_count[next]) + ")");
  }
  const int src = src_of(t.lane);
  T out;
  std::memcpy(&out, w.slot[src], sizeof(T));
  w.bar.arrive_and_wait();  // nobody overwrites a slot before every lane has read its source
  t.where.store(static_cast<int>(Where::Running), std::memory_order_relaxed);
  return out;
}

inline void check_width(int width, const char* name) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail(std::string(name) + ": width " + std::to_string(width) + " is not a power of two <= 32");
  }
}

// ---- launches ------------------------------------------------------------------------------------------------

struct Launch {
  std::vector<std::unique_ptr<Cta>> ctas;
  std::vector<std::unique_ptr<ThreadState>> states;
  const std::function<void()>* body = nullptr;
};

inline std::string describe_waits(const Launch& l) {
  std::string out;
  for (const auto& cta : l.ctas) {
    int n[5] = {0, 0, 0, 0, 0};
    std::map<int, int> shuffle_lines;
    for (const auto& s : l.states) {
      if (s->cta != cta.get()) continue;
      const int w = s->where.load(std::memory_order_relaxed);
      ++n[w];
      if (w == static_cast<int>(Where::Shuffle)) ++shuffle_lines[s->line.load(std::memory_order_relaxed)];
    }
    if (n[0] + n[1] + n[2] + n[3] + n[4] == 0) continue;  // not started (plain launch: CTAs run in turn)
    out += "  CTA " + std::to_string(cta->idx.x) + ": " + std::to_string(n[3]) + " spinning at the grid barrier (ld.acquire.gpu), " +
           std::to_string(n[1]) + " at __syncthreads, " + std::to_string(n[2]) + " in __shfl_*_sync";
    for (const auto& [line, k] : shuffle_lines) out += " (" + std::to_string(k) + " at line " + std::to_string(line) + ")";
    out += ", " + std::to_string(n[0]) + " running, " + std::to_string(n[4]) + " exited\n";
  }
  return out;
}

// Runs `body` as every thread of CTAs [first, last) of `l`, all at once, and joins them.
inline void run_ctas(Launch& l, size_t first, size_t last) {
  struct Arg {
    ThreadState* state;
    const std::function<void()>* body;
  };
  std::vector<pthread_t> threads;
  std::vector<Arg> args;
  args.reserve(l.states.size());
  for (auto& s : l.states) {
    const size_t c = s->block_idx.x;  // grids are 1-D here (checked at launch)
    if (c >= first && c < last) args.push_back(Arg{s.get(), l.body});
  }
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 1 << 20);
  for (Arg& a : args) {
    pthread_t th;
    const int rc = pthread_create(
        &th, &attr,
        [](void* p) -> void* {
          Arg* a = static_cast<Arg*>(p);
          current = a->state;
          (*a->body)();
          // The thread has exited: it no longer counts at its CTA's or its warp's barriers.
          Warp& w = *a->state->cta->warps[a->state->warp];
          w.exited.fetch_add(1);
          a->state->where.store(static_cast<int>(Where::Exited), std::memory_order_relaxed);
          w.bar.drop();
          a->state->cta->sync->drop();
          current = nullptr;
          return nullptr;
        },
        &a);
    if (rc != 0) fail("pthread_create failed (" + std::to_string(rc) + ") after " + std::to_string(threads.size()) + " threads");
    threads.push_back(th);
  }
  pthread_attr_destroy(&attr);
  for (pthread_t th : threads) pthread_join(th, nullptr);
}

inline int timeout_seconds() {
  const char* v = std::getenv("SIMT_TIMEOUT_S");
  return v != nullptr && *v != '\0' ? std::atoi(v) : 120;
}

inline cudaError_t launch(dim3 grid, dim3 block, size_t smem, bool cooperative, std::function<void()> body) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) fail("only 1-D grids and blocks are modelled");
  const int threads = static_cast<int>(block.x);
  if (grid.x == 0 || threads == 0 || threads > 1024) return record(cudaErrorInvalidConfiguration);
  if (smem > static_cast<size_t>(device().smem_optin)) return record(cudaErrorInvalidValue);
  if (cooperative) {
    if (!device().cooperative) return record(cudaErrorNotSupported);
    if (static_cast<int64_t>(grid.x) > static_cast<int64_t>(blocks_per_sm(threads, smem)) * device().sms) {
      return record(cudaErrorCooperativeLaunchTooLarge);
    }
  }
  Launch l;
  l.body = &body;
  for (unsigned c = 0; c < grid.x; ++c) {
    auto cta = std::make_unique<Cta>();
    cta->idx = dim3(c);
    cta->sync = std::make_unique<Barrier>(threads);
    for (int w0 = 0; w0 < threads; w0 += 32) cta->warps.push_back(std::make_unique<Warp>(std::min(32, threads - w0)));
    for (int t = 0; t < threads; ++t) {
      auto s = std::make_unique<ThreadState>();
      s->thread_idx = make_uint3(t, 0, 0);
      s->block_idx = make_uint3(c, 0, 0);
      s->block_dim = block;
      s->grid_dim = grid;
      s->cta = cta.get();
      s->lane = t % 32;
      s->warp = t / 32;
      l.states.push_back(std::move(s));
    }
    l.ctas.push_back(std::move(cta));
  }

  // The watchdog: a hang (an unreachable barrier target, a divergent barrier or shuffle) fails loudly.
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> lock(m);
    if (!cv.wait_for(lock, std::chrono::seconds(timeout_seconds()), [&] { return done; })) {
      std::fprintf(stderr, "simt: watchdog: a %s launch of %u CTAs x %d threads has not finished after %d s; where the threads wait:\n%s",
                   cooperative ? "cooperative" : "plain", grid.x, threads, timeout_seconds(), describe_waits(l).c_str());
      std::fflush(stderr);
      std::_Exit(3);
    }
  });

  auto run = [&](size_t first, size_t last) {
    for (size_t c = first; c < last; ++c) {
      l.ctas[c]->smem = smem > 0 ? static_cast<unsigned char*>(std::malloc(smem)) : nullptr;
      if (smem > 0) std::memset(l.ctas[c]->smem, 0xFF, smem);
    }
    run_ctas(l, first, last);
    for (size_t c = first; c < last; ++c) {
      std::free(l.ctas[c]->smem);
      l.ctas[c]->smem = nullptr;
    }
  };
  if (cooperative) {
    run(0, grid.x);
  } else {
    for (size_t c = 0; c < grid.x; ++c) run(c, c + 1);
  }
  {
    std::lock_guard<std::mutex> lock(m);
    done = true;
  }
  cv.notify_all();
  watchdog.join();
  return cudaSuccess;
}

}  // namespace simt

// ---- the CUDA spellings the kernel files use ---------------------------------------------------------------

#define threadIdx (::simt::self().thread_idx)
#define blockIdx (::simt::self().block_idx)
#define blockDim (::simt::self().block_dim)
#define gridDim (::simt::self().grid_dim)
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static  // only in plain launches, whose CTAs run one at a time (see the model above)

inline void __syncthreads() { ::simt::syncthreads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::simt::ThreadState& t = ::simt::self();
  ::simt::Warp& w = *t.cta->warps[t.warp];
  if (mask != (w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1))) ::simt::fail("__syncwarp: partial masks are not modelled");
  w.bar.arrive_and_wait();
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32,
              const std::source_location loc = std::source_location::current()) {
  ::simt::check_width(width, "__shfl_sync");
  return ::simt::shuffle(mask, v, [&](int lane) { return (lane & ~(width - 1)) + (src_lane & (width - 1)); },
                         "__shfl_sync", loc);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  const std::source_location loc = std::source_location::current()) {
  ::simt::check_width(width, "__shfl_xor_sync");
  return ::simt::shuffle(mask, v, [&](int lane) {
    const int src = lane ^ lane_mask;
    return src >= ((lane / width) + 1) * width ? lane : src;
  }, "__shfl_xor_sync", loc);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   const std::source_location loc = std::source_location::current()) {
  ::simt::check_width(width, "__shfl_down_sync");
  return ::simt::shuffle(mask, v, [&](int lane) {
    const int src = lane + static_cast<int>(delta);
    return src >= (lane & ~(width - 1)) + width ? lane : src;
  }, "__shfl_down_sync", loc);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                 const std::source_location loc = std::source_location::current()) {
  ::simt::check_width(width, "__shfl_up_sync");
  return ::simt::shuffle(mask, v, [&](int lane) {
    const int src = lane - static_cast<int>(delta);
    return src < (lane & ~(width - 1)) ? lane : src;
  }, "__shfl_up_sync", loc);
}

// ld.global.cg: a plain load here (L1 is not modelled), but aligned as the GPU requires.
template <typename T>
T __ldcg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(T) != 0) {
    ::simt::fail("misaligned __ldcg of " + std::to_string(sizeof(T)) + " bytes (the GPU faults here)");
  }
  return *p;
}

template <typename T>
T atomicAdd(T* address, T v) {
  return std::atomic_ref<T>(*address).fetch_add(v);
}

template <typename T>
T atomicExch(T* address, T v) {
  return std::atomic_ref<T>(*address).exchange(v);
}

template <typename T>
T atomicCAS(T* address, T compare, T v) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, v);
  return compare;
}

using std::max;
using std::min;
using std::tanh;

#define cudaGetDevice ::simt::get_device
#define cudaDeviceGetAttribute ::simt::device_get_attribute
#define cudaFuncSetAttribute ::simt::func_set_attribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::simt::occupancy
#define cudaGetLastError ::simt::get_last_error
#define getCurrentCUDAStream simt_current_stream

namespace c10::cuda {
inline ::simt::Stream simt_current_stream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda

#undef C10_CUDA_CHECK
#define C10_CUDA_CHECK(EXPR) ::simt::check((EXPR), #EXPR, __FILE__, __LINE__)
#undef C10_CUDA_KERNEL_LAUNCH_CHECK
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
