// The activations of the CPU kernels and their derivatives, shared by the portable step loops
// (recurrence_cpu.cpp) and the tile steps (step_avx512.cpp, step_avx2.cpp), so every path computes the same numbers.
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
// Its constants, shared with the AVX2 step's register form (step_avx2.cpp, tanh8): the clamp, then the
// numerator's and the denominator's coefficients in x^2, highest power first.
constexpr float kTanhClamp = 7.90531110763549805f;
constexpr float kTanhNumerator[7] = {-2.76076847742355e-16f, 2.00018790482477e-13f, -8.60467152213735e-11f,
                                     5.12229709037114e-08f,  1.48572235717979e-05f, 6.37261928875436e-04f,
                                     4.89352455891786e-03f};
constexpr float kTanhDenominator[4] = {1.19825839466702e-06f, 1.18534705686654e-04f, 2.26843463243900e-03f,
                                       4.89352518554385e-03f};
RNN_FUSED_INLINE float tanh_fast(float x) {
  x = x < -kTanhClamp ? -kTanhClamp : x;
  x = x > kTanhClamp ? kTanhClamp : x;
  const float x2 = x * x;
  float p = kTanhNumerator[0];
  for (int i = 1; i < 7; ++i) p = p * x2 + kTanhNumerator[i];
  float q = kTanhDenominator[0];
  for (int i = 1; i < 4; ++i) q = q * x2 + kTanhDenominator[i];
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
