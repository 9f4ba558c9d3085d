// The op contract's C++ half, shared by every C++/CUDA backend: argument checks with their messages, the
// backward options, and the step schedule (declared in recurrence_args.h; the ops' semantics are stated in
// csrc/ops.cpp). Kept apart from the registrations so that the SIMT test harness (tests/simt/) links this
// real code instead of a copy.
#include "recurrence_args.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <c10/util/safe_numerics.h>

namespace rnn_fused {

Activation parse_activation(c10::string_view activation) {
  if (activation == "tanh") return Activation::Tanh;
  if (activation == "relu") return Activation::Relu;
  TORCH_CHECK(false, "rnn_fused: activation must be 'tanh' or 'relu', got '", std::string(activation), "'");
}

RecurrenceProblem padded_problem(int64_t T, int64_t B, int64_t D, int64_t H, Activation activation) {
  RecurrenceProblem p;
  p.T = T;
  p.B = B;
  p.D = D;
  p.H = H;
  p.N = T * B;
  p.activation = activation;
  p.batch_sizes.assign(T, B);
  p.row_begin.resize(T);
  for (int64_t t = 0; t < T; ++t) p.row_begin[t] = t * B;
  return p;
}

bool RecurrenceProblem::empty() const { return T == 0 || B == 0 || H == 0; }

std::vector<Step> RecurrenceProblem::schedule(int64_t direction) const {
  TORCH_INTERNAL_ASSERT(!empty(), "rnn_fused: schedule() of a problem with no work (return early instead)");
  std::vector<Step> steps(T);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = direction == 0 ? s : T - 1 - s;
    const int64_t rows = batch_sizes[t];
    const int64_t prev_rows = s == 0 ? 0 : batch_sizes[direction == 0 ? t - 1 : t + 1];
    const int64_t next_rows = s == T - 1 ? 0 : batch_sizes[direction == 0 ? t + 1 : t - 1];
    steps[s] = Step{t, rows, row_begin[t], std::min(rows, prev_rows), std::min(rows, next_rows)};
  }
  return steps;
}

namespace {

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.defined(), "rnn_fused: ", name, " must be a tensor, got None");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "rnn_fused: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "rnn_fused: ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* letters) {
  TORCH_CHECK(t.sizes() == expected, "rnn_fused: ", name, " must have shape ", letters, " = ", expected,
              ", got ", shape_str(t));
}

// The kernels pass a step's rows (at most B) and a row's length D * H to BLAS and to kernel launches as int
// (contract.py check_index_range mirrors this). A problem with no work never reaches them.
void check_index_range(const RecurrenceProblem& p) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(p.empty() || (p.B <= kIntMax && p.D * p.H <= kIntMax), "rnn_fused: B (", p.B, ") and D * H (",
              p.D * p.H, ") must each be at most 2^31 - 1 = ", kIntMax,
              ": the kernels pass them to BLAS and kernel launches as int");
}

RecurrenceProblem check_common(const at::Tensor& xw_like, const char* xw_name, const at::Tensor& w_hh,
                               const at::Tensor& h0, const c10::optional<at::Tensor>& batch_sizes,
                               c10::string_view activation) {
  RecurrenceProblem p;
  p.activation = parse_activation(activation);
  TORCH_CHECK(w_hh.defined(), "rnn_fused: w_hh must be a tensor, got None");
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(1) == w_hh.size(2) && (w_hh.size(0) == 1 || w_hh.size(0) == 2),
              "rnn_fused: w_hh must have shape [D, H, H] with D in {1, 2}, got ", shape_str(w_hh));
  p.D = w_hh.size(0);
  p.H = w_hh.size(1);
  TORCH_CHECK(at::isFloatingType(w_hh.scalar_type()), "rnn_fused: w_hh must be floating point, got ",
              w_hh.scalar_type());
  check_like(xw_like, xw_name, w_hh, "w_hh");
  check_like(h0, "h0", w_hh, "w_hh");
  TORCH_CHECK(h0.dim() == 3, "rnn_fused: h0 must have shape [D, B, H], got ", shape_str(h0));
  // B is the input's batch size where the input has one (padded), so a wrong h0 is reported as h0's error.
  p.B = !batch_sizes.has_value() && xw_like.dim() == 4 ? xw_like.size(1) : h0.size(1);
  check_shape(h0, "h0", {p.D, p.B, p.H}, "[D, B, H]");

  p.packed = batch_sizes.has_value();
  if (!p.packed) {
    TORCH_CHECK(xw_like.dim() == 4, "rnn_fused: ", xw_name, " must have shape [T, B, D, H] (padded) when "
                "batch_sizes is None, got ", shape_str(xw_like));
    p.T = xw_like.size(0);
    check_shape(xw_like, xw_name, {p.T, p.B, p.D, p.H}, "[T, B, D, H]");
    if (p.empty()) {
      // No work, and no T-long step table: a zero-element xw may claim T = 2^40 steps (of H = 0 units).
      TORCH_CHECK(!c10::mul_overflows(p.T, p.B, &p.N), "rnn_fused: T * B overflows int64 (T = ", p.T,
                  ", B = ", p.B, ")");
      return p;
    }
    // Not empty: T * B * D * H elements exist, so no row index overflows.
    RecurrenceProblem padded = padded_problem(p.T, p.B, p.D, p.H, p.activation);
    check_index_range(padded);
    return padded;
  } else {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "rnn_fused: batch_sizes must be a 1-D int64 CPU tensor [T] (as in PackedSequence), got ",
                bs.scalar_type(), " ", shape_str(bs), " on ", bs.device());
    p.T = bs.size(0);
    const at::Tensor bs_c = bs.contiguous();
    const int64_t* v = bs_c.data_ptr<int64_t>();
    p.batch_sizes.assign(v, v + p.T);
    for (int64_t t = 0; t < p.T; ++t) {
      TORCH_CHECK(p.batch_sizes[t] > 0 && p.batch_sizes[t] <= (t == 0 ? p.B : p.batch_sizes[t - 1]),
                  "rnn_fused: batch_sizes must be positive and non-increasing with batch_sizes[0] == B (",
                  p.B, "); got ", p.batch_sizes[t], " at step ", t);
    }
    TORCH_CHECK(p.T == 0 || p.batch_sizes[0] == p.B, "rnn_fused: batch_sizes[0] (",
                p.T ? p.batch_sizes[0] : 0, ") must equal the batch size of h0 (", p.B, ")");
    TORCH_CHECK(xw_like.dim() == 3, "rnn_fused: ", xw_name, " must have shape [N, D, H] (packed) when "
                "batch_sizes is given, got ", shape_str(xw_like));
  }
  p.row_begin.resize(p.T);
  int64_t n = 0;
  for (int64_t t = 0; t < p.T; ++t) {
    p.row_begin[t] = n;
    TORCH_CHECK(p.batch_sizes[t] <= std::numeric_limits<int64_t>::max() - n,
                "rnn_fused: sum(batch_sizes) overflows int64 at step ", t, " (batch_sizes[", t, "] = ",
                p.batch_sizes[t], ")");
    n += p.batch_sizes[t];
  }
  p.N = n;
  if (p.packed) check_shape(xw_like, xw_name, {p.N, p.D, p.H}, "[N = sum(batch_sizes), D, H]");
  check_index_range(p);
  return p;
}

}  // namespace

