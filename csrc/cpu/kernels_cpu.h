// The ZENITH CPU kernels, written once over at::vec::Vectorized and compiled once per instruction
// set by kernels_cpu_{default,avx2,avx512}.cpp, each of which defines CPU_CAPABILITY (and so the
// inline namespace everything here lives in) before including this file.
//
// Arithmetic is in the compute type Acc<T> (zenith_fused.reference.compute_dtype): float for
// float, half and bfloat16 storage, double for double.
//
// sq_norm_partials (step 1 of zenith_fused/reference.py):
//     partials[c] = float32(sum over the elements i of chunk c of Acc(g[i])^2)
// momentum_update (step 4 of zenith_fused/reference.py), per element, in Acc:
//     d   = sign * (g * grad_multiplier) + weight_decay * p     (the add only when weight_decay != 0)
//     buf = d if first else momentum * buf + (1 - dampening) * d     (only when momentum != 0)
//     d   = d + momentum * buf if nesterov else buf                  (only when momentum != 0)
//     p   = p - (lr * lr_scale) * d
// with one rounding to the storage type at each store (round to nearest even). Every product and
// sum is a separate operation in the reference's order, and the build disables FMA contraction
// (-ffp-contract=off), so for equal lr_scale the results are bit-identical to the reference.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "multi_tensor_cpu.h"

namespace zenith_fused::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename T>
using AccVec = at::vec::Vectorized<Acc<T>>;
using Vec = at::vec::Vectorized<float>;

// ------------------------------------------------------------------ loads and stores
// The vector loops move 2 * AccVec<T>::size() elements at a time: for half and bfloat16 that is
// one Vectorized<T>, which converts to and from exactly two float vectors.
template <typename T>
inline void load_pair(const T* src, AccVec<T>& lo, AccVec<T>& hi) {
  if constexpr (std::is_same_v<T, Acc<T>>) {
    lo = AccVec<T>::loadu(src);
    hi = AccVec<T>::loadu(src + AccVec<T>::size());
  } else {
    at::vec::load_to_float<T>(src, lo, hi);
  }
}

template <typename T>
inline void store_pair(T* dst, const AccVec<T>& lo, const AccVec<T>& hi) {
  if constexpr (std::is_same_v<T, Acc<T>>) {
    lo.store(dst);
    hi.store(dst + AccVec<T>::size());
  } else {
    // Round to nearest even, as Tensor.to(dtype) does.
    at::vec::convert_from_float<T>(lo, hi).store(dst);
  }
}

// The update is elementwise, so its vector loop may hold a block's elements in any order as long
// as every load and store of the block agrees. For bfloat16 on AVX2 / AVX512 it uses that:
// an element is the top half of a float32, so one 32-bit lane of the raw data already holds an
// even element in its low half and an odd one in its high half. A shift gives the even elements
// as floats, a mask the odd ones, and a store merges them back in one three-way logic operation:
// about half the conversion instructions of at::vec's contiguous order (its widening, extracts,
// packs and cross-lane permutes), which is what bounds this loop on one core. The rounding is the
// same nearest-even as Tensor.to(torch.bfloat16); NaN is stored as 0x7fc0, as c10::BFloat16 does.
template <typename T>
inline void load_update_pair(const T* src, AccVec<T>& lo, AccVec<T>& hi) {
  load_pair(src, lo, hi);
}

template <typename T>
inline void store_update_pair(T* dst, const AccVec<T>& lo, const AccVec<T>& hi) {
  store_pair(dst, lo, hi);
}

#if defined(CPU_CAPABILITY_AVX512)
inline __m512i round_to_bfloat16_bits(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb);
  const __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  return _mm512_mask_blend_epi32(ordered, _mm512_set1_epi32(0x7fc00000), rounded);
}

