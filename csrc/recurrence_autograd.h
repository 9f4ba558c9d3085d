// The recurrence's autograd pieces (csrc/recurrence_autograd.cpp), shared by its registered rule and the
// stack's fused layer node (csrc/rnn_stack.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <string>
#include <tuple>

namespace rnn_fused {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether t carries a forward-mode tangent (torch.autograd.forward_ad): the shortcuts that skip autograd
// when nothing requires grad must not skip it then, or the tangent would be dropped without a word.
inline bool carries_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

// recurrence_forward's kernel for the inputs' device, below autograd (nothing recorded).
std::tuple<at::Tensor, at::Tensor> recurrence_forward_kernel(const at::Tensor& xw, const at::Tensor& w_hh,
                                                             const at::Tensor& h0,
                                                             const c10::optional<at::Tensor>& batch_sizes,
                                                             c10::string_view activation, c10::string_view clip_mode,
                                                             double clip, const c10::optional<at::Tensor>& norm_probe);

// ctx's saved tensors; an in-place change of one (the output above all) raises saying what to write instead.
variable_list saved_variables(AutogradContext* ctx);

// The recurrence's gradients from what its forward saved (w_hh, h0, h_all) and the outputs' gradients
// (undefined = zero), under the backward options as the backward op takes them (csrc/ops.cpp): (dz = dxw,
// dW_hh (undefined unless need_w_hh), dh0, grad_norm (recorded norms, or undefined)). The kernels' BPTT, or the reference's differentiable one when the backward is recorded
// (create_graph=True).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrence_gradients(
    const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& h_all, const c10::optional<at::Tensor>& batch_sizes,
    const std::string& activation, c10::string_view clip_mode, double clip, bool record_norms,
    const at::Tensor& grad_h_all,
    const at::Tensor& grad_h_last, bool need_w_hh);

}  // namespace rnn_fused
