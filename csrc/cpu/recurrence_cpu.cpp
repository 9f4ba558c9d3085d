// CPU kernels of the op boundary (csrc/ops.cpp): the fused recurrence and its BPTT backward.
//
// Decomposition: the directions of a layer are independent and run in parallel (at::parallel_for over
// D); inside a direction the T steps are sequential. Each step multiplies the live rows' previous states
// by W_hh and adds the precomputed input projection xw_t, by one of four loops chosen per call (the rules:
// copy_of_w_pays, all_steps_blas, use_tile_step, small_step_reads_w_hh below):
//   float32 on a CPU with AVX-512 or AVX2: the register-tile step (step_tile.h: step_avx512.cpp, a 6-row x
//     64-column tile; step_avx2.cpp, 6 rows x 16 columns) with the projection add and the activation fused,
//     reading a packed W_hh^T (forward) or W_hh (backward);
//   otherwise, small steps (rows*H*H below kBlasMinFlops): a hand-written matrix-vector loop per row that
//     keeps a tile of 64 floats of z in registers, reads W_hh^T once per row, and applies the activation
//     before storing, so z never goes to memory;
//   large steps, and every step of a call too short to repay a copy of W_hh: one BLAS GEMM (the
//     sgemm_/dgemm_ that torch's own BLAS exports; if none is exported, the hand-written loop), then one
//     activation pass over the rows; but in such a call a float32 step below BLAS's size on an AVX-512 CPU
//     takes the AVX-512 dot-product step, which reads W_hh as it lies (small_step_reads_w_hh).
// Memory: h_all is both the output and the recurrent state (h_{t-1} is read in place), and may be xw itself
// (every loop reads a step's xw_t before it writes h_t over it; the CPU layer runs so); the only scratch is
// one copy of W_hh per call for the forward (W_hh^T [D, H, H], or the AVX-512 step's packed W_hh^T) and the
// carried gradient [D, B, H] for the backward, allocated once per call, never per step.
// Floor: 2*rows*H*H flops per step plus one pass over xw_t and h_t; for tiny H the per-step cost is a few
// hundred nanoseconds, where nn.RNN spends ~10 us per step in operator dispatch.
#include "recurrence_cpu.h"

#include "activation.h"
#include "blas.h"
#include "gemm_onednn.h"
#include "packed_cache.h"
#include "step_avx512.h"
#include "step_tile.h"
#include "transpose.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RNN_FUSED_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RNN_FUSED_MULTIVERSION
#endif

