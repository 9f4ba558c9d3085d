// Step-by-step fallback for shapes the persistent kernels cannot hold on chip (a W_hh slice larger than a
// CTA's shared memory, too few co-resident CTAs, no cooperative launch): the host walks the schedule and
// launches, per step and direction,
//   forward : Z = h_{prev} W^T (cuBLAS through at::mm_out, fp32 output for fp16/bf16 inputs), then one fused
//             pointwise kernel h_t = act(xw_t + Z) that also writes h_last for the rows that end;
//   backward: G = dz_{next} W (cuBLAS), then one fused pointwise kernel that writes dz_t = (dh_all_t + G or
//             dh_last) * act'(h_t) and dh0 for the rows that started at the next visited step; with backward
//             options (clipping, recorded norms) a row-per-block kernel instead, which also reduces ||g||.
//             The persistent backward does not implement the options, so every optioned backward runs here.
// Memory: Z / G are one [B, H] fp32 (fp64) scratch reused by every step; h_all / dz are read in place
// through strided views (row stride D*H), so nothing is copied per step. For fp16/bf16 the carried state is
// kept in fp32 as the persistent kernels keep it: the pointwise kernels also write h_t (forward) and dz_t
// (backward) to a [D, B, H] fp32 state, the next step's GEMM reads that and an fp32 copy of W_hh (made once
// per call), never the half-rounded h_all / dz (rounding the state every step loses accuracy with T).
// Floor: the GEMM's (W_hh read from L2/HBM once per step, 2*rows*H*H flops) plus ~3 launches per step, the
// regime of large H where the GEMM dominates. The same schedule as the CPU backend, in the same order.
#include "device_primitives.cuh"
#include "recurrence_cuda.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>

namespace rnn_fused {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 16));
}

// h_t[r, j] = act(xw_t[r, j] + z[r, j]) for r < rows; rows >= continuing end here and also go to h_last.
template <typename scalar_t, Activation kAct>
__global__ void __launch_bounds__(kThreads) step_forward_kernel(
    const scalar_t* __restrict__ xw,                  // [N, D, H], at the step's first row and direction d
    const at::opmath_type<scalar_t>* __restrict__ z,  // [rows, H]
    scalar_t* __restrict__ h_t,                       // [N, D, H], like xw
    scalar_t* __restrict__ h_last,                    // [B, H] of direction d
    at::opmath_type<scalar_t>* __restrict__ state,    // [B, H] of direction d: h_t unrounded, or nullptr
    int64_t rows, int64_t continuing, int64_t H, int64_t rs) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < rows * H;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t r = idx / H, j = idx - r * H;
    const acc_t h_acc = activate<kAct>(static_cast<acc_t>(xw[r * rs + j]) + z[idx]);
    const scalar_t h = static_cast<scalar_t>(h_acc);
    if (state) state[idx] = h_acc;
    h_t[r * rs + j] = h;
    if (r >= continuing) h_last[idx] = h;
  }
}

// For r < rows: dz_t[r, j] = (dh_all_t[r, j] + (r < continuing ? g[r, j] : dh_last[r, j])) * act'(h_t[r, j]);
// for continuing <= r < g_rows: dh0[r, j] = g[r, j] (rows that started at the step visited after).
template <typename scalar_t, Activation kAct>
__global__ void __launch_bounds__(kThreads) step_backward_kernel(
    const scalar_t* __restrict__ h_t,                 // [N, D, H], at the step's first row and direction d
    const scalar_t* __restrict__ dh_t,                // like h_t, or nullptr
    const scalar_t* __restrict__ dh_last,             // [B, H] of direction d, or nullptr
    const at::opmath_type<scalar_t>* __restrict__ g,  // [g_rows, H] = dz_{next} W
    scalar_t* __restrict__ dz_t,                      // like h_t
    scalar_t* __restrict__ dh0,                       // [B, H] of direction d
    at::opmath_type<scalar_t>* __restrict__ dz_state, // [B, H] of direction d: dz_t unrounded, or nullptr
    int64_t rows, int64_t continuing, int64_t g_rows, int64_t H, int64_t rs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = std::max(rows, g_rows) * H;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * kThreads) {
    const int64_t r = idx / H, j = idx - r * H;
    if (r < rows) {
      const int64_t off = r * rs + j;
      const acc_t carry = r < continuing ? g[idx] : (dh_last ? static_cast<acc_t>(dh_last[idx]) : acc_t(0));
      const acc_t dh = dh_t ? static_cast<acc_t>(dh_t[off]) : acc_t(0);
      const acc_t dz = times_activation_grad<kAct>(dh + carry, activation_grad<kAct>(static_cast<acc_t>(h_t[off])));
      if (dz_state) dz_state[idx] = dz;
      dz_t[off] = static_cast<scalar_t>(dz);
    }
    if (r >= continuing && r < g_rows) dh0[idx] = static_cast<scalar_t>(g[idx]);
  }
}

