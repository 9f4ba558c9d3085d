// Persistent cooperative kernels: one launch runs all T steps of a layer (both directions).
//
// Decomposition: the grid is D x ctas_batch x ctas_out CTAs, all co-resident (one per SM). A CTA of
// direction d owns R output units j0..j0+R of that direction and a slice of batch rows b0..b0+bs:
//   forward : h_t[r, j] = act(xw_t[r, j] + sum_k W[j, k] h_{t-1}[r, k])   (the CTA keeps rows j of W_hh)
//   backward: carry[r, j] = sum_i W[i, j] dz_{t+1}[r, i]                   (the CTA keeps columns j of W_hh)
//             dz_t[r, j]  = (dh_all_t[r, j] + carry[r, j] or dh_last[r, j]) * act'(h_t[r, j])
// so each step's output slice depends only on the CTA's own W slice and the whole previous state.
// Inside a CTA each warp takes (4 outputs x 2 batch rows) tiles; the lanes split the H-long dot products
// (k = lane, lane + 32, ...) and a 9-shuffle transpose-reduction leaves one result per 4 lanes.
// Where things live:
//   shared : the W_hh slice [R, H] in the storage dtype, loaded once for all T steps; the previous state
//            h_{t-1} (dz_{t+1}) [stage_rows, H] in fp32 (fp64 for double), staged from L2 each step;
//            xw_t (forward) or dh_all_t and act'(h_t) (backward) for the CTA's [bs, R] outputs,
//            prefetched while the CTA waits at the barrier.
//   registers: the 8 fp32 (fp64) accumulators of a tile.
//   global : h_all / dz, written once per step and read by every CTA of the direction in the next step
//            (through L2: ld.global.cg, L1 is not coherent across SMs).
// Barrier: a hand-rolled one, a monotonically increasing 64-bit counter per direction: thread 0 arrives
// with red.release.gpu after a __syncthreads, then waits with ld.acquire.gpu until the counter reaches
// (barrier index + 1) * CTAs-per-direction. Chosen over cooperative_groups grid.sync() because (1) the two
// directions are independent and should not wait for each other, (2) arrive and wait are split, so the
// CTA prefetches the next step's xw (dh_all, h) while the slowest CTA finishes, and (3) a monotonic
// counter needs no reset or sense reversal. Co-residency (without which any grid barrier deadlocks) is
// still guaranteed by launching with cudaLaunchCooperativeKernel, which fails rather than under-schedule.
// Floor per step: one barrier (~1 us) plus one L2 round trip of h (every CTA reads rows x H values), and
// 2*rows*H*H flops spread over the grid; the step loop never leaves the GPU.
#include "device_primitives.cuh"
#include "recurrence_cuda.cuh"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace rnn_fused {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kOI = 4;  // outputs per warp tile
constexpr int kRB = 2;  // batch rows per warp tile; kOI * kRB == 8 accumulators (warp_sum_8)
// Below ~8 outputs per CTA the per-CTA dot products are already shorter than the barrier; more CTAs would
// only add barrier arrivals and L2 traffic for h.
constexpr int kMinRowsPerCta = 8;
// Split the batch across CTAs only when each CTA still gets at least this many rows.
constexpr int kMinBatchPerCta = 16;
// Counters of the two directions 128 bytes apart (one L2 line each); int64 words.
constexpr int kCounterStride = 16;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---- device helpers ---------------------------------------------------------------------------------------

// Loads through L2 only (ld.global.cg): data written by other CTAs during this kernel.
template <typename T>
__device__ __forceinline__ T load_cg(const T* p) {
  if constexpr (sizeof(T) == 2) {
    return T(__ldcg(reinterpret_cast<const unsigned short*>(p)), T::from_bits());
  } else {
    return __ldcg(p);
  }
}

__device__ __forceinline__ void barrier_arrive(unsigned long long* counter) { red_release_gpu_add_one(counter); }

__device__ __forceinline__ void barrier_wait(const unsigned long long* counter, unsigned long long target) {
  while (ld_acquire_gpu(counter) < target) {
  }
}