namespace rnn_fused {
namespace {

// A step at or above this many multiply-adds goes to BLAS; below it the call overhead and the separate
// activation pass cost more than the hand loop saves (crossover measured on a 2-core AMD EPYC, see
// benchmarks/NOTES.md).
constexpr int64_t kBlasMinFlops = 96 * 1024;

// The most rows of a BLAS-sized forward step that the AVX2 tile step takes (use_tile_step).
constexpr int64_t kAvx2TileForwardMaxRows = 3;

// ---- the hand-written step ------------------------------------------------------------------------------

// out[i] = act(bias[i] + sum_j v[j] * m[j, i]) for i < H, m row-major [H, H] (so m = W^T gives W v).
// Register tile of kTile outputs: 256 bytes, eight AVX2 registers of independent FMA chains. bias may be out
// (the in-place forward): each tile reads its bias before it writes its outputs.
template <typename T, bool kApplyActivation>
RNN_FUSED_INLINE void row_times_matrix(const T* __restrict m, int64_t H, const T* __restrict v, const T* bias,
                                       T* out, Activation act) {
  constexpr int64_t kTile = 256 / sizeof(T);
  int64_t i0 = 0;
  for (; i0 + kTile <= H; i0 += kTile) {
    T acc[kTile];
    for (int64_t k = 0; k < kTile; ++k) acc[k] = bias ? bias[i0 + k] : T(0);
    for (int64_t j = 0; j < H; ++j) {
      const T vj = v[j];
      const T* __restrict mj = m + j * H + i0;
      for (int64_t k = 0; k < kTile; ++k) acc[k] += vj * mj[k];
    }
    for (int64_t k = 0; k < kTile; ++k) out[i0 + k] = kApplyActivation ? activate(acc[k], act) : acc[k];
  }
  if (i0 < H) {
    const int64_t n = H - i0;
    T acc[kTile];
    for (int64_t k = 0; k < n; ++k) acc[k] = bias ? bias[i0 + k] : T(0);
    for (int64_t j = 0; j < H; ++j) {
      const T vj = v[j];
      const T* __restrict mj = m + j * H + i0;
      for (int64_t k = 0; k < n; ++k) acc[k] += vj * mj[k];
    }
    for (int64_t k = 0; k < n; ++k) out[i0 + k] = kApplyActivation ? activate(acc[k], act) : acc[k];
  }
}

// Rows [0, rows) of one step: out_r = act(xw_r + W h_r), where h_r is read at prev + r * prev_stride.
template <typename T>
RNN_FUSED_INLINE void step_rows_hand(const T* w_t, int64_t H, const T* xw, int64_t row_stride, const T* prev,
                                     int64_t prev_stride, T* out, int64_t rows, Activation act) {
  for (int64_t r = 0; r < rows; ++r)
    row_times_matrix<T, true>(w_t, H, prev + r * prev_stride, xw + r * row_stride, out + r * row_stride, act);
}

RNN_FUSED_MULTIVERSION void step_rows_hand_f32(const float* w_t, int64_t H, const float* xw, int64_t row_stride,
                                               const float* prev, int64_t prev_stride, float* out, int64_t rows,
                                               Activation act) {
  step_rows_hand<float>(w_t, H, xw, row_stride, prev, prev_stride, out, rows, act);
}
RNN_FUSED_MULTIVERSION void step_rows_hand_f64(const double* w_t, int64_t H, const double* xw,
                                               int64_t row_stride, const double* prev, int64_t prev_stride,
                                               double* out, int64_t rows, Activation act) {
  step_rows_hand<double>(w_t, H, xw, row_stride, prev, prev_stride, out, rows, act);
}
RNN_FUSED_INLINE void step_rows_hand_any(const float* w_t, int64_t H, const float* xw, int64_t rs,
                                         const float* prev, int64_t ps, float* out, int64_t rows, Activation a) {
  step_rows_hand_f32(w_t, H, xw, rs, prev, ps, out, rows, a);
}
RNN_FUSED_INLINE void step_rows_hand_any(const double* w_t, int64_t H, const double* xw, int64_t rs,
                                         const double* prev, int64_t ps, double* out, int64_t rows, Activation a) {
  step_rows_hand_f64(w_t, H, xw, rs, prev, ps, out, rows, a);
}

// Backward of one step for rows [0, rows):
//   g_r = dh_r + carried_r (= dL/dh_r),  dz_r = clip(g_r) * act'(h_r),  then carry_r = dz_r W (= W^T dz_r,
//   the gradient sent to h_{prev}).
// carried_r is the carried gradient (rows < carried_in) or dh_last (the rows whose sequence ends here).
// If `carry_out` is false the product is left to a GEMM by the caller. With options (csrc/ops.cpp), g_r
// goes through dz_r first, so the row's norm is known before the clip: two passes over a row that is in L1.
// grad_norm: ||g_r|| at grad_norm[r * grad_norm_stride], or null; squares summed in double (csrc/ops.cpp).
template <typename T>
RNN_FUSED_INLINE void backward_rows(const T* w, int64_t H, const T* h, const T* dh, int64_t row_stride,
                                    const T* dh_last, int64_t carried_in, T* carry, T* dz, int64_t rows,
                                    Activation act, bool carry_out, const BackwardOptions& opts, T* grad_norm,
                                    int64_t grad_norm_stride) {
  const T clip = static_cast<T>(opts.clip);
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict hr = h + r * row_stride;
    const T* __restrict dhr = dh ? dh + r * row_stride : nullptr;
    const T* __restrict gr = r < carried_in ? carry + r * H : (dh_last ? dh_last + r * H : nullptr);
    T* __restrict dzr = dz + r * row_stride;
    if (!opts.active()) {
      for (int64_t i = 0; i < H; ++i) {
        T g = (dhr ? dhr[i] : T(0)) + (gr ? gr[i] : T(0));
        dzr[i] = activation_backward(g, hr[i], act);
      }
    } else {
      // ||g||^2 in double over kLanes independent partial sums: one running double sum is a chain of
      // dependent adds (4 cycles each, not reorderable without -ffast-math) that cost ~5% of a T256 B16
      // H128 backward; the lanes vectorise.
      constexpr int64_t kLanes = 8;
      double part[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= H; i += kLanes) {
        for (int64_t k = 0; k < kLanes; ++k) {
          const T g = (dhr ? dhr[i + k] : T(0)) + (gr ? gr[i + k] : T(0));
          dzr[i + k] = g;
          part[k] += static_cast<double>(g) * g;
        }
      }
      for (; i < H; ++i) {
        const T g = (dhr ? dhr[i] : T(0)) + (gr ? gr[i] : T(0));
        dzr[i] = g;
        part[0] += static_cast<double>(g) * g;
      }
      double sq = 0;
      for (int64_t k = 0; k < kLanes; ++k) sq += part[k];
      const double norm = std::sqrt(sq);
      if (grad_norm) grad_norm[r * grad_norm_stride] = static_cast<T>(norm);
      if (opts.clip_mode == ClipMode::Value) {
        for (int64_t i = 0; i < H; ++i) {  // comparisons, false for NaN: NaN passes
          T g = dzr[i];
          g = g > clip ? clip : g;
          g = g < -clip ? -clip : g;
          dzr[i] = activation_backward(g, hr[i], act);
        }
      } else {
        // clip / max(norm, clip), NaN-propagating: a row holding NaN becomes all NaN, as in the reference
        const T scale = (opts.clip_mode == ClipMode::Norm && !(norm <= opts.clip)) ? static_cast<T>(opts.clip / norm)
                                                                                    : T(1);
        for (int64_t i = 0; i < H; ++i) dzr[i] = activation_backward(scale * dzr[i], hr[i], act);
      }
    }
    if (carry_out) row_times_matrix<T, false>(w, H, dzr, nullptr, carry + r * H, act);
  }
}

#define RNN_FUSED_BACKWARD_ROWS_ARGS(T)                                                                  \
  const T *w, int64_t H, const T *h, const T *dh, int64_t rs, const T *dh_last, int64_t ci, T *carry, T *dz, \
      int64_t rows, Activation act, bool co, const BackwardOptions &opts, T *grad_norm, int64_t gs
RNN_FUSED_MULTIVERSION void backward_rows_f32(RNN_FUSED_BACKWARD_ROWS_ARGS(float)) {
  backward_rows<float>(w, H, h, dh, rs, dh_last, ci, carry, dz, rows, act, co, opts, grad_norm, gs);
}
RNN_FUSED_MULTIVERSION void backward_rows_f64(RNN_FUSED_BACKWARD_ROWS_ARGS(double)) {
  backward_rows<double>(w, H, h, dh, rs, dh_last, ci, carry, dz, rows, act, co, opts, grad_norm, gs);
}
RNN_FUSED_INLINE void backward_rows_any(RNN_FUSED_BACKWARD_ROWS_ARGS(float)) {
  backward_rows_f32(w, H, h, dh, rs, dh_last, ci, carry, dz, rows, act, co, opts, grad_norm, gs);
}
RNN_FUSED_INLINE void backward_rows_any(RNN_FUSED_BACKWARD_ROWS_ARGS(double)) {
  backward_rows_f64(w, H, h, dh, rs, dh_last, ci, carry, dz, rows, act, co, opts, grad_norm, gs);
}
#undef RNN_FUSED_BACKWARD_ROWS_ARGS

template <typename T>
RNN_FUSED_MULTIVERSION void activate_rows(T* x, int64_t row_stride, int64_t rows, int64_t H, Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict xr = x + r * row_stride;
    if (act == Activation::Tanh) {
      for (int64_t i = 0; i < H; ++i) xr[i] = tanh_fast(xr[i]);
    } else {
      for (int64_t i = 0; i < H; ++i) xr[i] = std::max(xr[i], T(0));
    }
  }
}