// The same step with backward options (csrc/ops.cpp): clip-by-norm needs a row's whole ||g|| before any
// of its dz, so here one block owns one row (grid = max(rows, g_rows) blocks): pass 1 sums g^2 over the
// row in double (block reduction through shared memory; a float32 square of a vanishing gradient would
// underflow), pass 2 re-reads g (from L1/L2), clips and writes dz.
// grad_norm (at the step's first row and direction d, row stride norm_stride = D) gets ||g||, or is nullptr.
template <typename scalar_t, Activation kAct>
__global__ void __launch_bounds__(kThreads) step_backward_options_kernel(
    const scalar_t* __restrict__ h_t, const scalar_t* __restrict__ dh_t, const scalar_t* __restrict__ dh_last,
    const at::opmath_type<scalar_t>* __restrict__ g, scalar_t* __restrict__ dz_t, scalar_t* __restrict__ dh0,
    at::opmath_type<scalar_t>* __restrict__ dz_state, int64_t rows, int64_t continuing, int64_t g_rows, int64_t H,
    int64_t rs, ClipMode clip_mode,
    double clip, at::opmath_type<scalar_t>* __restrict__ grad_norm, int64_t norm_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kWarps = kThreads / 32;
  __shared__ double partial[kWarps];
  const int64_t r = blockIdx.x;
  if (r >= continuing && r < g_rows) {
    for (int64_t j = threadIdx.x; j < H; j += kThreads) dh0[r * H + j] = static_cast<scalar_t>(g[r * H + j]);
  }
  if (r >= rows) return;  // uniform over the block
  const auto grad_at = [&](int64_t j) {  // g_t[r, j] = dL/dh_t
    const acc_t carry = r < continuing ? g[r * H + j] : (dh_last ? static_cast<acc_t>(dh_last[r * H + j]) : acc_t(0));
    return (dh_t ? static_cast<acc_t>(dh_t[r * rs + j]) : acc_t(0)) + carry;
  };
  double sq = 0;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    const double v = grad_at(j);
    sq += v * v;
  }
  for (int offset = 16; offset > 0; offset /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sq;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kWarps; ++w) total += partial[w];  // same order in every thread: one value per row
  const double norm = sqrt(total);
  if (grad_norm != nullptr && threadIdx.x == 0) grad_norm[r * norm_stride] = static_cast<acc_t>(norm);
  acc_t scale = 1;
  if (clip_mode == ClipMode::Norm && !(norm <= clip)) {
    scale = static_cast<acc_t>(clip / norm);  // a NaN norm makes the row NaN, as in the reference
  }
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    acc_t v = grad_at(j);
    if (clip_mode == ClipMode::Value) {
      const acc_t c = static_cast<acc_t>(clip);
      v = v > c ? c : v;
      v = v < -c ? -c : v;
    }
    const acc_t dz = times_activation_grad<kAct>(scale * v, activation_grad<kAct>(static_cast<acc_t>(h_t[r * rs + j])));
    if (dz_state) dz_state[r * H + j] = dz;
    dz_t[r * rs + j] = static_cast<scalar_t>(dz);
  }
}

// The [N, H] view of direction d of a [N, D, H] (or [T, B, D, H]) tensor: row stride D*H, no copy.
at::Tensor direction_rows(const at::Tensor& x, const RecurrenceProblem& p, int64_t d) {
  return x.view({p.N, p.D, p.H}).select(1, d);
}

// Every direction's schedule, built once per call on the host (the per-step loop below indexes it).
std::vector<std::vector<Step>> schedules_of(const RecurrenceProblem& p) {
  std::vector<std::vector<Step>> schedules;
  for (int64_t d = 0; d < p.D; ++d) schedules.push_back(p.schedule(d));
  return schedules;
}

}  // namespace

