// The thread's kept scratch buffer (scratch_cpu.h): one per thread, grown to the largest lease up to
// kKeptScratchBytes, freed when the thread ends.
#include "scratch_cpu.h"

#include <c10/core/impl/alloc_cpu.h>

namespace rnn_fused {
namespace {

struct KeptScratch {
  void* data = nullptr;
  size_t bytes = 0;
  bool leased = false;
  ~KeptScratch() {
    if (data) c10::free_cpu(data);
  }
};

thread_local KeptScratch kept;

}  // namespace

ScratchLease::ScratchLease(size_t bytes) : data_(nullptr), owned_(false) {
  if (bytes == 0) bytes = 1;
  if (kept.leased || bytes > kKeptScratchBytes) {
    data_ = c10::alloc_cpu(bytes);
    owned_ = true;
    return;
  }
  if (kept.bytes < bytes) {  // grow: emptied first, so an allocation that throws leaves nothing dangling
    if (kept.data) c10::free_cpu(kept.data);
    kept.data = nullptr;
    kept.bytes = 0;
    kept.data = c10::alloc_cpu(bytes);
    kept.bytes = bytes;
  }
  kept.leased = true;
  data_ = kept.data;
}

size_t kept_scratch_bytes() { return kept.bytes; }

ScratchLease::~ScratchLease() {
  if (owned_)
    c10::free_cpu(data_);
  else
    kept.leased = false;
}

}  // namespace rnn_fused