// Grid barrier of one direction, split so the caller can prefetch between arrive and wait. Every thread
// calls it; `between` runs on all threads after this CTA's arrival and before its wait.
template <typename Between>
__device__ __forceinline__ void direction_barrier(unsigned long long* counter, unsigned long long target,
                                                  Between between) {
  __syncthreads();  // this CTA's stores of the step are done (and its reads of shared buffers)
  if (threadIdx.x == 0) barrier_arrive(counter);
  between();
  if (threadIdx.x == 0) barrier_wait(counter, target);
  __syncthreads();
}

// stage[rr, k] = src(rr)[k] (as acc_t) for rr < n, 0 for rr in [n, n_pad): the previous state rows of one
// batch chunk. `vec`: H is a multiple of 16 bytes worth of elements and every row start is 16-byte aligned.
template <typename scalar_t, typename acc_t, typename RowSrc>
__device__ __forceinline__ void stage_rows(acc_t* stage, int n, int n_pad, int H, bool vec, RowSrc src) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (vec) {
    const int hv = H / kVec;
    for (int idx = threadIdx.x; idx < n_pad * hv; idx += kThreads) {
      const int rr = idx / hv, k = (idx - rr * hv) * kVec;
      acc_t* dst = stage + rr * H + k;
      if (rr < n) {
        alignas(16) scalar_t v[kVec];
        *reinterpret_cast<uint4*>(v) = __ldcg(reinterpret_cast<const uint4*>(src(rr) + k));
#pragma unroll
        for (int q = 0; q < kVec; ++q) dst[q] = static_cast<acc_t>(v[q]);
      } else {
#pragma unroll
        for (int q = 0; q < kVec; ++q) dst[q] = acc_t(0);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < n_pad * H; idx += kThreads) {
      const int rr = idx / H, k = idx - rr * H;
      stage[idx] = rr < n ? static_cast<acc_t>(load_cg(src(rr) + k)) : acc_t(0);
    }
  }
}

// Sums each of v[0..7] over the 32 lanes of the warp by halving exchanges (9 shuffles instead of 40);
// returns, in every lane, the total of v[(lane >> 2) & 7].
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum_8(acc_t (&v)[8], int lane) {
  const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
#pragma unroll
  for (int q = 0; q < 4; ++q) {  // lanes with bit 4 clear keep indices 0..3, the others 4..7
    const acc_t send = b4 ? v[q] : v[q + 4];
    const acc_t keep = b4 ? v[q + 4] : v[q];
    v[q] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
  }
#pragma unroll
  for (int q = 0; q < 2; ++q) {  // v[q] now holds index 4*b4 + q; split on bit 3
    const acc_t send = b3 ? v[q] : v[q + 2];
    const acc_t keep = b3 ? v[q + 2] : v[q];
    v[q] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
  }
  {  // v[q] holds index 4*b4 + 2*b3 + q; split on bit 2
    const acc_t send = b2 ? v[0] : v[1];
    const acc_t keep = b2 ? v[1] : v[0];
    v[0] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
  }
  v[0] += __shfl_xor_sync(0xffffffffu, v[0], 2);
  v[0] += __shfl_xor_sync(0xffffffffu, v[0], 1);
  return v[0];
}