BackwardOptions check_backward_options(c10::string_view clip_mode, double clip, bool record_norms) {
  BackwardOptions o;
  o.record_norms = record_norms;
  if (clip_mode == "none") return o;
  if (clip_mode == "value") {
    o.clip_mode = ClipMode::Value;
  } else if (clip_mode == "norm") {
    o.clip_mode = ClipMode::Norm;
  } else {
    TORCH_CHECK(false, "rnn_fused: clip_mode must be 'none', 'value' or 'norm', got '", std::string(clip_mode), "'");
  }
  TORCH_CHECK(std::isfinite(clip) && clip > 0, "rnn_fused: clip must be a positive finite number when clip_mode is '",
              std::string(clip_mode), "', got ", clip);
  o.clip = clip;
  return o;
}

BackwardOptions check_forward_options(const at::Tensor& xw, c10::string_view clip_mode, double clip,
                                      const c10::optional<at::Tensor>& norm_probe) {
  const BackwardOptions o = check_backward_options(clip_mode, clip, norm_probe.has_value());
  if (norm_probe.has_value()) {
    const at::Tensor& probe = *norm_probe;
    const auto dtype = xw.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(probe.defined() && probe.sizes() == xw.sizes().slice(0, xw.dim() - 1) &&
                    probe.scalar_type() == dtype && probe.device() == xw.device(),
                "rnn_fused: norm_probe must be a ", dtype, " tensor of shape ", xw.sizes().slice(0, xw.dim() - 1),
                " (xw's shape without H) on ", xw.device(), ", got ",
                probe.defined() ? c10::str(probe.scalar_type(), " ", probe.sizes(), " on ", probe.device())
                                : std::string("None"));
  }
  return o;
}

at::Tensor grad_norm_output(const at::Tensor& h_all, bool record_norms) {
  const auto dtype = h_all.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = h_all.options().dtype(dtype);
  if (!record_norms) return at::empty({0}, options);
  return at::empty(h_all.sizes().slice(0, h_all.dim() - 1), options);
}

RecurrenceProblem check_forward_args(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                                     const c10::optional<at::Tensor>& batch_sizes,
                                     c10::string_view activation) {
  return check_common(xw, "xw", w_hh, h0, batch_sizes, activation);
}

RecurrenceProblem check_backward_args(const at::Tensor& w_hh, const at::Tensor& h_all, const at::Tensor& h0,
                                      const c10::optional<at::Tensor>& dh_all,
                                      const c10::optional<at::Tensor>& dh_last,
                                      const c10::optional<at::Tensor>& batch_sizes,
                                      c10::string_view activation) {
  RecurrenceProblem p = check_common(h_all, "h_all", w_hh, h0, batch_sizes, activation);
  if (dh_all.has_value()) {
    check_like(*dh_all, "dh_all", w_hh, "w_hh");
    TORCH_CHECK(dh_all->sizes() == h_all.sizes(), "rnn_fused: dh_all must have the shape of h_all (",
                shape_str(h_all), "), got ", shape_str(*dh_all));
  }
  if (dh_last.has_value()) {
    check_like(*dh_last, "dh_last", w_hh, "w_hh");
    check_shape(*dh_last, "dh_last", {p.D, p.B, p.H}, "[D, B, H]");
  }
  return p;
}

}  // namespace rnn_fused