// ---- BLAS (blas.h) ---------------------------------------------------------------------------------

template <typename T>
bool use_blas(int64_t rows, int64_t H) {
  return blas_available(static_cast<T*>(nullptr)) && rows * H * H >= kBlasMinFlops;
}

// A copy of W_hh made once per call (the tile step's packed W_hh^T, the hand loop's W_hh^T) is a pass
// over W_hh: 25 us at H = 256, 0.16 ms at H = 512, where W_hh and its copy no longer fit in L2. It pays from
// 16 steps up to H = 256 and from 32 steps above (measured, op alone, B = 1: T = 16, H = 512: 0.43 ms with
// the packed copy against 0.32 with BLAS; T = 32: 0.50 against 0.61; T = 4, H = 256: the transposed copy and
// the hand loop 0.084 ms against BLAS's 0.030). Shorter calls send every step to BLAS, which reads W_hh as
// it lies (T = 1, B = 1, H = 256: the copy was 135 us of a 112 us call with ATen's transposing copy).
// The backward's tile step reads W_hh as it lies and copies nothing.
bool copy_of_w_pays(const RecurrenceProblem& p) { return p.T >= (p.H <= 256 ? 16 : 32); }

// Whether no step reads a copy of W_hh: the call is too short for the copy to pay, or every step is large
// enough for BLAS anyway (the smallest step has batch_sizes.back() rows: they never increase).
template <typename T>
bool all_steps_blas(const RecurrenceProblem& p) {
  return blas_available(static_cast<T*>(nullptr)) &&
         (!copy_of_w_pays(p) || use_blas<T>(p.batch_sizes.back(), p.H));
}