// out[i, rr] = sum_k w_s[i, k] * stage[rr, k] for i < n_out, rr < n_rows, handed to epi(i, rr, value) by
// one lane each. w_s [R, H] (rows >= n_out are zero), stage [round_up(n_rows, kRB), H] (padding rows zero).
template <typename scalar_t, typename acc_t, typename Epilogue>
__device__ __forceinline__ void matvec_tiles(const scalar_t* w_s, const acc_t* stage, int H, int n_out,
                                             int n_rows, Epilogue epi) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_ig = static_cast<int>(ceil_div(n_out, kOI)), n_rg = static_cast<int>(ceil_div(n_rows, kRB));
  for (int tile = warp; tile < n_ig * n_rg; tile += kWarps) {
    const int ig = tile % n_ig, rg = tile / n_ig;
    const scalar_t* w0 = w_s + ig * kOI * H;
    const acc_t* x0 = stage + rg * kRB * H;
    acc_t v[kOI * kRB];
#pragma unroll
    for (int q = 0; q < kOI * kRB; ++q) v[q] = acc_t(0);
#pragma unroll 4
    for (int k = lane; k < H; k += 32) {
      acc_t w[kOI], x[kRB];
#pragma unroll
      for (int oi = 0; oi < kOI; ++oi) w[oi] = static_cast<acc_t>(w0[oi * H + k]);
#pragma unroll
      for (int rb = 0; rb < kRB; ++rb) x[rb] = x0[rb * H + k];
#pragma unroll
      for (int oi = 0; oi < kOI; ++oi)
#pragma unroll
        for (int rb = 0; rb < kRB; ++rb) v[oi * kRB + rb] += w[oi] * x[rb];
    }
    const acc_t sum = warp_sum_8(v, lane);
    const int q = (lane >> 2) & 7;
    const int i = ig * kOI + q / kRB, rr = rg * kRB + q % kRB;
    if ((lane & 3) == 0 && i < n_out && rr < n_rows) epi(i, rr, sum);
  }
}

// ---- kernels -----------------------------------------------------------------------------------------------

struct Tiling {
  int R, ctas_out, ctas_batch, bs, stage_rows;
  bool vec;  // 16-byte loads of the staged state (see stage_rows)
};

// What both kernels read besides their tensors: sizes, the schedule, the barrier counters and the tiling.
struct StepLoop {
  const int64_t* steps;            // [D, T, 4] (packed) or nullptr (padded)
  unsigned long long* counters;    // [D * kCounterStride], zero at launch
  int64_t T;
  int B, D, H;
  Tiling tiling;
};

template <typename scalar_t>
struct ForwardParams : StepLoop {
  const scalar_t* xw;              // [N, D, H]
  const scalar_t* w_hh;            // [D, H, H]
  const scalar_t* h0;              // [D, B, H]
  scalar_t* h_all;                 // [N, D, H]
  scalar_t* h_last;                // [D, B, H]
};

template <typename scalar_t>
struct BackwardParams : StepLoop {
  const scalar_t* w_hh;            // [D, H, H]
  const scalar_t* h_all;           // [N, D, H]
  const scalar_t* dh_all;          // [N, D, H] or nullptr
  const scalar_t* dh_last;         // [D, B, H] or nullptr
  scalar_t* dz;                    // [N, D, H]
  scalar_t* dh0;                   // [D, B, H]
};

