// One padded layer on the CPU without ATen ops (layer_cpu.h): why and what.
//
// At small sizes a layer is a few microseconds of arithmetic inside ~25 ATen ops per forward and backward
// (bias sum, addmm, views, the recurrence ops' checks and allocations, the weight gradient's mm / addmm_,
// two GEMMs, a sum, a clone), each ~1-3 us on one core (benchmarks/NOTES.md, "Per-call latency", fifth
// round). Here each is a BLAS call or a loop on buffers allocated once.
//
// Decomposition (rows = T * B, the time-major [T, B] rows of x and of h_all; directions side by side in a row):
//   forward : xw = x W_ih^T + (b_ih + b_hh)      one GEMM over all rows and directions (W_ih of two directions
//                                                 concatenated, [D*H, I], as layer_of_ops' at::cat)
//             h_all, h_last = recurrence(xw)      recurrence_forward_into (cpu/recurrence_cpu.h)
//   backward: dz, dh0 = BPTT(d_output, d_h_last)  recurrence_backward_into
//             dx = dz W_ih                         one GEMM, K = D*H
//             dW_ih = dz^T x                       one GEMM [D*H, I], a view per direction
//             dW_hh[d] = dz_first^T h0[d] + dz_rest^T h_prev   two GEMMs per direction (as recurrence_weight_grad)
//             db = sum over rows of dz             one pass (sum_rows); b_hh's gradient is a copy (two leaves, two
//                                                 buffers)
// Memory: the forward makes xw in the output's memory and runs the recurrence in place over it (no buffer
// besides the output); the backward's dz [rows, D*H] is leased from the thread's kept scratch
// (cpu/scratch_cpu.h), so a repeated call touches no fresh pages for it; W_ih's concatenation for D = 2.
#include "layer_cpu.h"

#include "blas.h"
#include "recurrence_cpu.h"
#include "scratch_cpu.h"

#include <ATen/EmptyTensor.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace rnn_fused {

namespace {

template <typename T>
DirectionWeights<T> recurrent_weights(const LayerWeights& w) {
  return {w.w_hh[0].data_ptr<T>(), w.w_hh.size() > 1 ? w.w_hh[1].data_ptr<T>() : nullptr};
}

// W_ih of every direction as one row-major [D*H, I] matrix: the tensor itself for one direction, else a
// concatenated copy in `scratch`.
template <typename T>
const T* input_weights(const LayerWeights& w, std::vector<T>& scratch) {
  if (w.w_ih.size() == 1) return w.w_ih[0].data_ptr<T>();
  const int64_t n = w.w_ih[0].numel();
  scratch.resize(n * w.w_ih.size());
  for (size_t d = 0; d < w.w_ih.size(); ++d) std::memcpy(scratch.data() + d * n, w.w_ih[d].data_ptr<T>(), n * sizeof(T));
  return scratch.data();
}

// A fresh CPU tensor, allocated without a dispatcher call (at::empty's costs ~0.3-0.5 us at T = 1, where
// a call makes ten).
template <typename T>
at::Tensor cpu_empty(at::IntArrayRef sizes) {
  return at::Tensor(at::detail::empty_cpu(sizes, c10::CppTypeToScalarType<T>::value));
}

// out[i] = sum over r < rows of m[r, i] (m row-major [rows, n]) in float64, by blocks of kBlock rows whose
// sums are then added: the rounding error grows as kBlock + rows / kBlock, not as rows, so a bias gradient
// over T * B = 10^5 rows is as accurate as ATen's cascade sum (the order differs, so the last bits may).
template <typename T>
void sum_rows(const T* m, int64_t rows, int64_t n, T* out) {
  constexpr int64_t kBlock = 64;
  std::vector<double> sums(2 * n, 0.0);  // the total, then one block's sum: one allocation
  double *total = sums.data(), *block = sums.data() + n;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    std::fill(block, block + n, 0.0);
    for (int64_t r = r0; r < std::min(r0 + kBlock, rows); ++r) {
      const T* mr = m + r * n;
      for (int64_t i = 0; i < n; ++i) block[i] += mr[i];
    }
    for (int64_t i = 0; i < n; ++i) total[i] += block[i];
  }
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(total[i]);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& h0, const LayerWeights& w,
                                           Activation activation, bool recording) {
  const int64_t T_ = x.size(0), B = x.size(1), I = x.size(2), D = h0.size(0), H = h0.size(2), DH = D * H,
                rows = T_ * B;
  // xw [T, B, D*H] is made in the output's memory and the recurrence runs in place over it.
  at::Tensor output = cpu_empty<T>({T_, B, DH});
  T* z = output.data_ptr<T>();
  const bool biases = !w.b_ih.empty();
  std::vector<T> bias;
  if (biases) {  // every row gets b_ih + b_hh, summed per direction as layer_of_ops sums them
    bias.resize(DH);
    for (int64_t d = 0; d < D; ++d) {
      const T *bi = w.b_ih[d].data_ptr<T>(), *bh = w.b_hh[d].data_ptr<T>();
      for (int64_t i = 0; i < H; ++i) bias[d * H + i] = bi[i] + bh[i];
    }
  }
  std::vector<T> scratch;
  gemm_rows<T>(x.data_ptr<T>(), I, input_weights<T>(w, scratch), /*transpose_m=*/true, z, DH, rows, DH, I, T(0),
               biases ? bias.data() : nullptr);
  at::Tensor h_last = cpu_empty<T>({D, B, H});
  recurrence_forward_into<T>(padded_problem(T_, B, D, H, activation), recurrent_weights<T>(w), z,
                             h0.data_ptr<T>(), z, h_last.data_ptr<T>(), /*reuse_packed=*/!recording);
  return {output, h_last};
}

