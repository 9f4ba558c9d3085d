// The activations of the CPU kernels and their derivatives, shared by the portable step loops
// (recurrence_cpu.cpp) and the AVX-512 step (step_avx512.cpp), so every path computes the same numbers.
#pragma once

#include "../recurrence_args.h"

#include <algorithm>
#include <cmath>

#define RNN_FUSED_INLINE inline __attribute__((always_inline))

namespace rnn_fused {

// tanh for float as a [13/6] rational minimax approximation on [-7.9, 7.9] (the form Eigen uses), which
// the compiler vectorises; |error| <= 2 ulp near 0 and < 1e-7 overall (tested through the op
// against float64). Beyond the clamp tanh is +-1 to float precision. The clamp is written with comparisons
// that are false for NaN, so NaN passes through (std::min/std::max would turn it into -+clamp, hiding a
// diverged run from the user, as nn.RNN does not).
RNN_FUSED_INLINE float tanh_fast(float x) {
  const float clamp = 7.90531110763549805f;
  x = x < -clamp ? -clamp : x;
  x = x > clamp ? clamp : x;
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}
RNN_FUSED_INLINE double tanh_fast(double x) { return std::tanh(x); }

template <typename T>
RNN_FUSED_INLINE T activate(T z, Activation act) {
  return act == Activation::Tanh ? tanh_fast(z) : std::max(z, T(0));
}

// g * act'(z) written in terms of h = act(z), so the backward needs only h_all. For relu a select, as torch's
// relu backward: an inf or NaN g at a unit that is off gives 0 (a product would give inf * 0 = NaN); NaN h
// passes g.
template <typename T>
RNN_FUSED_INLINE T activation_backward(T g, T h, Activation act) {
  return act == Activation::Tanh ? g * (T(1) - h * h) : (h <= T(0) ? T(0) : g);
}

}  // namespace rnn_fused