template <>
inline void load_update_pair(const c10::BFloat16* src, Vec& even, Vec& odd) {
  const __m512i x = _mm512_loadu_si512(src);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

template <>
inline void store_update_pair(c10::BFloat16* dst, const Vec& even, const Vec& odd) {
#if defined(ZENITH_FUSED_AVX512_BF16)
  // VCVTNE2PS2BF16 rounds both vectors to nearest even in one instruction, where the integer
  // rounding below takes six per vector; the conversions bound the bfloat16 update once the
  // loads are prefetched. It differs from Tensor.to(torch.bfloat16) in two cases only: it reads
  // denormal inputs as zero, and it keeps a NaN's sign and payload where c10 stores 0x7fc0. A
  // pair with either takes the integer rounding. The result holds `even` in its low 256 bits and
  // `odd` in its high ones; one word permute interleaves them back into storage order.
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // VFPCLASSPS: quiet NaN, denormal, signalling NaN
  if ((_mm512_fpclass_ps_mask(even, kNanOrDenormal) | _mm512_fpclass_ps_mask(odd, kNanOrDenormal)) == 0) {
    // Word 2k of the result takes word k of `packed` (even[k]) and word 2k + 1 takes word 16 + k
    // (odd[k]): as 32-bit elements, element k of the index is (16 + k) << 16 | k.
    const __m512i interleave = _mm512_set_epi32(0x001f000f, 0x001e000e, 0x001d000d, 0x001c000c, 0x001b000b,
                                                0x001a000a, 0x00190009, 0x00180008, 0x00170007, 0x00160006,
                                                0x00150005, 0x00140004, 0x00130003, 0x00120002, 0x00110001,
                                                0x00100000);
    const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(interleave, packed));
    return;
  }
#endif
  const __m512i low = _mm512_srli_epi32(round_to_bfloat16_bits(even), 16);
  const __m512i high = round_to_bfloat16_bits(odd);
  // (high & 0xffff0000) | low
  _mm512_storeu_si512(dst, _mm512_ternarylogic_epi32(high, _mm512_set1_epi32(static_cast<int>(0xffff0000u)),
                                                     low, 0xEA));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256i round_to_bfloat16_bits(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb);
  const __m256 unordered = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), unordered));
}

template <>
inline void load_update_pair(const c10::BFloat16* src, Vec& even, Vec& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

template <>
inline void store_update_pair(c10::BFloat16* dst, const Vec& even, const Vec& odd) {
  const __m256i low = _mm256_srli_epi32(round_to_bfloat16_bits(even), 16);
  const __m256i high = _mm256_and_si256(round_to_bfloat16_bits(odd), _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_or_si256(high, low));
}
#endif

// ------------------------------------------------------------------ prefetch across pages
// On one core both loops are bound by how fast lines arrive from memory, and the hardware stream
// prefetchers stop at every 4 KiB page boundary: there each stream waits for a TLB miss and
// restarts its prefetch ramp, 256 times per MiB read. One software prefetch per stream and page,
// 16 pages ahead, walks the page table and starts the stream on that page before the loop gets
// there. Measured on the 2-core AMD EPYC (Zen 4) this package is developed on, ResNet-50 shapes,
// one thread, operator against operator in one process (bench/cpu_kernels.py): the float32 update
// went from 1.0x to 0.72-0.85x torch's fused SGD and the norm from 0.29x to 0.20-0.27x; bfloat16
// gained less (update 0.97x -> 0.86-0.90x). 8 to 32 pages ahead were all within the machine's
// noise of each other, 2 to 4 pages gave less, and prefetching every line instead of one per page
// was slower than no prefetch at all. A prefetch never faults, so the ones past the end of a
// tensor are harmless.
constexpr int64_t kPageBytes = 4096;
constexpr int64_t kPrefetchAheadBytes = 16 * kPageBytes;

// Whether element i of a chunk starts a new page's worth of elements: the loops below prefetch
// there, once per page and stream. Their step divides a page, so they meet every such i.
template <typename T>
inline bool page_step(int64_t i) {
  static_assert(kPageBytes % sizeof(T) == 0, "a page holds a whole number of elements");
  return (i & (kPageBytes / static_cast<int64_t>(sizeof(T)) - 1)) == 0;
}

template <typename T>
inline void prefetch_ahead(const T* ptr) {
  __builtin_prefetch(reinterpret_cast<const char*>(ptr) + kPrefetchAheadBytes, 0, 3);
}

// ------------------------------------------------------------------ squared norm
// Element i of a chunk always adds into lane i % kNormLanes, whatever the vector width, and the
// lanes are summed in one fixed tree: the partial has the same bits for any thread count and on
// any of the instruction-set builds. 32 lanes keep each lane's sum short (chunk / 32 terms).
constexpr int64_t kNormLanes = 32;

template <typename T>
float chunk_sq_norm(const T* g, int64_t size) {
  using A = Acc<T>;
  using V = AccVec<T>;
  alignas(64) A lanes[kNormLanes] = {};
  int64_t i = 0;
  constexpr int64_t kVecs = kNormLanes / V::size();
  static_assert(kVecs % 2 == 0, "the lanes must be a whole number of vector pairs");
  V acc[kVecs];
  for (auto& a : acc) {
    a = V(A(0));
  }
  static_assert((kPageBytes / sizeof(T)) % kNormLanes == 0, "the loop reaches every page boundary");
  for (; i + kNormLanes <= size; i += kNormLanes) {
    if (page_step<T>(i)) {
      prefetch_ahead(g + i);
    }
    for (int64_t k = 0; k < kVecs; k += 2) {
      V lo, hi;
      load_pair(g + i + k * V::size(), lo, hi);
      acc[k] = acc[k] + lo * lo;
      acc[k + 1] = acc[k + 1] + hi * hi;
    }
  }
  for (int64_t k = 0; k < kVecs; ++k) {
    acc[k].store(lanes + k * V::size());
  }
  for (; i < size; ++i) {
    const A x = static_cast<A>(g[i]);
    lanes[i % kNormLanes] += x * x;
  }
  for (int64_t width = kNormLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) {
      lanes[l] += lanes[l + width];
    }
  }
  return static_cast<float>(lanes[0]);
}