// An incoming gradient as plain memory: undefined for none or a ZeroTensor (both mean zero), the negation
// and the copy made where the tensor is a lazy view (a neg-bit view, strides), itself otherwise.
at::Tensor readable(const at::Tensor& g) {
  if (!g.defined() || g._is_zerotensor()) return at::Tensor();
  return (g.is_neg() ? g.resolve_neg() : g).contiguous();
}

// The sizes of a layer call; a cell step is the layer of T = 1, D = 1 whose x [B, I] and h0 [B, H] have
// the layer's memory layout without the leading 1.
struct LayerSizes {
  int64_t T, B, I, D, H;
};

LayerSizes layer_sizes(const at::Tensor& x, const at::Tensor& h0) {
  return {x.size(0), x.size(1), x.size(2), h0.size(0), h0.size(2)};
}

LayerSizes cell_sizes(const at::Tensor& x, const at::Tensor& h) { return {1, x.size(0), x.size(1), 1, h.size(1)}; }

// g.x and g.h0 take the shapes of x and h0 (either form of LayerSizes).
template <typename T>
LayerGrads backward(const LayerSizes& n, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output,
                    const LayerWeights& w, Activation activation, const at::Tensor& d_output_in,
                    const at::Tensor& d_h_last_in, const LayerGradsWanted& wanted) {
  const int64_t T_ = n.T, B = n.B, I = n.I, D = n.D, H = n.H, DH = D * H, rows = T_ * B;
  const at::Tensor d_output = readable(d_output_in), d_h_last = readable(d_h_last_in);
  const ScratchLease dz_scratch(rows * DH * sizeof(T));  // [T, B, D*H]
  LayerGrads g;
  g.h0 = cpu_empty<T>(h0.sizes());
  T* dz = dz_scratch.as<T>();
  const T *xs = x.data_ptr<T>(), *h_all = output.data_ptr<T>(), *h0s = h0.data_ptr<T>();
  recurrence_backward_into<T>(padded_problem(T_, B, D, H, activation), recurrent_weights<T>(w), h_all, h0s,
                              d_output.defined() ? d_output.data_ptr<T>() : nullptr,
                              d_h_last.defined() ? d_h_last.data_ptr<T>() : nullptr, dz, g.h0.data_ptr<T>(),
                              BackwardOptions{}, nullptr);
  if (!wanted.h0) g.h0 = at::Tensor();
  if (wanted.x) {
    std::vector<T> scratch;
    g.x = cpu_empty<T>(x.sizes());
    gemm_rows<T>(dz, DH, input_weights<T>(w, scratch), /*transpose_m=*/false, g.x.data_ptr<T>(), I, rows, I, DH,
                 T(0));
  }
  if (wanted.w_ih) {
    at::Tensor dw = cpu_empty<T>({DH, I});
    gemm_transposed_a<T>(dz, DH, xs, I, dw.data_ptr<T>(), I, DH, I, rows, T(0));
    for (int64_t d = 0; d < D; ++d) g.w_ih.push_back(D == 1 ? dw : dw.narrow(0, d * H, H));
  }
  if (wanted.w_hh) {
    for (int64_t d = 0; d < D; ++d) {
      // Direction 0 starts at step 0 from h0 and reads h_{t-1} from the row before; direction 1 starts at
      // step T-1 and reads h_{t+1}.
      at::Tensor dw = cpu_empty<T>({H, H});
      T* out = dw.data_ptr<T>();
      const int64_t first = d == 0 ? 0 : T_ - 1;
      gemm_transposed_a<T>(dz + first * B * DH + d * H, DH, h0s + d * B * H, H, out, H, H, H, B, T(0));
      if (T_ > 1) {
        const int64_t inner = d == 0 ? 1 : 0, prev = d == 0 ? 0 : 1;
        gemm_transposed_a<T>(dz + inner * B * DH + d * H, DH, h_all + prev * B * DH + d * H, DH, out, H, H, H,
                             (T_ - 1) * B, T(1));
      }
      g.w_hh.push_back(dw);
    }
  }
  if (wanted.bias) {
    at::Tensor db = cpu_empty<T>({DH});
    sum_rows<T>(dz, rows, DH, db.data_ptr<T>());
    for (int64_t d = 0; d < D; ++d) {
      const at::Tensor db_d = D == 1 ? db : db.narrow(0, d * H, H);
      g.b_ih.push_back(db_d);
      at::Tensor copy = cpu_empty<T>({H});
      std::memcpy(copy.data_ptr<T>(), db_d.data_ptr<T>(), H * sizeof(T));
      g.b_hh.push_back(copy);
    }
  }
  return g;
}

}  // namespace