template <typename scalar_t, Activation kAct>
__global__ void __launch_bounds__(kThreads, 1) persistent_forward_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tiling tl = p.tiling;
  const int H = p.H, R = tl.R;
  RNN_FUSED_DYNAMIC_SMEM(smem);
  acc_t* stage = reinterpret_cast<acc_t*>(smem);                      // [stage_rows, H]  h_{t-1}
  acc_t* xs = stage + tl.stage_rows * H;                               // [bs, R]          xw_t
  scalar_t* w_s = reinterpret_cast<scalar_t*>(xs + tl.bs * R);         // [R, H]           W_hh[d][j0:j0+R]

  const int per_dir = tl.ctas_out * tl.ctas_batch;
  const int d = blockIdx.x / per_dir, cta = blockIdx.x % per_dir;
  const int j0 = (cta % tl.ctas_out) * R, b0 = (cta / tl.ctas_out) * tl.bs;
  const int n_out = min(R, H - j0);
  const int64_t rs = static_cast<int64_t>(p.D) * H;  // row stride of xw / h_all
  const int64_t dcol = static_cast<int64_t>(d) * H;  // direction d's column offset inside a row
  unsigned long long* counter = p.counters + d * kCounterStride;

  const scalar_t* w = p.w_hh + (dcol + j0) * H;  // = W_hh[d] + j0 * H
  for (int idx = threadIdx.x; idx < R * H; idx += kThreads) w_s[idx] = idx / H < n_out ? w[idx] : scalar_t(0);

  auto prefetch_xw = [&](const StepRows& st) {
    const int n = min(st.rows - b0, tl.bs);
    for (int idx = threadIdx.x; idx < n * R; idx += kThreads) {
      const int rr = idx / R, i = idx - rr * R;
      xs[idx] = i < n_out ? static_cast<acc_t>(p.xw[(st.row_begin + b0 + rr) * rs + dcol + j0 + i]) : acc_t(0);
    }
  };

  if (p.T > 0) prefetch_xw(load_step(p.steps, p.T, p.B, d, 0));
  __syncthreads();
  StepRows prev{0, 0, 0, 0};
  for (int64_t s = 0; s < p.T; ++s) {
    const StepRows st = load_step(p.steps, p.T, p.B, d, s);
    const int nb = min(st.rows - b0, tl.bs);  // this CTA's live rows (may be <= 0)
    for (int c0 = 0; c0 < nb; c0 += tl.stage_rows) {
      const int nc = min(tl.stage_rows, nb - c0);
      if (c0 > 0) __syncthreads();  // the previous chunk's tiles are done reading `stage`
      // Rows [0, carried) continue from the previous visited step, rows [carried, rows) start from h0.
      stage_rows<scalar_t>(stage, nc, static_cast<int>(round_up(nc, kRB)), H, tl.vec, [&](int rr) {
        const int r = b0 + c0 + rr;
        return r < st.carried ? p.h_all + (prev.row_begin + r) * rs + dcol
                              : p.h0 + (dcol * p.B + static_cast<int64_t>(r) * H);
      });
      __syncthreads();
      matvec_tiles(w_s, stage, H, n_out, nc, [&](int i, int rr, acc_t sum) {
        const int r = b0 + c0 + rr;
        const scalar_t h = static_cast<scalar_t>(activate<kAct>(xs[(c0 + rr) * R + i] + sum));
        p.h_all[(st.row_begin + r) * rs + dcol + j0 + i] = h;
        if (r >= st.continuing) p.h_last[(dcol * p.B + static_cast<int64_t>(r) * H) + j0 + i] = h;
      });
    }
    if (s + 1 < p.T) {
      direction_barrier(counter, static_cast<unsigned long long>(s + 1) * per_dir,
                        [&] { prefetch_xw(load_step(p.steps, p.T, p.B, d, s + 1)); });
    }
    prev = st;
  }
}