// Whether a call's steps take the register-tile step (step_tile.h): float32 on a CPU that has AVX-512 or
// AVX2 (and for the forward, a call long enough to repay packing W_hh^T: copy_of_w_pays). On one thread it
// beats BLAS per step at every measured shape: AVX-512 B 1-256 x H 64-1024 (benchmarks/NOTES.md "AVX-512
// step"), AVX2 on the AMD EPYC CI machines ("AVX2 step"); but it runs on the thread of its direction, so
// where threads are left over (more than directions) and the steps are BLAS-sized, BLAS keeps them and
// spreads each step over those threads. On AVX2 the forward's BLAS-sized steps of 4 rows or more stay with
// BLAS too: there the AVX2 tile only ties MKL (recurrence op alone, median of 3 alternating runs: T128 B64
// H256 0.97-1.11x, T256 B16 H128 1.09-1.42x), where its backward wins (0.78-0.95x) and so do its steps of
// fewer rows (T64 B1 H512 0.65-0.72x forward).
// Where the large float32 GEMMs run on oneDNN's micro-kernel (gemm_onednn.h), a step of B <= 64 rows is one
// block of it, on one thread, with W_hh^T copied per step, where the tile step runs at oneDNN's rate without a
// copy: there the tile step keeps the steps whatever the thread count.
template <typename T>
bool use_tile_step(const RecurrenceProblem& p, bool forward) {
  const bool threads_left_for_blas = !onednn::chosen() && at::get_num_threads() > p.D && use_blas<T>(p.B, p.H);
  const bool blas_keeps_avx2_forward =
      forward && tile::isa() == tile::Isa::Avx2 && p.B > kAvx2TileForwardMaxRows && use_blas<T>(p.B, p.H);
  return std::is_same_v<T, float> && tile::available() && !threads_left_for_blas && !blas_keeps_avx2_forward &&
         (!forward || copy_of_w_pays(p));
}

// Whether a forward step that has no copy of W_hh (no_copy: all_steps_blas) and is below BLAS's size takes
// the AVX-512 dot-product step (step_avx512.h, rows_times_transposed) instead of BLAS: float32 on an AVX-512
// CPU. MKL's sgemv costs ~0.3 us of setup per call where the step is ~0.05 us of arithmetic (T = 1, B = 1,
// H = 64: benchmarks/NOTES.md, "Per-call latency", sixth round).
template <typename T>
bool small_step_reads_w_hh(bool no_copy, int64_t rows, int64_t H) {
  return std::is_same_v<T, float> && no_copy && !use_blas<T>(rows, H) && tile::isa() == tile::Isa::Avx512;
}

