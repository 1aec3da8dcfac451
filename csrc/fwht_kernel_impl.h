// The FWHT kernel, written once over GCC/Clang vector extensions and compiled per ISA.
//
// Include this from exactly one translation unit per ISA (fwht_portable.cc, fwht_avx2.cc, ...), each
// compiled with its own -m flags. Everything here has internal linkage, so the copies built for
// different ISAs never meet at link time.
//
// Structure (after FFHT, Andoni et al. 2015, "Practical and Optimal LSH for Angular Distance"):
//  * the strides below one SIMD register are done with in-register shuffles;
//  * the first pass also does the first log2(8) cross-register strides, so a row of up to 8 registers is
//    finished in one load/store;
//  * later strides go in radix-8 passes (three stages per load/store), which keeps the FP add units, not
//    the load/store ports, the bottleneck while the row is in cache.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "fwht_kernels.h"

namespace dreidel {
namespace {

template <class T, int Bytes>
struct Kernel {
  static constexpr int W = Bytes / static_cast<int>(sizeof(T));
  typedef T V __attribute__((vector_size(Bytes), aligned(sizeof(T)), __may_alias__));

  static inline V load(const T* p) { return *reinterpret_cast<const V*>(p); }
  static inline void store(T* p, V v) { *reinterpret_cast<V*>(p) = v; }

  // One butterfly stage at lane stride S inside a register: lane i pairs with lane i ^ S.
  template <int S, std::size_t... I>
  static inline V lane_stage(V v, std::index_sequence<I...>) {
    const V partner = __builtin_shufflevector(v, v, (static_cast<int>(I) ^ S)...);
    const V sign = {((static_cast<int>(I) & S) ? T(-1) : T(1))...};
    // lower lane: x_i + x_{i+S}; upper lane: x_{i-S} - x_i, the same operations as the scalar butterfly.
    return partner + v * sign;
  }

  static inline V lane_stages(V v) {
    constexpr auto lanes = std::make_index_sequence<W>{};
    if constexpr (W >= 2) v = lane_stage<1>(v, lanes);
    if constexpr (W >= 4) v = lane_stage<2>(v, lanes);
    if constexpr (W >= 8) v = lane_stage<4>(v, lanes);
    if constexpr (W >= 16) v = lane_stage<8>(v, lanes);
    return v;
  }

  // log2(R) butterfly stages across R registers held in `r`.
  template <int R>
  static inline void register_butterflies(V* r) {
    for (int h = 1; h < R; h <<= 1)
      for (int i = 0; i < R; i += 2 * h)
        for (int j = i; j < i + h; ++j) {
          const V a = r[j], b = r[j + h];
          r[j] = a + b;
          r[j + h] = a - b;
        }
  }

  template <int G>
  static void first_pass(const T* src, T* dst, int64_t nvec, T scale) {
    for (int64_t v0 = 0; v0 < nvec; v0 += G) {
      V r[G];
      for (int g = 0; g < G; ++g) r[g] = lane_stages(load(src + (v0 + g) * W) * scale);
      register_butterflies<G>(r);
      for (int g = 0; g < G; ++g) store(dst + (v0 + g) * W, r[g]);
    }
  }

  // Stages at register strides s, 2s, ..., (R/2)s over a row of nvec registers.
  template <int R>
  static void radix_pass(T* x, int64_t nvec, int64_t s) {
    for (int64_t base = 0; base < nvec; base += R * s)
      for (int64_t j = base; j < base + s; ++j) {
        V r[R];
        for (int i = 0; i < R; ++i) r[i] = load(x + (j + i * s) * W);
        register_butterflies<R>(r);
        for (int i = 0; i < R; ++i) store(x + (j + i * s) * W, r[i]);
      }
  }

  static void scalar_row(const T* src, T* dst, int64_t len, T scale) {
    for (int64_t i = 0; i < len; ++i) dst[i] = src[i] * scale;
    for (int64_t h = 1; h < len; h <<= 1)
      for (int64_t i = 0; i < len; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const T a = dst[j], b = dst[j + h];
          dst[j] = a + b;
          dst[j + h] = a - b;
        }
  }

