// Included first by the AVX2 and AVX512 kernel files, before they switch instruction set.
//
// Why a pragma and not compiler flags: setuptools and torch.utils.cpp_extension compile every
// source of an extension with the same flags, and the extension must load on any x86-64
// processor. So kernels_cpu_avx2.cpp / kernels_cpu_avx512.cpp are compiled with the ordinary
// flags and raise the instruction set with `#pragma GCC target` around kernels_cpu.h only; the
// harness picks the build at run time, as ATen picks its own kernels. Two details follow:
//
// 1. Every header outside at::vec is parsed here, before the pragma. Their inline functions are
//    then baseline code in every object file, so the linker, which keeps one copy of each, can
//    never hand baseline code an AVX512 copy. (at::vec itself lives in a namespace named after
//    the instruction set, CPU_CAPABILITY, so its copies never merge.)
// 2. GCC does not define __AVX__ / __AVX2__ / __AVX512F__ under a target pragma, and sleef.h,
//    which at::vec includes, declares its 256- and 512-bit functions only under those macros.
//    at::vec's Vectorized<float> names them (in exp(), sin(), ...; our kernels call none), so
//    sleef.h is included here once with the macros set. <immintrin.h> must come before that:
//    GCC's own intrinsic headers read the same macros.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <ostream>
#include <tuple>
#include <type_traits>

#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#ifndef __AVX__
#define __AVX__ 1
#define ZENITH_FUSED_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define ZENITH_FUSED_UNDEF_AVX2
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#define ZENITH_FUSED_UNDEF_AVX512F
#endif

#include <sleef.h>

#ifdef ZENITH_FUSED_UNDEF_AVX
#undef __AVX__
#undef ZENITH_FUSED_UNDEF_AVX
#endif
#ifdef ZENITH_FUSED_UNDEF_AVX2
#undef __AVX2__
#undef ZENITH_FUSED_UNDEF_AVX2
#endif
#ifdef ZENITH_FUSED_UNDEF_AVX512F
#undef __AVX512F__
#undef ZENITH_FUSED_UNDEF_AVX512F
#endif
