// Top-k sampling of one (stream, codebook) row on the calling thread: guidance, the k largest
// logits, temperature, softmax and an inverse-CDF draw from a given uniform, over the
// vocabulary's few kilobytes in L1. The same maths as engine/sampling.py's top-k path (logits /
// temperature, then softmax over the survivors); after a decode step has streamed hundreds of
// megabytes through the caches, each PyTorch op of that path costs ~0.1 ms of cold dispatch,
// and a step samples with a dozen of them per stream. The vector parts are the ISA's.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "isa.h"

namespace er {

struct TopKScratch {
  std::vector<float> guided, probs;
  std::vector<int32_t> keys;
  std::vector<int64_t> ids;
  void fit(int64_t V) {
    const int64_t padded = (V + 15) / 16 * 16;
    guided.resize(padded), probs.resize(padded), keys.resize(padded), ids.resize(V);
  }
};

// cond [V] (and uncond [V] for a guided row, or nullptr) -> the drawn token. The k-th largest
// logit by bisection over the floats' ordered bits (32 vectorised counting passes, no sort);
// the candidates are taken in token order (the k largest, ties at the k-th by lower id), so a
// draw depends only on the row and its uniform u in [0, 1).
inline int64_t sample_top_k_row(const float* cond, const float* uncond, int64_t V, float scale,
                                float temperature, int64_t k, float u, TopKScratch& s) {
  float* g = s.guided.data();
  if (uncond == nullptr || scale == 1.0f)
    std::copy(cond, cond + V, g);
  else
    for (int64_t v = 0; v < V; ++v) g[v] = uncond[v] + (cond[v] - uncond[v]) * scale;
  const int64_t padded = (V + 15) / 16 * 16;
  int32_t* keys = s.keys.data();
  ordered_keys(g, V, keys);
  // the largest t with at least k keys >= t: the k-th largest key
  int64_t lo = INT32_MIN, hi = INT32_MAX;  // count(>= lo) >= k; count(> hi) < k
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (count_at_least(keys, padded, static_cast<int32_t>(mid)) >= k)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int32_t kth = static_cast<int32_t>(lo);
  int64_t ties = k - (kth == INT32_MAX ? 0 : count_at_least(keys, padded, kth + 1)), n = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (keys[v] > kth || (keys[v] == kth && ties-- > 0)) {
      s.ids[n] = v;
      s.probs[n++] = g[v] / temperature;
    }
  }
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) top = std::max(top, s.probs[j]);
  exp_shifted(s.probs.data(), n, top);
  double total = 0;
  for (int64_t j = 0; j < n; ++j) total += s.probs[j];
  const double target = u * total;
  double cdf = 0;
  for (int64_t j = 0; j < n; ++j) {
    cdf += s.probs[j];
    if (cdf > target) return s.ids[j];
  }
  return s.ids[n - 1];  // u * total rounded up to the sum
}

}  // namespace er
