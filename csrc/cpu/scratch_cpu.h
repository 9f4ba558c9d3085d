// The CPU layer's per-call temporary (the backward's dz, [T * B, D * H]) from one buffer that each thread
// keeps between calls.
//
// Why: it is as large as the layer's output (8 MiB at T=128 B=64 H=256 fp32). Allocated and
// freed per call, glibc hands the top of its heap back to the kernel whenever the freed memory there passes
// its trim threshold (twice the largest block it has mmapped, so 16 MiB here), and the next call takes a
// page fault per 4 KiB it touches again: ~2,250 faults per fwd+bwd at that shape (when the forward's xw was
// a temporary too: it is now made in the output), which made it 1.37-1.46x of its GEMM floor against
// 1.14-1.15x with glibc's trimming switched off (benchmarks/NOTES.md, "Page
// faults"). Keeping scratch between calls is what oneDNN's scratchpad and MKL's own GEMM buffers do.
// Bound: at most kKeptScratchBytes stay with each thread that has run a CPU backward, until the thread ends;
// a larger temporary is allocated and freed per call, as is one taken while the thread's buffer is leased.
#pragma once

#include <cstddef>

namespace rnn_fused {

constexpr size_t kKeptScratchBytes = size_t(64) << 20;

class ScratchLease {
 public:
  // At least `bytes` of uninitialised memory, 64-byte aligned, until the lease ends.
  explicit ScratchLease(size_t bytes);
  ~ScratchLease();
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;

  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_;
  bool owned_;  // allocated for this lease alone (not the thread's kept buffer)
};

// Bytes the calling thread keeps (0 before its first lease): for the tests of this rule.
size_t kept_scratch_bytes();

}  // namespace rnn_fused
