// CUDA implementations of the op boundary (schemas in csrc/ops.cpp): argument checks, outputs, and the
// host-side choice between the two kernel families:
//   persistent (recurrence_persistent.cu): one cooperative launch for all T steps, W_hh on chip; taken
//     whenever plan_persistent finds a layout whose W_hh slice and buffers fit in a CTA's shared memory
//     and whose CTAs can all be co-resident (cudaOccupancyMaxActiveBlocksPerMultiprocessor);
//   stepwise (recurrence_stepwise.cu): cuBLAS + a fused pointwise kernel per step, for every other size,
//     and for every backward with options (clipping, recorded norms), which the persistent kernel lacks.
// RNN_FUSED_CUDA_KERNEL=persistent|stepwise overrides the choice (tests and benchmarks use it to reach
// both paths; forcing persistent where it cannot run is an error that says why).
#include "recurrence_cuda.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

namespace rnn_fused {
namespace cuda {
namespace {

enum class KernelChoice { Auto, Persistent, Stepwise };

KernelChoice kernel_choice() {
  const char* v = std::getenv("RNN_FUSED_CUDA_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return KernelChoice::Auto;
  if (std::strcmp(v, "persistent") == 0) return KernelChoice::Persistent;
  if (std::strcmp(v, "stepwise") == 0) return KernelChoice::Stepwise;
  TORCH_CHECK(false, "rnn_fused: RNN_FUSED_CUDA_KERNEL must be auto, persistent or stepwise, got '", v, "'");
}

// backward_options: the backward was asked to clip or record norms, which only the stepwise kernels do.
PersistentPlan choose(const RecurrenceProblem& p, at::ScalarType dtype, bool backward, bool backward_options = false) {
  const KernelChoice choice = kernel_choice();
  if (choice == KernelChoice::Stepwise) return PersistentPlan{};
  PersistentPlan plan;
  if (backward_options) {
    plan.why_not = "the persistent backward does not implement clipping or recorded gradient norms";
  } else {
    plan = plan_persistent(p, dtype, backward);
  }
  TORCH_CHECK(plan.ok || choice != KernelChoice::Persistent,
              "rnn_fused: RNN_FUSED_CUDA_KERNEL=persistent, but the persistent kernel cannot run this problem (T=",
              p.T, ", B=", p.B, ", D=", p.D, ", H=", p.H, ", ", dtype, "): ", plan.why_not);
  return plan;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rnn_fused: ", name, " must be a CUDA tensor, got one on ", t.device());
}

std::tuple<at::Tensor, at::Tensor> recurrence_forward_cuda(const at::Tensor& xw_in, const at::Tensor& w_hh_in,
                                                           const at::Tensor& h0_in,
                                                           const c10::optional<at::Tensor>& batch_sizes,
                                                           c10::string_view activation, c10::string_view clip_mode,
                                                           double clip, const c10::optional<at::Tensor>& norm_probe) {
  const RecurrenceProblem p = check_forward_args(xw_in, w_hh_in, h0_in, batch_sizes, activation);
  check_forward_options(xw_in, clip_mode, clip, norm_probe);  // the backward's; the forward is the same
  check_cuda(w_hh_in, "w_hh");
  const c10::cuda::CUDAGuard guard(w_hh_in.device());
  const at::Tensor xw = xw_in.contiguous(), w_hh = w_hh_in.contiguous(), h0 = h0_in.contiguous();
  at::Tensor h_all = at::empty_like(xw, at::MemoryFormat::Contiguous);
  if (p.empty()) return {h_all, h0.clone()};  // each sequence stays at h0
  at::Tensor h_last = at::empty_like(h0);  // every row ends at some step, so every row is written
  const PersistentPlan plan = choose(p, xw.scalar_type(), /*backward=*/false);
  if (plan.ok) {
    persistent_forward(plan, p, xw, w_hh, h0, h_all, h_last);
  } else {
    stepwise_forward(p, xw, w_hh, h0, h_all, h_last);
  }
  return {h_all, h_last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrence_backward_cuda(
    const at::Tensor& w_hh_in, const at::Tensor& h_all_in, const at::Tensor& h0_in,
    const c10::optional<at::Tensor>& dh_all_in, const c10::optional<at::Tensor>& dh_last_in,
    const c10::optional<at::Tensor>& batch_sizes, c10::string_view activation, c10::string_view clip_mode,
    double clip, bool record_norms) {
  const RecurrenceProblem p =
      check_backward_args(w_hh_in, h_all_in, h0_in, dh_all_in, dh_last_in, batch_sizes, activation);
  const BackwardOptions opts = check_backward_options(clip_mode, clip, record_norms);
  check_cuda(w_hh_in, "w_hh");
  const c10::cuda::CUDAGuard guard(w_hh_in.device());
  const at::Tensor w_hh = w_hh_in.contiguous(), h_all = h_all_in.contiguous();
  const at::Tensor dh_all = dh_all_in.has_value() ? dh_all_in->contiguous() : at::Tensor();
  const at::Tensor dh_last = dh_last_in.has_value() ? dh_last_in->contiguous() : at::Tensor();
  at::Tensor dz = at::empty_like(h_all, at::MemoryFormat::Contiguous);
  at::Tensor grad_norm = grad_norm_output(h_all, record_norms);
  if (p.empty()) {
    // No step: the gradient of h_last (= h0) passes straight to h0; a row of H = 0 has norm 0.
    if (record_norms) grad_norm.zero_();
    return {dz, dh_last.defined() ? dh_last.clone() : at::zeros_like(h0_in, at::MemoryFormat::Contiguous),
            grad_norm};
  }
  at::Tensor dh0 = at::empty_like(h0_in, at::MemoryFormat::Contiguous);  // every row starts at some step
  const PersistentPlan plan = choose(p, h_all.scalar_type(), /*backward=*/true, opts.active());
  if (plan.ok) {
    persistent_backward(plan, p, w_hh, h_all, dh_all, dh_last, dz, dh0);
  } else {
    stepwise_backward(p, w_hh, h_all, dh_all, dh_last, dz, dh0, opts, grad_norm);
  }
  return {dz, dh0, grad_norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_fused, CUDA, m) {
  m.impl("recurrence_forward", &recurrence_forward_cuda);
  m.impl("recurrence_backward", &recurrence_backward_cuda);
}

}  // namespace cuda
}  // namespace rnn_fused
