// The CPU multi-tensor harness: the choice of kernel build, and the parallel loop over chunks.
#include "multi_tensor_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace zenith_fused::cpu {
namespace {

// A chunk costs its elements plus a fixed overhead (tensor lookup, dispatch, a partial tail), so
// that many short chunks still spread over the threads.
constexpr int64_t kChunkOverhead = 256;
// Below this much work a second thread costs more to wake than it saves.
constexpr int64_t kMinParallelWork = 1 << 16;

KernelSet choose_kernels() {
  const std::string capability = at::get_cpu_capability();
  // ATEN_CPU_CAPABILITY=avx512 asks for ATen's AVX512 build, so for ours without the extension.
  const char* requested = std::getenv("ATEN_CPU_CAPABILITY");
  if (capability == "AVX512" && (requested == nullptr || *requested == '\0')) {
    const KernelSet k = avx512_bf16_kernels();
    if (k.momentum_update != nullptr) {
      return k;
    }
  }
  if (capability == "AVX512") {
    const KernelSet k = avx512_kernels();
    if (k.momentum_update != nullptr) {
      return k;
    }
  }
  if (capability == "AVX512" || capability == "AVX2") {
    const KernelSet k = avx2_kernels();
    if (k.momentum_update != nullptr) {
      return k;
    }
  }
  return default_kernels();
}

}  // namespace

const KernelSet& kernels() {
  static const KernelSet chosen = choose_kernels();
  return chosen;
}

void parallel_over_chunks(const std::vector<Chunk>& chunks,
                          const std::function<void(int64_t, int64_t)>& body) {
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  if (num_chunks == 0) {
    return;
  }
  int64_t total = 0;
  for (const Chunk& c : chunks) {
    total += c.size + kChunkOverhead;
  }
  const int64_t parts = std::min<int64_t>({at::get_num_threads(), num_chunks, total / kMinParallelWork});
  if (parts <= 1) {
    body(0, num_chunks);
    return;
  }
  // Cut where the running cost passes k / parts of the total.
  std::vector<int64_t> bounds(parts + 1, num_chunks);
  bounds[0] = 0;
  int64_t cost = 0;
  int64_t part = 1;
  for (int64_t c = 0; c < num_chunks && part < parts; ++c) {
    cost += chunks[c].size + kChunkOverhead;
    while (part < parts && cost * parts >= total * part) {
      bounds[part++] = c + 1;
    }
  }
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      if (bounds[p] < bounds[p + 1]) {
        body(bounds[p], bounds[p + 1]);
      }
    }
  });
}

}  // namespace zenith_fused::cpu
