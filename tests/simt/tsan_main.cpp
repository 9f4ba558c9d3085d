// The SIMT harness under ThreadSanitizer (which cannot be preloaded into Python): runs one case of
// tests/simt/cases.py, given on the command line, on the persistent kernels and on the stepwise path, and
// prints the largest difference between the two. ThreadSanitizer reports (a missing __syncthreads, a grid
// barrier that lets a CTA read the state before it is written) make the process exit with status 66.
//
//   simt_tsan T B H D activation sms smem_optin [batch_sizes, comma-separated]   (float32)
#include "simt_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr, "usage: %s T B H D activation sms smem_optin [batch_sizes]\n", argv[0]);
    return 2;
  }
  const int64_t T = std::atoll(argv[1]), B = std::atoll(argv[2]), H = std::atoll(argv[3]), D = std::atoll(argv[4]);
  const std::string activation = argv[5];
  rnn_fused_simt::configure(std::atoll(argv[6]), std::atoll(argv[7]));
  at::set_num_threads(1);  // the GEMMs of the stepwise path run in uninstrumented code: keep them on this thread
  at::manual_seed(0);

  c10::optional<at::Tensor> batch_sizes;
  std::vector<int64_t> rows_shape{T, B, D, H};
  if (argc > 8) {
    std::vector<int64_t> bs;
    for (char* p = argv[8]; *p != '\0';) bs.push_back(std::strtoll(p, &p, 10)), p += (*p == ',');
    batch_sizes = at::tensor(bs, at::kLong);
    int64_t n = 0;
    for (int64_t b : bs) n += b;
    rows_shape = {n, D, H};
  }
  const at::Tensor xw = at::randn(rows_shape), w_hh = at::randn({D, H, H}) / std::sqrt(double(H));
  const at::Tensor h0 = at::randn({D, B, H}), dh_all = at::randn(rows_shape), dh_last = at::randn({D, B, H});

  double worst = 0;
  std::vector<at::Tensor> outs[2];
  const char* kernels[2] = {"persistent", "stepwise"};
  for (int k = 0; k < 2; ++k) {
    auto [h_all, h_last] = rnn_fused_simt::forward(xw, w_hh, h0, batch_sizes, activation, kernels[k]);
    auto [dz, dh0, norms] = rnn_fused_simt::backward(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation,
                                                     kernels[k], "none", 0.0, false);
    outs[k] = {h_all, h_last, dz, dh0};
  }
  for (int i = 0; i < 4; ++i) {
    const double d = max_diff(outs[0][i], outs[1][i]);
    if (!(d <= worst)) worst = d;  // NaN (an element no thread wrote) wins, so it fails below
  }
  std::printf("persistent vs stepwise: max difference %.3e\n", worst);
  return worst <= 1e-4 ? 0 : 1;  // float32 sums in two orders; NaN (an unwritten element) fails too
}
