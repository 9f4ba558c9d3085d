// Shared by the CUDA kernel families of csrc/cuda/: the activation switch, the device activations, the
// per-step schedule as the kernels read it, and the host entry points of each family.
//
// Layouts are those of csrc/ops.cpp: rows of xw / h_all / dz are [N, D, H] (padded [T, B, D, H] is the
// case N = T*B), so direction d's slice of row n starts at n * D*H + d*H; w_hh [D, H, H]; h0 / h_last /
// dh0 / dh_last [D, B, H]. Row offsets are int64 (N*D*H may exceed 2^31); offsets inside one row or one
// shared-memory buffer are int.
#pragma once

#include "../recurrence_args.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <string>

namespace rnn_fused {
namespace cuda {

// Turns the runtime activation into the compile-time constant CONST_NAME for the lambda (flash-attention's
// BOOL_SWITCH, for our one two-valued flag).
#define RNN_FUSED_ACTIVATION_SWITCH(ACT, CONST_NAME, ...)                    \
  [&] {                                                                      \
    if ((ACT) == ::rnn_fused::Activation::Tanh) {                            \
      constexpr ::rnn_fused::Activation CONST_NAME = ::rnn_fused::Activation::Tanh; \
      return __VA_ARGS__();                                                  \
    } else {                                                                 \
      constexpr ::rnn_fused::Activation CONST_NAME = ::rnn_fused::Activation::Relu; \
      return __VA_ARGS__();                                                  \
    }                                                                        \
  }()

template <Activation kAct, typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t z) {
  if constexpr (kAct == Activation::Tanh) {
    return tanh(z);
  } else {
    return z < acc_t(0) ? acc_t(0) : z;  // NaN stays NaN, as torch.relu and the CPU backend
  }
}

// act'(z) written in terms of h = act(z): the backward needs only h_all.
template <Activation kAct, typename acc_t>
__device__ __forceinline__ acc_t activation_grad(acc_t h) {
  if constexpr (kAct == Activation::Tanh) {
    return acc_t(1) - h * h;
  } else {
    return h <= acc_t(0) ? acc_t(0) : acc_t(1);  // NaN -> 1, as torch's relu backward
  }
}

// g * act'(z), given ag = activation_grad(h): for relu a select, as torch's relu backward, so that an inf or
// NaN g at a unit that is off gives 0 (a product would give inf * 0 = NaN).
template <Activation kAct, typename acc_t>
__device__ __forceinline__ acc_t times_activation_grad(acc_t g, acc_t ag) {
  if constexpr (kAct == Activation::Tanh) {
    return g * ag;
  } else {
    return ag == acc_t(0) ? acc_t(0) : g;
  }
}

// One visited step of one direction (the `Step` of recurrence_args.h without its time, which row_begin
// already encodes). Packed input: the host schedule, uploaded once per call as int64 [D, T, 4] =
// {rows, row_begin, carried, continuing}. Padded input: computed here, so no table is uploaded.
struct StepRows {
  int64_t row_begin;
  int rows, carried, continuing;
};
constexpr int kStepFields = 4;

__device__ __forceinline__ StepRows load_step(const int64_t* steps, int64_t T, int B, int d, int64_t s) {
  if (steps != nullptr) {
    const int64_t* e = steps + (d * T + s) * kStepFields;
    return StepRows{e[1], static_cast<int>(e[0]), static_cast<int>(e[2]), static_cast<int>(e[3])};
  }
  const int64_t t = d == 0 ? s : T - 1 - s;
  return StepRows{t * B, B, s == 0 ? 0 : B, s == T - 1 ? 0 : B};
}

// ---- host entry points ------------------------------------------------------------------------------------

// Launch configuration of the persistent kernels (recurrence_persistent.cu), or why they cannot run.
struct PersistentPlan {
  bool ok = false;
  std::string why_not;  // set when !ok
  int rows_per_cta = 0;  // R: output units (forward: rows of W_hh; backward: columns) per CTA, multiple of 4
  int ctas_out = 0;      // CTAs per direction along H (= ceil(H / R))
  int ctas_batch = 0;    // CTAs per direction along the batch
  int batch_per_cta = 0; // batch rows owned by one CTA (multiple of 2)
  int stage_rows = 0;    // batch rows of h (dz) staged in shared memory at a time
  int blocks = 0;        // D * ctas_out * ctas_batch
  size_t smem = 0;       // dynamic shared memory per CTA, bytes
};

PersistentPlan plan_persistent(const RecurrenceProblem& p, at::ScalarType dtype, bool backward);

void persistent_forward(const PersistentPlan& plan, const RecurrenceProblem& p, const at::Tensor& xw,
                        const at::Tensor& w_hh, const at::Tensor& h0, at::Tensor& h_all, at::Tensor& h_last);

// dh_all / dh_last: undefined when absent.
void persistent_backward(const PersistentPlan& plan, const RecurrenceProblem& p, const at::Tensor& w_hh,
                         const at::Tensor& h_all, const at::Tensor& dh_all, const at::Tensor& dh_last,
                         at::Tensor& dz, at::Tensor& dh0);

void stepwise_forward(const RecurrenceProblem& p, const at::Tensor& xw, const at::Tensor& w_hh,
                      const at::Tensor& h0, at::Tensor& h_all, at::Tensor& h_last);

// opts: clipping and recorded norms (csrc/ops.cpp); grad_norm [N, D] in the opmath dtype when recording.
void stepwise_backward(const RecurrenceProblem& p, const at::Tensor& w_hh, const at::Tensor& h_all,
                       const at::Tensor& dh_all, const at::Tensor& dh_last, at::Tensor& dz, at::Tensor& dh0,
                       const BackwardOptions& opts, at::Tensor& grad_norm);

}  // namespace cuda
}  // namespace rnn_fused