// W_hh^T (the forward's, transposed) or W_hh (the backward's) per direction in the tile step's packed layout,
// [D, packed_floats(H)].
at::Tensor packed_w_hh(const RecurrenceProblem& p, const DirectionWeights<float>& w_hh, bool transposed) {
  const int64_t size = tile::packed_floats(p.H);
  at::Tensor out = at::empty({p.D, size}, at::TensorOptions().dtype(at::kFloat));
  for (int64_t d = 0; d < p.D; ++d) {
    float* dst = out.data_ptr<float>() + d * size;
    if (transposed)
      tile::pack_transposed(w_hh[d], p.H, dst);
    else
      tile::pack(w_hh[d], p.H, dst);
  }
  return out;
}

// W_hh^T per direction, [D, H, H] (transpose.h's tiles: ATen's copy of a transposed view is ~10x slower).
template <typename T>
at::Tensor transposed(const RecurrenceProblem& p, const DirectionWeights<T>& w_hh) {
  const int64_t H = p.H;
  at::Tensor out = at::empty({p.D, H, H}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  for (int64_t d = 0; d < p.D; ++d) transpose_into<T>(w_hh[d], H, H, H, out.data_ptr<T>() + d * H * H, H);
  return out;
}

// ---- one direction ----------------------------------------------------------------------------------------

// Pointers of one direction d in the layouts of csrc/ops.cpp; rows of xw/h_all/dz are D*H apart.
template <typename T>
struct DirectionView {
  const T* w;   // W_hh[d]   [H, H]
  const T* w_t; // W_hh[d]^T [H, H]  (forward only; null in a call of all_steps_blas or the tile step)
  // What the tile step multiplies by (W_hh[d]^T packed for the forward, W_hh[d] for the backward);
  // data is null when the call does not take it (always for double).
  tile::StepMatrix step_matrix;
  const T* h0;  // h0[d]     [B, H]
  int64_t row_stride;  // D * H
  int64_t d_offset;    // d * H: column offset of direction d inside a row of [.., D, H]
};

template <typename T>
void forward_direction(const RecurrenceProblem& p, int64_t d, const DirectionView<T>& v, const T* xw, T* h_all,
                       T* h_last) {
  const int64_t H = p.H, rs = v.row_stride;
  const std::vector<Step> steps = p.schedule(d);
  const Step* prev = nullptr;
  for (const Step& s : steps) {
    const T* xw_t = xw + s.row_begin * rs + v.d_offset;
    T* h_t = h_all + s.row_begin * rs + v.d_offset;
    const T* h_prev = prev ? h_all + prev->row_begin * rs + v.d_offset : nullptr;
    if (v.step_matrix.data) {
      if constexpr (std::is_same_v<T, float>) {
        if (s.carried > 0)
          tile::rows_times(v.step_matrix, H, h_prev, rs, xw_t, rs, h_t, rs, s.carried, true, p.activation);
        if (s.rows > s.carried)
          tile::rows_times(v.step_matrix, H, v.h0 + s.carried * H, H, xw_t + s.carried * rs, rs,
                             h_t + s.carried * rs, rs, s.rows - s.carried, true, p.activation);
      }
    } else if (small_step_reads_w_hh<T>(v.w_t == nullptr, s.rows, H)) {
      if constexpr (std::is_same_v<T, float>) {
        if (s.carried > 0)
          avx512::rows_times_transposed(v.w, H, h_prev, rs, xw_t, rs, h_t, rs, s.carried, p.activation);
        if (s.rows > s.carried)
          avx512::rows_times_transposed(v.w, H, v.h0 + s.carried * H, H, xw_t + s.carried * rs, rs,
                                        h_t + s.carried * rs, rs, s.rows - s.carried, p.activation);
      }
    } else if (v.w_t == nullptr || use_blas<T>(s.rows, H)) {  // no W_hh^T: all_steps_blas
      if (xw != h_all)
        for (int64_t r = 0; r < s.rows; ++r) std::memcpy(h_t + r * rs, xw_t + r * rs, H * sizeof(T));
      if (s.carried > 0) gemm_rows<T>(h_prev, rs, v.w, /*transpose_m=*/true, h_t, rs, s.carried, H, H, T(1));
      if (s.rows > s.carried)
        gemm_rows<T>(v.h0 + s.carried * H, H, v.w, true, h_t + s.carried * rs, rs, s.rows - s.carried, H, H,
                     T(1));
      activate_rows<T>(h_t, rs, s.rows, H, p.activation);
    } else {
      if (s.carried > 0) step_rows_hand_any(v.w_t, H, xw_t, rs, h_prev, rs, h_t, s.carried, p.activation);
      if (s.rows > s.carried)
        step_rows_hand_any(v.w_t, H, xw_t + s.carried * rs, rs, v.h0 + s.carried * H, H, h_t + s.carried * rs,
                           s.rows - s.carried, p.activation);
    }
    for (int64_t r = s.continuing; r < s.rows; ++r)
      std::memcpy(h_last + r * H, h_t + r * rs, H * sizeof(T));
    prev = &s;
  }
}

// BPTT over one direction, visiting the forward schedule in reverse. `carry` [B, H] holds W^T dz of the
// later step for the rows that continue; rows that start at a step hand theirs to dh0.
// grad_norm: the [N, D] norms (null when not recording).
template <typename T>
void backward_direction(const RecurrenceProblem& p, int64_t d, const DirectionView<T>& v, const T* h_all,
                        const T* dh_all, const T* dh_last, T* carry, T* dz, T* dh0, const BackwardOptions& opts,
                        T* grad_norm) {
  const int64_t H = p.H, rs = v.row_stride;
  const std::vector<Step> steps = p.schedule(d);
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    const Step& s = *it;
    const int64_t off = s.row_begin * rs + v.d_offset;
    const T* dh_t = dh_all ? dh_all + off : nullptr;
    const bool tile_step = v.step_matrix.data != nullptr;
    const bool blas = !tile_step && use_blas<T>(s.rows, H);
    // Rows [0, continuing) receive the carried gradient; rows [continuing, rows) end here and read dh_last.
    backward_rows_any(v.w, H, h_all + off, dh_t, rs, dh_last, s.continuing, carry, dz + off, s.rows,
                      p.activation, /*carry_out=*/!blas && !tile_step, opts,
                      grad_norm ? grad_norm + s.row_begin * p.D + d : nullptr, p.D);
    if (blas) gemm_rows<T>(dz + off, rs, v.w, /*transpose_m=*/false, carry, H, s.rows, H, H, T(0));
    if (tile_step) {
      if constexpr (std::is_same_v<T, float>)
        tile::rows_times(v.step_matrix, H, dz + off, rs, nullptr, 0, carry, H, s.rows, false, p.activation);
    }
    for (int64_t r = s.carried; r < s.rows; ++r) std::memcpy(dh0 + r * H, carry + r * H, H * sizeof(T));
  }
  if (p.T == 0 && dh_last) std::memcpy(dh0, dh_last, p.B * H * sizeof(T));
}