// Iteration u = 0..T walks the direction's schedule backwards: it first multiplies dz of the step visited
// after (written in iteration u-1) by W^T, which gives the carry of the rows that continue and dh0 of the
// rows that started there, then writes dz of step s = T-1-u (no step when u == T).
template <typename scalar_t, Activation kAct>
__global__ void __launch_bounds__(kThreads, 1) persistent_backward_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tiling tl = p.tiling;
  const int H = p.H, R = tl.R;
  RNN_FUSED_DYNAMIC_SMEM(smem);
  acc_t* stage = reinterpret_cast<acc_t*>(smem);                      // [stage_rows, H]  dz_{t+1}
  acc_t* dhs = stage + tl.stage_rows * H;                              // [bs, R]          dh_all_t
  acc_t* ags = dhs + tl.bs * R;                                        // [bs, R]          act'(h_t)
  scalar_t* wt_s = reinterpret_cast<scalar_t*>(ags + tl.bs * R);      // [R, H]           W_hh[d][:, j0:j0+R]^T

  const int per_dir = tl.ctas_out * tl.ctas_batch;
  const int d = blockIdx.x / per_dir, cta = blockIdx.x % per_dir;
  const int j0 = (cta % tl.ctas_out) * R, b0 = (cta / tl.ctas_out) * tl.bs;
  const int n_out = min(R, H - j0);
  const int64_t rs = static_cast<int64_t>(p.D) * H;
  const int64_t dcol = static_cast<int64_t>(d) * H;
  unsigned long long* counter = p.counters + d * kCounterStride;

  // wt_s[jj, i] = W[i, j0 + jj]: read along jj (coalesced), written transposed (once per launch).
  const scalar_t* w = p.w_hh + dcol * H;
  for (int idx = threadIdx.x; idx < R * H; idx += kThreads) {
    const int i = idx / R, jj = idx - i * R;
    wt_s[jj * H + i] = jj < n_out ? w[static_cast<int64_t>(i) * H + j0 + jj] : scalar_t(0);
  }

  auto prefetch_step = [&](const StepRows& st) {
    const int n = min(st.rows - b0, tl.bs);
    for (int idx = threadIdx.x; idx < n * R; idx += kThreads) {
      const int rr = idx / R, jj = idx - rr * R;
      acc_t dh = acc_t(0), ag = acc_t(0);
      if (jj < n_out) {
        const int64_t off = (st.row_begin + b0 + rr) * rs + dcol + j0 + jj;
        dh = p.dh_all != nullptr ? static_cast<acc_t>(p.dh_all[off]) : acc_t(0);
        ag = activation_grad<kAct>(static_cast<acc_t>(p.h_all[off]));
      }
      dhs[idx] = dh;
      ags[idx] = ag;
    }
  };

  if (p.T > 0) prefetch_step(load_step(p.steps, p.T, p.B, d, p.T - 1));
  __syncthreads();
  for (int64_t u = 0; u <= p.T; ++u) {
    const int64_t s = p.T - 1 - u;
    const StepRows cur = s >= 0 ? load_step(p.steps, p.T, p.B, d, s) : StepRows{0, 0, 0, 0};
    if (u > 0) {
      // mv.rows >= cur.continuing; rows [cur.continuing, mv.rows) started at step s+1 (= its `carried`).
      const StepRows mv = load_step(p.steps, p.T, p.B, d, s + 1);
      const int nb = min(mv.rows - b0, tl.bs);
      for (int c0 = 0; c0 < nb; c0 += tl.stage_rows) {
        const int nc = min(tl.stage_rows, nb - c0);
        if (c0 > 0) __syncthreads();
        stage_rows<scalar_t>(stage, nc, static_cast<int>(round_up(nc, kRB)), H, tl.vec,
                             [&](int rr) { return p.dz + (mv.row_begin + b0 + c0 + rr) * rs + dcol; });
        __syncthreads();
        matvec_tiles(wt_s, stage, H, n_out, nc, [&](int jj, int rr, acc_t carry) {
          const int r = b0 + c0 + rr, lr = c0 + rr;
          if (r < cur.continuing) {
            p.dz[(cur.row_begin + r) * rs + dcol + j0 + jj] =
                static_cast<scalar_t>(times_activation_grad<kAct>(dhs[lr * R + jj] + carry, ags[lr * R + jj]));
          } else {
            p.dh0[(dcol * p.B + static_cast<int64_t>(r) * H) + j0 + jj] = static_cast<scalar_t>(carry);
          }
        });
      }
    }
    // Rows [continuing, rows) end at step s (their sequences' last step): gradient dh_last, no carry.
    const int lo = max(cur.continuing - b0, 0), hi = min(cur.rows - b0, tl.bs);
    for (int idx = threadIdx.x; idx < (hi - lo) * R; idx += kThreads) {
      const int lr = lo + idx / R, jj = idx % R;
      if (jj < n_out) {
        const int64_t r = b0 + lr;
        const acc_t g = p.dh_last != nullptr ? static_cast<acc_t>(p.dh_last[(dcol * p.B + r * H) + j0 + jj])
                                             : acc_t(0);
        p.dz[(cur.row_begin + r) * rs + dcol + j0 + jj] =
            static_cast<scalar_t>(times_activation_grad<kAct>(dhs[lr * R + jj] + g, ags[lr * R + jj]));
      }
    }
    if (u < p.T) {
      direction_barrier(counter, static_cast<unsigned long long>(u + 1) * per_dir, [&] {
        if (s > 0) prefetch_step(load_step(p.steps, p.T, p.B, d, s - 1));
      });
    }
  }
}

// ---- host ------------------------------------------------------------------------------------------------

struct DeviceLimits {
  int sms, smem_optin, cooperative;
};

DeviceLimits device_limits() {
  int dev;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  DeviceLimits l;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.cooperative, cudaDevAttrCooperativeLaunch, dev));
  return l;
}

PersistentPlan refuse(std::string why) {
  PersistentPlan plan;
  plan.why_not = std::move(why);
  return plan;
}

