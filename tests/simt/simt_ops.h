// The SIMT harness's entry points (simt_ops.cpp): the CUDA backend's host wrappers and kernels, run on CPU
// tensors under the emulation of simt_cpu.h. Registered as torch.ops.rnn_fused_simt.* for Python
// (tests/simt/cases.py) and called directly by the ThreadSanitizer driver (tsan_main.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <vector>

namespace rnn_fused_simt {

// The fake device every later launch plans against and runs on.
void configure(int64_t sms, int64_t smem_optin);

// The persistent kernels' launch plan for this problem on the fake device:
// [ok, rows_per_cta, ctas_out, ctas_batch, batch_per_cta, stage_rows, blocks, smem].
std::vector<int64_t> plan(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                          const c10::optional<at::Tensor>& batch_sizes, c10::string_view activation, bool backward);

// recurrence_forward / recurrence_backward of csrc/ops.cpp on `kernel` ("persistent" or "stepwise"; forcing
// persistent where its plan refuses raises with the plan's reason). Outputs start as NaN.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                                           const c10::optional<at::Tensor>& batch_sizes,
                                           c10::string_view activation, c10::string_view kernel);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& w_hh, const at::Tensor& h_all, const at::Tensor& h0, const c10::optional<at::Tensor>& dh_all,
    const c10::optional<at::Tensor>& dh_last, const c10::optional<at::Tensor>& batch_sizes,
    c10::string_view activation, c10::string_view kernel, c10::string_view clip_mode, double clip,
    bool record_norms);

}  // namespace rnn_fused_simt