// w_hh_t: undefined when not made for this call. step_matrix: the tile step's matrix of direction d (data
// null when not taken); a packed one ([D, packed_floats(H)]) is given as `packed`, else W_hh itself is read.
template <typename T>
DirectionView<T> direction_view(const RecurrenceProblem& p, int64_t d, const DirectionWeights<T>& w_hh,
                                const at::Tensor& w_hh_t, bool tile_step, const at::Tensor& packed, const T* h0) {
  tile::StepMatrix step_matrix{nullptr, 0, 0};
  if constexpr (std::is_same_v<T, float>) {
    if (tile_step && packed.defined())
      step_matrix = tile::packed(packed.data_ptr<float>() + d * packed.size(1), p.H);
    else if (tile_step)
      step_matrix = tile::row_major(w_hh[d], p.H);
  }
  return DirectionView<T>{w_hh[d], w_hh_t.defined() ? w_hh_t.data_ptr<T>() + d * p.H * p.H : nullptr, step_matrix,
                          h0 + d * p.B * p.H, p.D * p.H, d * p.H};
}

}  // namespace

template <typename T>
void recurrence_forward_into(const RecurrenceProblem& p, const DirectionWeights<T>& w_hh, const T* xw, const T* h0,
                             T* h_all, T* h_last, bool reuse_packed) {
  const bool tile_step = use_tile_step<T>(p, /*forward=*/true);
  at::Tensor packed;
  if constexpr (std::is_same_v<T, float>) {
    const auto pack = [&](const float* const* w) {
      return packed_w_hh(p, DirectionWeights<float>{w[0], p.D > 1 ? w[1] : nullptr}, /*transposed=*/true);
    };
    if (tile_step)
      packed = reuse_packed ? packed_weights(w_hh.data(), p.D, p.H, pack) : pack(w_hh.data());
  }
  const at::Tensor w_hh_t = tile_step || all_steps_blas<T>(p) ? at::Tensor() : transposed<T>(p, w_hh);
  at::parallel_for(0, p.D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d)
      forward_direction<T>(p, d, direction_view<T>(p, d, w_hh, w_hh_t, tile_step, packed, h0), xw, h_all,
                           h_last + d * p.B * p.H);
  });
}