  static void row_pow2(const T* src, T* dst, int64_t len, T scale) {
    if (len < W) return scalar_row(src, dst, len, scale);
    const int64_t nvec = len / W;
    int64_t s;
    if (nvec >= 8) {
      first_pass<8>(src, dst, nvec, scale);
      s = 8;
    } else if (nvec == 4) {
      first_pass<4>(src, dst, nvec, scale);
      s = 4;
    } else if (nvec == 2) {
      first_pass<2>(src, dst, nvec, scale);
      s = 2;
    } else {
      first_pass<1>(src, dst, nvec, scale);
      s = 1;
    }
    while (s < nvec) {
      const int64_t left = nvec / s;
      if (left >= 8) {
        radix_pass<8>(dst, nvec, s);
        s *= 8;
      } else if (left == 4) {
        radix_pass<4>(dst, nvec, s);
        s *= 4;
      } else {
        radix_pass<2>(dst, nvec, s);
        s *= 2;
      }
    }
  }

  // Stages at row strides s, ..., (R/2)s across `count` rows of `width` columns (width % W == 0).
  template <int R>
  static void column_radix_pass(T* x, int64_t count, int64_t stride, int64_t width, int64_t s) {
    for (int64_t base = 0; base < count; base += R * s)
      for (int64_t j = base; j < base + s; ++j)
        for (int64_t c = 0; c < width; c += W) {
          V r[R];
          for (int i = 0; i < R; ++i) r[i] = load(x + (j + i * s) * stride + c);
          register_butterflies<R>(r);
          for (int i = 0; i < R; ++i) store(x + (j + i * s) * stride + c, r[i]);
        }
  }

  static void columns_pow2(T* x, int64_t count, int64_t stride, int64_t width) {
    int64_t s = 1;
    while (s < count) {
      const int64_t left = count / s;
      if (left >= 8) {
        column_radix_pass<8>(x, count, stride, width, s);
        s *= 8;
      } else if (left == 4) {
        column_radix_pass<4>(x, count, stride, width, s);
        s *= 4;
      } else {
        column_radix_pass<2>(x, count, stride, width, s);
        s *= 2;
      }
    }
  }

  template <int M>
  static void mix_vectors(T* x, int64_t chunk, const T* h, int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; c += W) {
      V in[M];
      for (int a = 0; a < M; ++a) in[a] = load(x + a * chunk + c);
      for (int a = 0; a < M; ++a) {
        V acc = in[0] * h[a * M];
        for (int b = 1; b < M; ++b) acc += in[b] * h[a * M + b];
        store(x + a * chunk + c, acc);
      }
    }
  }

  static void mix_scalar(T* x, int m, int64_t chunk, const T* h, int64_t begin, int64_t end) {
    T in[32];
    for (int64_t c = begin; c < end; ++c) {
      for (int a = 0; a < m; ++a) in[a] = x[a * chunk + c];
      for (int a = 0; a < m; ++a) {
        T acc = in[0] * h[a * m];
        for (int b = 1; b < m; ++b) acc += in[b] * h[a * m + b];
        x[a * chunk + c] = acc;
      }
    }
  }

  static void mix_chunks(T* x, int m, int64_t chunk, const T* h, int64_t begin, int64_t end) {
    if (chunk % W != 0 || (end - begin) % W != 0) return mix_scalar(x, m, chunk, h, begin, end);
    switch (m) {
      case 12: return mix_vectors<12>(x, chunk, h, begin, end);
      case 20: return mix_vectors<20>(x, chunk, h, begin, end);
      case 28: return mix_vectors<28>(x, chunk, h, begin, end);
      default: return mix_scalar(x, m, chunk, h, begin, end);
    }
  }

  static const FwhtKernels<T>& table() {
    static const FwhtKernels<T> t{W, &row_pow2, &columns_pow2, &mix_chunks};
    return t;
  }
};

}  // namespace
}  // namespace dreidel

// Defines fwht_kernels_<name>_f32/_f64 for a translation unit compiled with a register width of `bytes`.
#define DREIDEL_DEFINE_KERNELS(name, bytes)                                                           \
  namespace dreidel {                                                                                 \
  const FwhtKernels<float>& fwht_kernels_##name##_f32() { return Kernel<float, bytes>::table(); }    \
  const FwhtKernels<double>& fwht_kernels_##name##_f64() { return Kernel<double, bytes>::table(); }  \
  }