namespace {

// The one rule of what BLAS may read as it lies, for a layer of sizes n whose x and h0 have the shapes
// x_shape and h0_shape (the layer's [T, B, I] / [D, B, H], or the cell's [B, I] / [B, H]): every tensor on
// the CPU, float32 or float64 alike, contiguous, of exactly its shape, no size 0, rows (T * B), I and D * H
// within int (BLAS takes int), and the BLAS of torch's build exported (cpu/blas.h). Shapes too: a parameter
// reassigned with a wrong shape must reach the ATen ops, which raise for it, never a BLAS call that would
// read past it.
bool applies(const LayerSizes& n, const at::Tensor& x, at::IntArrayRef x_shape, const at::Tensor& h0,
             at::IntArrayRef h0_shape, const LayerWeights& w) {
  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  if (dtype == at::kFloat ? !blas_available(static_cast<float*>(nullptr)) : !blas_available(static_cast<double*>(nullptr)))
    return false;
  const int64_t int_max = std::numeric_limits<int>::max();
  if (n.T == 0 || n.B == 0 || n.I == 0 || n.H == 0 || n.I > int_max || n.T > int_max / n.B || n.D * n.H > int_max)
    return false;
  const auto usable = [&](const at::Tensor& t, at::IntArrayRef shape) {
    return t.is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.sizes() == shape;
  };
  if (n.D < 1 || n.D > 2 || !usable(x, x_shape) || !usable(h0, h0_shape)) return false;
  if (static_cast<int64_t>(w.w_ih.size()) != n.D || w.w_hh.size() != w.w_ih.size()) return false;
  if (w.b_ih.size() != w.b_hh.size() || (!w.b_ih.empty() && w.b_ih.size() != w.w_ih.size())) return false;
  for (int64_t d = 0; d < n.D; ++d) {
    if (!usable(w.w_ih[d], {n.H, n.I}) || !usable(w.w_hh[d], {n.H, n.H})) return false;
    if (!w.b_ih.empty() && (!usable(w.b_ih[d], {n.H}) || !usable(w.b_hh[d], {n.H}))) return false;
  }
  return true;
}

// The saved output as the forward made it (a saved-tensor hook may hand back other strides).
bool as_made(const at::Tensor& output, const at::Tensor& x, at::IntArrayRef shape) {
  return output.is_cpu() && output.scalar_type() == x.scalar_type() && output.is_contiguous() &&
         output.sizes() == shape;
}

}  // namespace

bool cpu_layer_applies(const at::Tensor& x, const at::Tensor& h0, const LayerWeights& w) {
  if (x.dim() != 3 || h0.dim() != 3) return false;
  const LayerSizes n = layer_sizes(x, h0);
  return applies(n, x, {n.T, n.B, n.I}, h0, {static_cast<int64_t>(w.w_ih.size()), n.B, n.H}, w);
}

bool cpu_layer_backward_applies(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output,
                                const LayerWeights& w) {
  return cpu_layer_applies(x, h0, w) && as_made(output, x, {x.size(0), x.size(1), h0.size(0) * h0.size(2)});
}

bool cpu_cell_applies(const at::Tensor& x, const at::Tensor& h, const LayerWeights& w) {
  if (x.dim() != 2 || h.dim() != 2) return false;
  const LayerSizes n = cell_sizes(x, h);
  return applies(n, x, {n.B, n.I}, h, {n.B, n.H}, w);
}

bool cpu_cell_backward_applies(const at::Tensor& x, const at::Tensor& h, const at::Tensor& h_next,
                               const LayerWeights& w) {
  return cpu_cell_applies(x, h, w) && as_made(h_next, x, h.sizes());
}

std::tuple<at::Tensor, at::Tensor> cpu_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                                     const LayerWeights& w, Activation activation, bool recording) {
  return x.scalar_type() == at::kFloat ? forward<float>(x, h0, w, activation, recording)
                                       : forward<double>(x, h0, w, activation, recording);
}

LayerGrads cpu_layer_backward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output,
                              const LayerWeights& w, Activation activation, const at::Tensor& d_output,
                              const at::Tensor& d_h_last, const LayerGradsWanted& wanted) {
  const LayerSizes n = layer_sizes(x, h0);
  return x.scalar_type() == at::kFloat
             ? backward<float>(n, x, h0, output, w, activation, d_output, d_h_last, wanted)
             : backward<double>(n, x, h0, output, w, activation, d_output, d_h_last, wanted);
}

LayerGrads cpu_cell_backward(const at::Tensor& x, const at::Tensor& h, const at::Tensor& h_next,
                             const LayerWeights& w, Activation activation, const at::Tensor& d_h_next,
                             const LayerGradsWanted& wanted) {
  const LayerSizes n = cell_sizes(x, h);
  return x.scalar_type() == at::kFloat
             ? backward<float>(n, x, h, h_next, w, activation, d_h_next, at::Tensor(), wanted)
             : backward<double>(n, x, h, h_next, w, activation, d_h_next, at::Tensor(), wanted);
}

}  // namespace rnn_fused
