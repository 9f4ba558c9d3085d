// The SIMT harness's ops: what csrc/cuda/recurrence_cuda.cu does around the kernels (the real argument checks
// of csrc/recurrence_args.cpp, contiguous inputs, the plan, the host entry points), with three differences
// for testing: the tensors are CPU tensors (device memory is host memory under simt_cpu.h), the kernel
// family is named by the caller instead of chosen, and every output starts as NaN so an element the
// kernels never write shows.
#include "simt_ops.h"

#include "../../csrc/cuda/recurrence_cuda.cuh"
#include "simt_cpu.h"

#include <torch/library.h>

#include <limits>

namespace rnn_fused_simt {
namespace {

using rnn_fused::RecurrenceProblem;
using rnn_fused::cuda::PersistentPlan;

bool persistent_named(c10::string_view kernel) {
  TORCH_CHECK(kernel == "persistent" || kernel == "stepwise",
              "rnn_fused_simt: kernel must be 'persistent' or 'stepwise', got '", std::string(kernel), "'");
  return kernel == "persistent";
}

at::Tensor nan_like(const at::Tensor& t) {
  return at::full_like(t, std::numeric_limits<double>::quiet_NaN(), at::MemoryFormat::Contiguous);
}

PersistentPlan planned(const RecurrenceProblem& p, at::ScalarType dtype, bool backward) {
  const PersistentPlan plan = rnn_fused::cuda::plan_persistent(p, dtype, backward);
  TORCH_CHECK(plan.ok, "rnn_fused_simt: the persistent kernel cannot run this problem: ", plan.why_not);
  return plan;
}

void check_nonempty(const RecurrenceProblem& p) {
  TORCH_CHECK(p.T > 0 && p.B > 0 && p.H > 0, "rnn_fused_simt: empty problems never reach the kernels");
}

}  // namespace

void configure(int64_t sms, int64_t smem_optin) {
  ::simt::configure(static_cast<int>(sms), static_cast<int>(smem_optin));
}

std::vector<int64_t> plan(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                          const c10::optional<at::Tensor>& batch_sizes, c10::string_view activation, bool backward) {
  const RecurrenceProblem p = rnn_fused::check_forward_args(xw, w_hh, h0, batch_sizes, activation);
  const PersistentPlan pl = rnn_fused::cuda::plan_persistent(p, xw.scalar_type(), backward);
  return {pl.ok, pl.rows_per_cta, pl.ctas_out, pl.ctas_batch, pl.batch_per_cta, pl.stage_rows, pl.blocks,
          static_cast<int64_t>(pl.smem)};
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& xw_in, const at::Tensor& w_hh_in, const at::Tensor& h0_in,
                                           const c10::optional<at::Tensor>& batch_sizes,
                                           c10::string_view activation, c10::string_view kernel) {
  const RecurrenceProblem p = rnn_fused::check_forward_args(xw_in, w_hh_in, h0_in, batch_sizes, activation);
  check_nonempty(p);
  const at::Tensor xw = xw_in.contiguous(), w_hh = w_hh_in.contiguous(), h0 = h0_in.contiguous();
  at::Tensor h_all = nan_like(xw), h_last = nan_like(h0);
  if (persistent_named(kernel)) {
    rnn_fused::cuda::persistent_forward(planned(p, xw.scalar_type(), false), p, xw, w_hh, h0, h_all, h_last);
  } else {
    rnn_fused::cuda::stepwise_forward(p, xw, w_hh, h0, h_all, h_last);
  }
  return {h_all, h_last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& w_hh_in, const at::Tensor& h_all_in, const at::Tensor& h0_in,
    const c10::optional<at::Tensor>& dh_all_in, const c10::optional<at::Tensor>& dh_last_in,
    const c10::optional<at::Tensor>& batch_sizes, c10::string_view activation, c10::string_view kernel,
    c10::string_view clip_mode, double clip, bool record_norms) {
  const RecurrenceProblem p =
      rnn_fused::check_backward_args(w_hh_in, h_all_in, h0_in, dh_all_in, dh_last_in, batch_sizes, activation);
  const rnn_fused::BackwardOptions opts = rnn_fused::check_backward_options(clip_mode, clip, record_norms);
  check_nonempty(p);
  const at::Tensor w_hh = w_hh_in.contiguous(), h_all = h_all_in.contiguous();
  const at::Tensor dh_all = dh_all_in.has_value() ? dh_all_in->contiguous() : at::Tensor();
  const at::Tensor dh_last = dh_last_in.has_value() ? dh_last_in->contiguous() : at::Tensor();
  at::Tensor dz = nan_like(h_all), dh0 = nan_like(h0_in);
  at::Tensor grad_norm = rnn_fused::grad_norm_output(h_all, record_norms);
  if (record_norms) grad_norm.fill_(std::numeric_limits<double>::quiet_NaN());
  if (persistent_named(kernel)) {
    TORCH_CHECK(!opts.active(), "rnn_fused_simt: the persistent backward does not implement backward options");
    rnn_fused::cuda::persistent_backward(planned(p, h_all.scalar_type(), true), p, w_hh, h_all, dh_all, dh_last,
                                         dz, dh0);
  } else {
    rnn_fused::cuda::stepwise_backward(p, w_hh, h_all, dh_all, dh_last, dz, dh0, opts, grad_norm);
  }
  return {dz, dh0, grad_norm};
}

TORCH_LIBRARY(rnn_fused_simt, m) {
  m.def("configure(int sms, int smem_optin) -> ()", &configure);
  m.def("plan(Tensor xw, Tensor w_hh, Tensor h0, Tensor? batch_sizes, str activation, bool backward) -> int[]",
        &plan);
  m.def("recurrence_forward(Tensor xw, Tensor w_hh, Tensor h0, Tensor? batch_sizes, str activation, str kernel) "
        "-> (Tensor h_all, Tensor h_last)",
        &forward);
  m.def("recurrence_backward(Tensor w_hh, Tensor h_all, Tensor h0, Tensor? dh_all, Tensor? dh_last, "
        "Tensor? batch_sizes, str activation, str kernel, str clip_mode=\"none\", float clip=0., "
        "bool record_norms=False) -> (Tensor dz, Tensor dh0, Tensor grad_norm)",
        &backward);
}

}  // namespace rnn_fused_simt