template <typename T>
void recurrence_backward_into(const RecurrenceProblem& p, const DirectionWeights<T>& w_hh, const T* h_all,
                              const T* h0, const T* dh_all, const T* dh_last, T* dz, T* dh0,
                              const BackwardOptions& opts, T* grad_norm) {
  const bool tile_step = use_tile_step<T>(p, /*forward=*/false);
  at::Tensor packed;
  if constexpr (std::is_same_v<T, float>) {
    if (tile_step && tile::packs_backward_matrix() && copy_of_w_pays(p)) packed = packed_w_hh(p, w_hh, false);
  }
  std::vector<T> carry(p.D * p.B * p.H, T(0));  // W^T dz of the later step, per direction [D, B, H]
  at::parallel_for(0, p.D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      const int64_t state = d * p.B * p.H;
      backward_direction<T>(p, d, direction_view<T>(p, d, w_hh, at::Tensor(), tile_step, packed, h0), h_all,
                            dh_all, dh_last ? dh_last + state : nullptr, carry.data() + state, dz, dh0 + state, opts,
                            grad_norm);
    }
  });
}

template void recurrence_forward_into<float>(const RecurrenceProblem&, const DirectionWeights<float>&, const float*,
                                             const float*, float*, float*, bool);
template void recurrence_forward_into<double>(const RecurrenceProblem&, const DirectionWeights<double>&,
                                              const double*, const double*, double*, double*, bool);
template void recurrence_backward_into<float>(const RecurrenceProblem&, const DirectionWeights<float>&, const float*,
                                              const float*, const float*, const float*, float*, float*,
                                              const BackwardOptions&, float*);
template void recurrence_backward_into<double>(const RecurrenceProblem&, const DirectionWeights<double>&,
                                               const double*, const double*, const double*, const double*, double*,
                                               double*, const BackwardOptions&, double*);

