// Fused forward and backward of the spectral linear layers (dreidel.layers.LinearWHT, DeepSpectralLinear)
// on contiguous CPU buffers. No Python or PyTorch types.
//
// One row x (length n) of a layer with `blocks` stacked blocks of transform length L and `depth` stages:
//   a_1 = P_1 (s_in ⊙ pad(x)),  h_k = H a_k,  a_k = P_k (s_{k-1} ⊙ h_{k-1}) for k = 2..depth,
//   y = s_out ⊙ h_depth[:out] + b,
// with H the orthonormal transform of length L (fwht.h) applied to each block, and every vector of the
// stacked layout flattened to blocks * L. Each row is done start to finish while it sits in L1/L2: the
// gathers, transforms and scalings of all stages, and in the backward pass the recomputed stages and the
// gradients of every parameter, accumulated in double.
#pragma once

#include <cstdint>

#include "isa.h"

namespace dreidel {

template <class T>
struct SpectralLayer {
  int64_t in;             // n
  int64_t out;            // out <= blocks * length
  int64_t length;         // L = m * 2^k
  int64_t blocks;
  int64_t depth;
  int m;                  // 1, 12, 20 or 28
  const T* hadamard_m;    // m * m
  // depth * blocks * length: perm[k][i] is the flat index (block offset included, in [b*L, (b+1)*L) for
  // i in block b) that entry i of a_k reads. For k = 0 the index, less b*L, is a position of pad(x).
  const int32_t* perm;
  const T* in_scale;      // blocks * n
  const T* inner_scale;   // (depth - 1) * blocks * length, or nullptr when depth == 1
  const T* out_scale;     // out
  const T* bias;          // out, or nullptr
};

// Gradient outputs of spectral_backward. Rows are split into `groups` equal consecutive groups and each
// parameter gradient is summed within a group: groups == 1 is the ordinary backward pass, groups == batch
// gives per-sample gradients. Every non-null array is overwritten.
template <class T>
struct SpectralGrads {
  int64_t groups;
  T* input;        // rows * n, or nullptr (not wanted)
  T* in_scale;     // groups * blocks * n
  T* inner_scale;  // groups * (depth - 1) * blocks * length, or nullptr when depth == 1
  T* out_scale;    // groups * out
  T* bias;         // groups * out, or nullptr
};

// Returns an error message for inconsistent sizes or out-of-range permutation entries, or nullptr.
template <class T>
const char* spectral_check(const SpectralLayer<T>& layer);

// y (rows * out) = the layer applied to x (rows * n). `isa` picks the FWHT kernels; the per-row gathers and
// scalings run the widest copy the CPU supports (see spectral.cc).
void spectral_forward(const SpectralLayer<float>& layer, const float* x, float* y, int64_t rows, int threads, Isa isa);
void spectral_forward(const SpectralLayer<double>& layer, const double* x, double* y, int64_t rows, int threads, Isa isa);

// Gradients for x (rows * n) and grad_y (rows * out), the loss gradient at y. rows % groups must be 0.
void spectral_backward(const SpectralLayer<float>& layer, const float* x, const float* grad_y, int64_t rows,
                       const SpectralGrads<float>& grads, int threads, Isa isa);
void spectral_backward(const SpectralLayer<double>& layer, const double* x, const double* grad_y, int64_t rows,
                       const SpectralGrads<double>& grads, int threads, Isa isa);

}  // namespace dreidel