// buffers_per_output: [bs, R] shared buffers (1 forward: xw; 2 backward: dh_all, act'(h)).
template <typename Kernel>
PersistentPlan make_plan(Kernel* kernel, const RecurrenceProblem& p, size_t elt, size_t acc,
                         int buffers_per_output) {
  const DeviceLimits dev = device_limits();
  if (!dev.cooperative) return refuse("the device does not support cooperative launches");
  if (p.B > INT32_MAX / 2 || p.H > INT32_MAX / 2) return refuse("B or H exceeds the kernel's int range");
  const int64_t slots = dev.sms / p.D;  // one CTA per SM, the SMs shared between the directions
  int64_t R = round_up(std::max<int64_t>(ceil_div(p.H, slots), kMinRowsPerCta), kOI);
  R = std::min<int64_t>(R, round_up(p.H, kOI));
  const int64_t ctas_out = ceil_div(p.H, R);
  int64_t ctas_batch = std::max<int64_t>(1, std::min(slots / ctas_out, p.B / kMinBatchPerCta));
  const int64_t bs = round_up(ceil_div(p.B, ctas_batch), kRB);
  ctas_batch = ceil_div(p.B, bs);
  const int64_t fixed = R * p.H * static_cast<int64_t>(elt) + bs * R * static_cast<int64_t>(acc) * buffers_per_output;
  const int64_t per_stage_row = p.H * static_cast<int64_t>(acc);
  if (fixed + kRB * per_stage_row > dev.smem_optin) {
    return refuse(c10::str("the W_hh slice (", R, " x ", p.H, ") and per-row buffers need ",
                           fixed + kRB * per_stage_row, " bytes of shared memory per CTA, the device allows ",
                           dev.smem_optin));
  }
  const int64_t stage_rows = std::min<int64_t>(bs, (dev.smem_optin - fixed) / per_stage_row / kRB * kRB);

  PersistentPlan plan;
  plan.rows_per_cta = static_cast<int>(R);
  plan.ctas_out = static_cast<int>(ctas_out);
  plan.ctas_batch = static_cast<int>(ctas_batch);
  plan.batch_per_cta = static_cast<int>(bs);
  plan.stage_rows = static_cast<int>(stage_rows);
  plan.blocks = static_cast<int>(p.D * ctas_out * ctas_batch);
  plan.smem = static_cast<size_t>(fixed + stage_rows * per_stage_row);
  // The attribute belongs to the kernel, not to the call: set it to the device's maximum (not plan.smem), so
  // concurrent calls with different plans cannot lower it between another call's plan and its launch.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dev.smem_optin));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, plan.smem));
  if (static_cast<int64_t>(per_sm) * dev.sms < plan.blocks) {
    return refuse(c10::str("only ", per_sm * dev.sms, " CTAs can be co-resident, the plan needs ", plan.blocks));
  }
  plan.ok = true;
  return plan;
}

// Barrier counters (zeroed) followed, for packed input, by the schedule table [D, T, 4]: one int64 device
// buffer, filled from pinned memory by one async copy on the current stream (`like` is on the GPU; only the
// SIMT test harness passes CPU tensors, which cannot use pinned memory and need none).
at::Tensor upload_schedule(const RecurrenceProblem& p, const at::Tensor& like) {
  const int64_t counter_words = p.D * kCounterStride;
  const at::TensorOptions dev_opts = like.options().dtype(at::kLong);
  if (!p.packed) return at::zeros({counter_words}, dev_opts);
  at::Tensor host = at::empty({counter_words + p.D * p.T * kStepFields},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(like.is_cuda()));
  int64_t* h = host.data_ptr<int64_t>();
  std::fill(h, h + counter_words, int64_t(0));
  for (int64_t d = 0; d < p.D; ++d) {
    const std::vector<Step> steps = p.schedule(d);
    for (int64_t s = 0; s < p.T; ++s) {
      int64_t* e = h + counter_words + (d * p.T + s) * kStepFields;
      e[0] = steps[s].rows;
      e[1] = steps[s].row_begin;
      e[2] = steps[s].carried;
      e[3] = steps[s].continuing;
    }
  }
  at::Tensor dev = at::empty({host.numel()}, dev_opts);
  dev.copy_(host, /*non_blocking=*/true);
  return dev;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The StepLoop of a launch: `workspace` is upload_schedule's buffer (counters, then the packed schedule).
StepLoop step_loop(const PersistentPlan& plan, const RecurrenceProblem& p, const at::Tensor& workspace, bool vec) {
  int64_t* w = workspace.data_ptr<int64_t>();
  return StepLoop{p.packed ? w + p.D * kCounterStride : nullptr,
                  reinterpret_cast<unsigned long long*>(w),
                  p.T,
                  static_cast<int>(p.B),
                  static_cast<int>(p.D),
                  static_cast<int>(p.H),
                  Tiling{plan.rows_per_cta, plan.ctas_out, plan.ctas_batch, plan.batch_per_cta, plan.stage_rows, vec}};
}

template <typename Params>
void launch_cooperative(void (*kernel)(Params), const PersistentPlan& plan, Params params) {
  C10_CUDA_CHECK(launch_cooperative_kernel(kernel, dim3(plan.blocks), dim3(kThreads), plan.smem,
                                           c10::cuda::getCurrentCUDAStream().stream(), params));
}

}  // namespace