namespace {

template <typename T>
DirectionWeights<T> directions_of(const at::Tensor& w_hh) {  // w_hh [D, H, H] contiguous
  const int64_t D = w_hh.size(0), H = w_hh.size(1);
  return {w_hh.data_ptr<T>(), D > 1 ? w_hh.data_ptr<T>() + H * H : nullptr};
}

void check_cpu_dtype(const at::Tensor& w_hh) {
  // Half types are the CPU backend's too, computed in float32 by its Python side (rnn_fused/backends.py):
  // the hint says where, instead of sending the caller to the slow reference.
  TORCH_CHECK(w_hh.scalar_type() == at::kFloat || w_hh.scalar_type() == at::kDouble,
              "rnn_fused: the CPU kernels take Float and Double, got ", w_hh.scalar_type(),
              " (float16 and bfloat16 run on backend='cpu' through rnn_fused.functional.recurrence or "
              "FusedRNN, which compute them in float32)");
}

std::tuple<at::Tensor, at::Tensor> recurrence_forward_cpu(const at::Tensor& xw_in, const at::Tensor& w_hh_in,
                                                          const at::Tensor& h0_in,
                                                          const c10::optional<at::Tensor>& batch_sizes,
                                                          c10::string_view activation, c10::string_view clip_mode,
                                                          double clip, const c10::optional<at::Tensor>& norm_probe) {
  const RecurrenceProblem p = check_forward_args(xw_in, w_hh_in, h0_in, batch_sizes, activation);
  check_forward_options(xw_in, clip_mode, clip, norm_probe);  // the backward's; the forward is the same
  check_cpu_dtype(w_hh_in);
  const at::Tensor xw = xw_in.contiguous(), w_hh = w_hh_in.contiguous(), h0 = h0_in.contiguous();
  at::Tensor h_all = at::empty_like(xw);
  at::Tensor h_last = h0.clone();  // T == 0 leaves each sequence at h0
  if (p.empty()) return {h_all, h_last};  // no work (B = 2^40 rows of H = 0 included)
  AT_DISPATCH_FLOATING_TYPES(w_hh.scalar_type(), "recurrence_forward_cpu", [&] {
    recurrence_forward_into<scalar_t>(p, directions_of<scalar_t>(w_hh), xw.data_ptr<scalar_t>(),
                                      h0.data_ptr<scalar_t>(), h_all.data_ptr<scalar_t>(),
                                      h_last.data_ptr<scalar_t>());
  });
  return {h_all, h_last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrence_backward_cpu(
    const at::Tensor& w_hh_in, const at::Tensor& h_all_in, const at::Tensor& h0_in,
    const c10::optional<at::Tensor>& dh_all_in, const c10::optional<at::Tensor>& dh_last_in,
    const c10::optional<at::Tensor>& batch_sizes, c10::string_view activation, c10::string_view clip_mode,
    double clip, bool record_norms) {
  const RecurrenceProblem p =
      check_backward_args(w_hh_in, h_all_in, h0_in, dh_all_in, dh_last_in, batch_sizes, activation);
  const BackwardOptions opts = check_backward_options(clip_mode, clip, record_norms);
  check_cpu_dtype(w_hh_in);
  const at::Tensor w_hh = w_hh_in.contiguous(), h_all = h_all_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor dh_all = dh_all_in.has_value() ? dh_all_in->contiguous() : at::Tensor();
  const at::Tensor dh_last = dh_last_in.has_value() ? dh_last_in->contiguous() : at::Tensor();
  at::Tensor dz = at::empty_like(h_all);
  at::Tensor dh0 = at::zeros_like(h0);
  at::Tensor grad_norm = grad_norm_output(h_all, record_norms);
  if (p.empty()) {
    // No work: the gradient of h_last (= h0 when T == 0) passes to h0; a row of H = 0 has norm 0.
    if (record_norms) grad_norm.zero_();
    if (p.T == 0 && dh_last.defined()) dh0.copy_(dh_last);
    return {dz, dh0, grad_norm};
  }
  AT_DISPATCH_FLOATING_TYPES(w_hh.scalar_type(), "recurrence_backward_cpu", [&] {
    recurrence_backward_into<scalar_t>(p, directions_of<scalar_t>(w_hh), h_all.data_ptr<scalar_t>(),
                                       h0.data_ptr<scalar_t>(), dh_all.defined() ? dh_all.data_ptr<scalar_t>() : nullptr,
                                       dh_last.defined() ? dh_last.data_ptr<scalar_t>() : nullptr,
                                       dz.data_ptr<scalar_t>(), dh0.data_ptr<scalar_t>(), opts,
                                       record_norms ? grad_norm.data_ptr<scalar_t>() : nullptr);
  });
  return {dz, dh0, grad_norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_fused, CPU, m) {
  m.impl("recurrence_forward", &recurrence_forward_cpu);
  m.impl("recurrence_backward", &recurrence_backward_cpu);
}

}  // namespace rnn_fused