template <typename T>
void sq_norm_chunks(const void* const* grads, const Chunk* chunks, int64_t num_chunks, float* partials) {
  for (int64_t c = 0; c < num_chunks; ++c) {
    const Chunk& chunk = chunks[c];
    const T* g = static_cast<const T*>(grads[chunk.tensor]) + chunk.begin;
    partials[c] = chunk_sq_norm(g, chunk.size);
  }
}

// ------------------------------------------------------------------ momentum update
template <typename V, typename A>
struct Coefficients {
  // grad_multiplier * sign, exact (sign is +-1): (g * m) * s and g * (m * s) round identically,
  // because rounding to nearest even is symmetric about 0. One multiply per element fewer.
  V signed_grad_multiplier;
  V step_lr, momentum, one_minus_dampening, weight_decay;

  explicit Coefficients(const UpdateTensor<A>& t)
      : signed_grad_multiplier(t.grad_multiplier * t.sign),
        step_lr(t.step_lr),
        momentum(t.momentum),
        one_minus_dampening(t.one_minus_dampening),
        weight_decay(t.weight_decay) {}
};

// The math of one element (V = Acc) or one vector of elements (V = AccVec); the same code for
// both, so the vector body and the scalar tail round identically.
template <bool kWeightDecay, bool kMomentum, bool kFirst, bool kNesterov, typename V, typename A>
inline void zenith_step(V& p, const V& g, V& buf, const Coefficients<V, A>& c) {
  V d = g * c.signed_grad_multiplier;  // (g * grad_multiplier) * sign, see Coefficients
  if constexpr (kWeightDecay) {
    d = d + c.weight_decay * p;
  }
  if constexpr (kMomentum) {
    if constexpr (kFirst) {
      buf = d;
    } else {
      buf = c.momentum * buf + c.one_minus_dampening * d;
    }
    if constexpr (kNesterov) {
      d = d + c.momentum * buf;
    } else {
      d = buf;
    }
  }
  p = p - c.step_lr * d;
}

