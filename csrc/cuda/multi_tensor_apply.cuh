// The CUDA multi-tensor harness: many tensors per launch through a chunk table passed by value
// as the kernel argument (so a launch needs no host-to-device copy and no allocation).
//
// Every tensor is cut into chunks of chunk_size elements; each block of a launch handles one
// chunk, found through block_tensor / block_chunk. A table holds at most Meta::kMaxTensors
// tensors and Meta::kMaxBlocks blocks; when either fills up the launch goes out and the table
// starts again (a tensor cut by the boundary continues in slot 0 of the next table). The kernel
// argument stays under the 4 KiB every CUDA version accepts.
//
// Plain CUDA: no torch headers (see bindings_cuda.cpp for why).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace zenith_fused::cuda {

// `launch(meta, num_blocks, first_block)` is called for every full table and for the last one;
// first_block is the number of blocks launched before, so `first_block + blockIdx.x` numbers the
// chunks of the whole call in tensor order (the fixed slot of a chunk's norm partial).
// With `empty_tensors_get_a_block`, a tensor with no elements still gets one (empty) block, for
// kernels that must visit every tensor. Returns the first launch error.
template <typename Meta, typename Arg, typename Launch>
cudaError_t multi_tensor_apply(const Arg* args, int64_t num_tensors, int64_t chunk_size,
                               bool empty_tensors_get_a_block, Launch&& launch) {
  Meta meta;
  int tensors = 0;  // tensors in the table
  int blocks = 0;   // blocks in the table
  int64_t first_block = 0;
  auto flush = [&]() {
    launch(meta, blocks, first_block);
    first_block += blocks;
    blocks = 0;
    return cudaGetLastError();
  };
  for (int64_t t = 0; t < num_tensors; ++t) {
    int64_t chunks = (args[t].numel + chunk_size - 1) / chunk_size;
    if (chunks == 0) {
      if (!empty_tensors_get_a_block) {
        continue;
      }
      chunks = 1;
    }
    meta.set_tensor(tensors++, args[t]);
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[blocks] = static_cast<uint8_t>(tensors - 1);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = tensors == Meta::kMaxTensors && last_chunk;
      if (blocks == Meta::kMaxBlocks || tensors_full) {
        const cudaError_t err = flush();
        if (err != cudaSuccess) {
          return err;
        }
        if (last_chunk) {
          tensors = 0;
        } else {
          meta.set_tensor(0, args[t]);  // the rest of this tensor goes in the next table
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) {
    return flush();
  }
  return cudaSuccess;
}

}  // namespace zenith_fused::cuda