PersistentPlan plan_persistent(const RecurrenceProblem& p, at::ScalarType dtype, bool backward) {
  PersistentPlan plan;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rnn_fused_plan_persistent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RNN_FUSED_ACTIVATION_SWITCH(p.activation, kAct, [&] {
      plan = backward ? make_plan(persistent_backward_kernel<scalar_t, kAct>, p, sizeof(scalar_t), sizeof(acc_t), 2)
                      : make_plan(persistent_forward_kernel<scalar_t, kAct>, p, sizeof(scalar_t), sizeof(acc_t), 1);
    });
  });
  return plan;
}

void persistent_forward(const PersistentPlan& plan, const RecurrenceProblem& p, const at::Tensor& xw,
                        const at::Tensor& w_hh, const at::Tensor& h0, at::Tensor& h_all, at::Tensor& h_last) {
  const at::Tensor ws = upload_schedule(p, xw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xw.scalar_type(), "rnn_fused_persistent_forward", [&] {
    const bool vec = p.H % (16 / sizeof(scalar_t)) == 0 && aligned16(h_all.data_ptr()) && aligned16(h0.data_ptr());
    ForwardParams<scalar_t> params{step_loop(plan, p, ws, vec), xw.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
                                   h0.data_ptr<scalar_t>(), h_all.data_ptr<scalar_t>(), h_last.data_ptr<scalar_t>()};
    RNN_FUSED_ACTIVATION_SWITCH(p.activation, kAct,
                                [&] { launch_cooperative(persistent_forward_kernel<scalar_t, kAct>, plan, params); });
  });
}

void persistent_backward(const PersistentPlan& plan, const RecurrenceProblem& p, const at::Tensor& w_hh,
                         const at::Tensor& h_all, const at::Tensor& dh_all, const at::Tensor& dh_last,
                         at::Tensor& dz, at::Tensor& dh0) {
  const at::Tensor ws = upload_schedule(p, h_all);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_all.scalar_type(), "rnn_fused_persistent_backward", [&] {
    const bool vec = p.H % (16 / sizeof(scalar_t)) == 0 && aligned16(dz.data_ptr());
    BackwardParams<scalar_t> params{step_loop(plan, p, ws, vec),
                                    w_hh.data_ptr<scalar_t>(),
                                    h_all.data_ptr<scalar_t>(),
                                    dh_all.defined() ? dh_all.data_ptr<scalar_t>() : nullptr,
                                    dh_last.defined() ? dh_last.data_ptr<scalar_t>() : nullptr,
                                    dz.data_ptr<scalar_t>(),
                                    dh0.data_ptr<scalar_t>()};
    RNN_FUSED_ACTIVATION_SWITCH(p.activation, kAct,
                                [&] { launch_cooperative(persistent_backward_kernel<scalar_t, kAct>, plan, params); });
  });
}

}  // namespace cuda
}  // namespace rnn_fused
