// Argument checks and step schedule shared by every C++/CUDA backend of the op boundary.
//
// Shape letters, used in every comment of csrc/:
//   T  time steps, B  batch (= h0.size(1)), D  directions (1 or 2), H  hidden size,
//   N  rows of a packed sequence (= sum(batch_sizes)); padded input is the case batch_sizes = [B] * T.
//
// Direction d runs forward in time for d == 0 and backward in time for d == 1 (the reverse half of a
// bidirectional layer). With variable lengths each reverse sequence starts at its own last step.
#pragma once

#include <torch/types.h>

#include <string>
#include <vector>

namespace rnn_fused {

enum class Activation { Tanh, Relu };

Activation parse_activation(c10::string_view activation);

// What the backward may do to g_t = dL/dh_t (the output's gradient plus the one carried back from step
// t+1) before it becomes dz_t = g_t * act'(z_t) (for relu a select); the semantics are stated once, in
// csrc/ops.cpp.
enum class ClipMode { None, Value, Norm };

struct BackwardOptions {
  ClipMode clip_mode = ClipMode::None;
  double clip = 0;            // > 0 when clip_mode != None
  bool record_norms = false;  // write ||g_t[row]|| (before clipping) to grad_norm

  // Whether the backward has anything to do besides plain BPTT.
  bool active() const { return clip_mode != ClipMode::None || record_norms; }
};

// Checks the backward op's clip_mode / clip / record_norms arguments.
BackwardOptions check_backward_options(c10::string_view clip_mode, double clip, bool record_norms);

// Checks the forward op's backward options (csrc/ops.cpp): clip_mode / clip, and norm_probe shaped like the
// grad_norm the backward will record for xw.
BackwardOptions check_forward_options(const at::Tensor& xw, c10::string_view clip_mode, double clip,
                                      const c10::optional<at::Tensor>& norm_probe);

// The backward's third output: ||g_t[row]|| per row and direction, h_all's shape without H ([T, B, D]
// padded, [N, D] packed) in the accumulation dtype (float32 for half types); empty when not recording.
at::Tensor grad_norm_output(const at::Tensor& h_all, bool record_norms);

// One step of one direction, in the order the direction visits time.
//   rows      : sequences alive at this step (batch rows [0, rows))
//   row_begin : index of the step's first row in the flat [N, D, H] layout
//   carried   : rows [0, carried) take h_{prev} from the previous visited step; rows [carried, rows)
//               start here and take h0 (only the reverse direction of a packed batch has such rows
//               after its first step)
//   continuing: rows [0, continuing) live on into the next visited step; rows [continuing, rows) end
//               here (their final state is h_last)
struct Step {
  int64_t time;
  int64_t rows;
  int64_t row_begin;
  int64_t carried;
  int64_t continuing;
};

struct RecurrenceProblem {
  int64_t T = 0, B = 0, D = 0, H = 0, N = 0;
  bool packed = false;
  Activation activation = Activation::Tanh;
  // [T], host copy, and its exclusive prefix sum; both left empty when the problem is empty() (padded
  // input may claim 2^40 steps of zero elements), which every kernel returns early on.
  std::vector<int64_t> batch_sizes;
  std::vector<int64_t> row_begin;

  // No work: T, B or H is 0.
  bool empty() const;
  // The steps of direction `direction`, in visiting order (forward in time for 0, backward for 1); not for
  // an empty() problem.
  std::vector<Step> schedule(int64_t direction) const;
};

// The problem of a padded call that has work (T, B, H > 0): T steps of all B rows in each of D directions.
// Checks nothing: check_forward_args builds padded problems with it after its checks, and the eager layer
// node's CPU path (cpu/layer_cpu.cpp) for shapes it built itself.
RecurrenceProblem padded_problem(int64_t T, int64_t B, int64_t D, int64_t H, Activation activation);

// Checks the forward op's arguments (names, ranks, sizes, dtypes, devices) and builds the problem.
RecurrenceProblem check_forward_args(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
    const c10::optional<at::Tensor>& batch_sizes, c10::string_view activation);

// Checks the backward op's arguments; the problem is that of the forward call that produced h_all.
RecurrenceProblem check_backward_args(
    const at::Tensor& w_hh, const at::Tensor& h_all, const at::Tensor& h0,
    const c10::optional<at::Tensor>& dh_all, const c10::optional<at::Tensor>& dh_last,
    const c10::optional<at::Tensor>& batch_sizes, c10::string_view activation);

}  // namespace rnn_fused