template <typename T, bool kWeightDecay, bool kMomentum, bool kFirst, bool kNesterov>
void update_chunk(const UpdateTensor<Acc<T>>& t, int64_t begin, int64_t size) {
  using A = Acc<T>;
  using V = AccVec<T>;
  T* p = static_cast<T*>(t.param) + begin;
  const T* g = static_cast<const T*>(t.grad) + begin;
  T* buf = kMomentum ? static_cast<T*>(t.momentum_buffer) + begin : nullptr;
  constexpr bool kReadsBuffer = kMomentum && !kFirst;  // a first step overwrites the buffer

  int64_t i = 0;
  {
    const Coefficients<V, A> c(t);
    constexpr int64_t kBlock = 2 * V::size();
    static_assert((kPageBytes / sizeof(T)) % kBlock == 0, "the loop reaches every page boundary");
    for (; i + kBlock <= size; i += kBlock) {
      if (page_step<T>(i)) {
        prefetch_ahead(p + i);
        prefetch_ahead(g + i);
        if constexpr (kReadsBuffer) {
          prefetch_ahead(buf + i);
        }
      }
      V p0, p1, g0, g1;
      V b0(A(0)), b1(A(0));
      load_update_pair(p + i, p0, p1);
      load_update_pair(g + i, g0, g1);
      if constexpr (kReadsBuffer) {
        load_update_pair(buf + i, b0, b1);
      }
      zenith_step<kWeightDecay, kMomentum, kFirst, kNesterov>(p0, g0, b0, c);
      zenith_step<kWeightDecay, kMomentum, kFirst, kNesterov>(p1, g1, b1, c);
      store_update_pair(p + i, p0, p1);
      if constexpr (kMomentum) {
        store_update_pair(buf + i, b0, b1);
      }
    }
  }
  const Coefficients<A, A> c(t);
  for (; i < size; ++i) {
    A pi = static_cast<A>(p[i]);
    A bi = A(0);
    if constexpr (kReadsBuffer) {
      bi = static_cast<A>(buf[i]);
    }
    zenith_step<kWeightDecay, kMomentum, kFirst, kNesterov>(pi, static_cast<A>(g[i]), bi, c);
    p[i] = static_cast<T>(pi);
    if constexpr (kMomentum) {
      buf[i] = static_cast<T>(bi);
    }
  }
}

// The options are per tensor, so they become template arguments once per chunk rather than
// branches per element.
template <typename T>
void update_chunks(const UpdateTensor<Acc<T>>* tensors, const Chunk* chunks, int64_t num_chunks) {
  for (int64_t c = 0; c < num_chunks; ++c) {
    const Chunk& chunk = chunks[c];
    const UpdateTensor<Acc<T>>& t = tensors[chunk.tensor];
    const bool weight_decay = t.weight_decay != 0;
    const int64_t b = chunk.begin;
    const int64_t n = chunk.size;
    if (t.momentum_buffer == nullptr) {
      if (weight_decay) {
        update_chunk<T, true, false, false, false>(t, b, n);
      } else {
        update_chunk<T, false, false, false, false>(t, b, n);
      }
      continue;
    }
    const int variant = (weight_decay ? 4 : 0) | (t.first ? 2 : 0) | (t.nesterov ? 1 : 0);
    switch (variant) {
      case 0: update_chunk<T, false, true, false, false>(t, b, n); break;
      case 1: update_chunk<T, false, true, false, true>(t, b, n); break;
      case 2: update_chunk<T, false, true, true, false>(t, b, n); break;
      case 3: update_chunk<T, false, true, true, true>(t, b, n); break;
      case 4: update_chunk<T, true, true, false, false>(t, b, n); break;
      case 5: update_chunk<T, true, true, false, true>(t, b, n); break;
      case 6: update_chunk<T, true, true, true, false>(t, b, n); break;
      default: update_chunk<T, true, true, true, true>(t, b, n); break;
    }
  }
}

// ------------------------------------------------------------------ entry points (KernelSet)
inline void sq_norm_partials(ScalarKind kind, const void* const* grads, const Chunk* chunks,
                             int64_t num_chunks, float* partials) {
  switch (kind) {
    case ScalarKind::Float: sq_norm_chunks<float>(grads, chunks, num_chunks, partials); break;
    case ScalarKind::Half: sq_norm_chunks<c10::Half>(grads, chunks, num_chunks, partials); break;
    case ScalarKind::BFloat16: sq_norm_chunks<c10::BFloat16>(grads, chunks, num_chunks, partials); break;
    case ScalarKind::Double: sq_norm_chunks<double>(grads, chunks, num_chunks, partials); break;
  }
}

inline void momentum_update(ScalarKind kind, const UpdateTensor<float>* tensors, const Chunk* chunks,
                            int64_t num_chunks) {
  switch (kind) {
    case ScalarKind::Float: update_chunks<float>(tensors, chunks, num_chunks); break;
    case ScalarKind::Half: update_chunks<c10::Half>(tensors, chunks, num_chunks); break;
    case ScalarKind::BFloat16: update_chunks<c10::BFloat16>(tensors, chunks, num_chunks); break;
    case ScalarKind::Double: break;  // momentum_update_f64
  }
}

inline void momentum_update_f64(const UpdateTensor<double>* tensors, const Chunk* chunks, int64_t num_chunks) {
  update_chunks<double>(tensors, chunks, num_chunks);
}

}  // namespace CPU_CAPABILITY
}  // namespace zenith_fused::cpu