void stepwise_forward(const RecurrenceProblem& p, const at::Tensor& xw, const at::Tensor& w_hh,
                      const at::Tensor& h0, at::Tensor& h_all, at::Tensor& h_last) {
  const at::ScalarType acc_type = at::toOpMathType(xw.scalar_type());
  at::Tensor z = at::empty({p.B, p.H}, xw.options().dtype(acc_type));
  // Half types: the state and W_hh in fp32 (see the memory plan above); fp32/fp64 read h_all in place.
  const bool fp32_state = acc_type != xw.scalar_type();
  at::Tensor state = fp32_state ? at::empty({p.D, p.B, p.H}, z.options()) : at::Tensor();
  const at::Tensor w = fp32_state ? w_hh.to(acc_type) : w_hh, h_start = fp32_state ? h0.to(acc_type) : h0;
  const int64_t rs = p.D * p.H;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const std::vector<std::vector<Step>> schedules = schedules_of(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xw.scalar_type(), "rnn_fused_stepwise_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RNN_FUSED_ACTIVATION_SWITCH(p.activation, kAct, [&] {
      for (int64_t s = 0; s < p.T; ++s) {
        for (int64_t d = 0; d < p.D; ++d) {
          const Step& st = schedules[d][s];
          const at::Tensor w_t = w[d].t();
          if (st.carried > 0) {
            const Step& prev = schedules[d][s - 1];
            const at::Tensor h_prev = fp32_state ? state[d].narrow(0, 0, st.carried)
                                                 : direction_rows(h_all, p, d).narrow(0, prev.row_begin, st.carried);
            mm_opmath(z.narrow(0, 0, st.carried), h_prev, w_t);
          }
          if (st.rows > st.carried) {
            mm_opmath(z.narrow(0, st.carried, st.rows - st.carried),
                      h_start[d].narrow(0, st.carried, st.rows - st.carried), w_t);
          }
          const int64_t off = st.row_begin * rs + d * p.H;
          launch_kernel(step_forward_kernel<scalar_t, kAct>, blocks_for(st.rows * p.H), kThreads, 0, stream,
              xw.data_ptr<scalar_t>() + off, z.data_ptr<acc_t>(), h_all.data_ptr<scalar_t>() + off,
              h_last.data_ptr<scalar_t>() + d * p.B * p.H,
              fp32_state ? state.data_ptr<acc_t>() + d * p.B * p.H : nullptr, st.rows, st.continuing, p.H, rs);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  });
}

void stepwise_backward(const RecurrenceProblem& p, const at::Tensor& w_hh, const at::Tensor& h_all,
                       const at::Tensor& dh_all, const at::Tensor& dh_last, at::Tensor& dz, at::Tensor& dh0,
                       const BackwardOptions& opts, at::Tensor& grad_norm) {
  const at::ScalarType acc_type = at::toOpMathType(h_all.scalar_type());
  at::Tensor g = at::empty({p.B, p.H}, h_all.options().dtype(acc_type));
  const bool fp32_state = acc_type != h_all.scalar_type();  // as in stepwise_forward: dz carried in fp32
  at::Tensor dz_state = fp32_state ? at::empty({p.D, p.B, p.H}, g.options()) : at::Tensor();
  const at::Tensor w = fp32_state ? w_hh.to(acc_type) : w_hh;
  const int64_t rs = p.D * p.H;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const std::vector<std::vector<Step>> schedules = schedules_of(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_all.scalar_type(), "rnn_fused_stepwise_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RNN_FUSED_ACTIVATION_SWITCH(p.activation, kAct, [&] {
      // Iteration u writes dz of visited step s = T-1-u (none when u == T) from G = dz_{s+1} W; rows of
      // step s+1 that do not continue into step s started there and take G as their dh0.
      for (int64_t u = 0; u <= p.T; ++u) {
        const int64_t s = p.T - 1 - u;
        for (int64_t d = 0; d < p.D; ++d) {
          const Step cur = s >= 0 ? schedules[d][s] : Step{0, 0, 0, 0, 0};
          const int64_t g_rows = u > 0 ? schedules[d][s + 1].rows : 0;
          if (g_rows > 0) {
            const at::Tensor dz_next = fp32_state ? dz_state[d].narrow(0, 0, g_rows)
                                                  : direction_rows(dz, p, d).narrow(0, schedules[d][s + 1].row_begin, g_rows);
            mm_opmath(g.narrow(0, 0, g_rows), dz_next, w[d]);
          }
          const int64_t n = std::max(cur.rows, g_rows) * p.H;
          if (n == 0) continue;
          const int64_t off = cur.row_begin * rs + d * p.H;
          const int64_t state = d * p.B * p.H;
          const scalar_t* h_ptr = h_all.data_ptr<scalar_t>() + off;
          const scalar_t* dh_ptr = dh_all.defined() ? dh_all.data_ptr<scalar_t>() + off : nullptr;
          const scalar_t* dh_last_ptr = dh_last.defined() ? dh_last.data_ptr<scalar_t>() + state : nullptr;
          acc_t* dz_state_ptr = fp32_state ? dz_state.data_ptr<acc_t>() + state : nullptr;
          if (!opts.active()) {
            launch_kernel(step_backward_kernel<scalar_t, kAct>, blocks_for(n), kThreads, 0, stream,
                h_ptr, dh_ptr, dh_last_ptr, g.data_ptr<acc_t>(), dz.data_ptr<scalar_t>() + off,
                dh0.data_ptr<scalar_t>() + state, dz_state_ptr, cur.rows, cur.continuing, g_rows, p.H, rs);
          } else {
            acc_t* norm_ptr = opts.record_norms ? grad_norm.data_ptr<acc_t>() + cur.row_begin * p.D + d : nullptr;
            launch_kernel(step_backward_options_kernel<scalar_t, kAct>, std::max(cur.rows, g_rows), kThreads, 0,
                stream, h_ptr, dh_ptr, dh_last_ptr, g.data_ptr<acc_t>(), dz.data_ptr<scalar_t>() + off,
                dh0.data_ptr<scalar_t>() + state, dz_state_ptr, cur.rows, cur.continuing, g_rows, p.H, rs, opts.clip_mode,
                opts.clip, norm_ptr, p.D);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  });
}

}  // namespace cuda
}  // namespace rnn_fused
