// The per-thread cache of packed W_hh (packed_cache.h says why and what).
#include "packed_cache.h"

#include <array>
#include <cstring>
#include <utility>
#include <vector>

namespace rnn_fused {
namespace {

constexpr int kEntries = 4;                          // a 4-layer stack, or 2 layers of 2 directions
constexpr int64_t kMaxFloats = int64_t(1) << 18;     // 1 MB of weights per entry (H = 512, one direction)

struct Entry {
  int64_t D = 0, H = 0;
  std::vector<float> weights;  // the D matrices the packed form was made from, back to back
  at::Tensor packed;
  uint64_t last_use = 0;
};

struct Cache {
  std::array<Entry, kEntries> entries;
  uint64_t clock = 0;
};

thread_local Cache cache;

bool holds(const Entry& e, const float* const* w, int64_t D, int64_t H) {
  if (!e.packed.defined() || e.D != D || e.H != H) return false;
  for (int64_t d = 0; d < D; ++d)
    if (std::memcmp(e.weights.data() + d * H * H, w[d], H * H * sizeof(float)) != 0) return false;
  return true;
}

}  // namespace

at::Tensor packed_weights(const float* const* w, int64_t D, int64_t H,
                          const std::function<at::Tensor(const float* const*)>& pack) {
  const uint64_t now = ++cache.clock;
  for (Entry& e : cache.entries) {
    if (holds(e, w, D, H)) {
      e.last_use = now;
      return e.packed;
    }
  }
  if (D * H * H > kMaxFloats) return pack(w);
  // A new entry, complete before it replaces the oldest (an allocation that throws leaves the cache as it
  // was), packed from its own copy (the header says why).
  Entry fresh;
  fresh.weights.resize(D * H * H);
  std::array<const float*, 2> copies{nullptr, nullptr};
  for (int64_t d = 0; d < D; ++d) {
    std::memcpy(fresh.weights.data() + d * H * H, w[d], H * H * sizeof(float));
    copies[d] = fresh.weights.data() + d * H * H;
  }
  fresh.packed = pack(copies.data());
  fresh.D = D;
  fresh.H = H;
  fresh.last_use = now;
  Entry* oldest = &cache.entries[0];
  for (Entry& e : cache.entries)
    if (e.last_use < oldest->last_use) oldest = &e;
  *oldest = std::move(fresh);
  return oldest->packed;
}

}  // namespace rnn_fused
