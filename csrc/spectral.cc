// Fused spectral linear layers: see spectral.h for the notation.
#include "spectral.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

#include "fwht.h"
#include "fwht_serial.h"

namespace dreidel {
namespace {

// Below this many values (rows * blocks * length * depth; twice that for the backward pass) a second thread
// costs more than it saves. Measured on a 2-core Xeon with AVX-512, LinearWHT forward+backward at 2 threads:
// lowering this from 2^17 to 2^15 made 512 x 64 (width x batch) 1.10x, 1024 x 64 1.18x and 256 x 256 1.16x
// faster, and 2^14..2^12 changed nothing further (256 x 64, 256 x 32, 256 x 8 within 2%). (On a 2-core
// Zen 3, 2^17 had been chosen because 256 x 256 and 1024 x 64 gained nothing from a second thread there.)
constexpr int64_t kMinParallelValues = int64_t(1) << 15;

using Acc = double;  // parameter gradients are sums over rows: accumulate them in double

// The per-row loops (gathers, scalings, gradient sums; the transforms call the dispatched FWHT kernels) are
// compiled for x86-64-v4 (AVX-512), -v3 (AVX2, FMA) and the baseline, and the loader picks the widest the
// CPU runs (GCC function multiversioning: one symbol per clone, so no code built for one level is shared
// with another). Measured on a Xeon with AVX-512, 1 thread, LinearWHT(256) at batch 64: forward 18.3 ->
// 9.8 us, backward 41.7 -> 22.1 us. The clone follows the CPU, not the `isa` argument (which picks the FWHT
// kernels), and the -v3/-v4 clones contract multiply-adds into FMAs, so results can differ in the last bits
// between CPUs. GCC 12 or later (the first to take arch= levels here); other compilers build one baseline copy.
#if defined(DREIDEL_X86) && defined(__ELF__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DREIDEL_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DREIDEL_ROW_CLONES
#endif

int threads_for(int64_t rows, int64_t units, int threads) {
  if (rows * units < kMinParallelValues) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(usable_threads(threads), rows)));
}

// Tables built once per call and shared by every thread: where each entry of a stage reads from, and the
// scale it is multiplied by, so that a row's gather is one indexed load and one multiply per entry.
template <class T>
struct Gathers {
  std::vector<int32_t> first_index;  // width: the position of x that a_1[i] reads (0 for a padded entry)
  std::vector<T> first_scale;        // width: s_in at that position (0 for a padded entry)
  std::vector<int32_t> padded;       // the entries of a_1 that stand for padding: set to 0 after the gather, since
                                     // 0 * x[0] is NaN where x[0] is infinite (the dense map gives +-inf there)
  std::vector<T> inner_scale;        // (depth - 1) * width: s_k[perm_{k+1}[i]], the scale a_{k+1}[i] gets
  // For the backward pass, which gathers with the inverse permutations so that its writes are sequential:
  std::vector<int32_t> first_inverse;  // blocks * n: the entry of a_1 (flat) that reads x_i in block b
  std::vector<int32_t> inverse;        // (depth - 1) * width: the i with perm_{k+1}[i] = q, at q

  explicit Gathers(const SpectralLayer<T>& l) {
    const int64_t len = l.length, width = l.blocks * len;
    first_index.resize(static_cast<size_t>(width));
    first_scale.resize(static_cast<size_t>(width));
    for (int64_t b = 0; b < l.blocks; ++b)
      for (int64_t j = 0; j < len; ++j) {
        const int64_t i = l.perm[b * len + j] - b * len;
        const bool padded = i >= l.in;
        first_index[static_cast<size_t>(b * len + j)] = padded ? 0 : static_cast<int32_t>(i);
        first_scale[static_cast<size_t>(b * len + j)] = padded ? T(0) : l.in_scale[b * l.in + i];
        if (padded) this->padded.push_back(static_cast<int32_t>(b * len + j));
      }
    inner_scale.resize(static_cast<size_t>((l.depth - 1) * width));
    for (int64_t k = 1; k < l.depth; ++k)
      for (int64_t i = 0; i < width; ++i)
        inner_scale[static_cast<size_t>((k - 1) * width + i)] = l.inner_scale[(k - 1) * width + l.perm[k * width + i]];
  }

  void add_inverses(const SpectralLayer<T>& l) {
    const int64_t len = l.length, width = l.blocks * len;
    first_inverse.resize(static_cast<size_t>(l.blocks * l.in));
    for (int64_t b = 0; b < l.blocks; ++b)
      for (int64_t j = 0; j < len; ++j) {
        const int64_t i = l.perm[b * len + j] - b * len;
        if (i < l.in) first_inverse[static_cast<size_t>(b * l.in + i)] = static_cast<int32_t>(b * len + j);
      }
    inverse.resize(static_cast<size_t>((l.depth - 1) * width));
    for (int64_t k = 1; k < l.depth; ++k)
      for (int64_t i = 0; i < width; ++i)
        inverse[static_cast<size_t>((k - 1) * width + l.perm[k * width + i])] = static_cast<int32_t>(i);
  }
};

// One thread's buffers and transform.
template <class T>
struct Workspace {
  SerialFwht<T> transform;
  int64_t width;           // blocks * length
  std::vector<T> stages;   // stage_count * width: h_1 ... h_depth of the current row
  std::vector<T> buffer;   // 2 * width: the backward pass's running gradient and its permuted copy

  Workspace(const SpectralLayer<T>& l, Isa isa, int64_t stage_count)
      : transform(l.length, l.m, l.hadamard_m, T(1) / std::sqrt(T(l.length)), isa),
        width(l.blocks * l.length),
        stages(static_cast<size_t>(stage_count * l.blocks * l.length)),
        buffer(static_cast<size_t>(2 * l.blocks * l.length)) {}

  T* stage(int64_t k) { return stages.data() + k * width; }
};

// h_1 ... h_depth of row x into ws.stages (or, with `keep_all` false, only the last one, ping-ponging
// between the first two slots). Returns h_depth. Always inlined, so that each clone of its callers builds
// these loops for its own level.
template <class T>
__attribute__((always_inline)) inline T* run_stages(const SpectralLayer<T>& l, const Gathers<T>& g,
                                                    const T* __restrict x, Workspace<T>& ws, bool keep_all) {
  const int64_t width = ws.width;
  T* a = ws.stage(0);
  {
    const int32_t* __restrict index = g.first_index.data();
    const T* __restrict scale = g.first_scale.data();
    for (int64_t i = 0; i < width; ++i) a[i] = scale[i] * x[index[i]];
    for (const int32_t i : g.padded) a[i] = T(0);
  }
  ws.transform(a, a, l.blocks);
  for (int64_t k = 1; k < l.depth; ++k) {
    T* __restrict next = ws.stage(keep_all ? k : k % 2);
    const int32_t* __restrict p = l.perm + k * width;
    const T* __restrict scale = g.inner_scale.data() + (k - 1) * width;
    for (int64_t i = 0; i < width; ++i) next[i] = scale[i] * a[p[i]];
    ws.transform(next, next, l.blocks);
    a = next;
  }
  return a;
}

// One row of the forward pass: y (out) for x (n).
template <class T>
DREIDEL_ROW_CLONES void forward_row(const SpectralLayer<T>& l, const Gathers<T>& gathers, const T* __restrict x,
                                    T* __restrict y, Workspace<T>& ws) {
  const T* __restrict h = run_stages(l, gathers, x, ws, false);
  if (l.bias != nullptr)
    for (int64_t j = 0; j < l.out; ++j) y[j] = l.out_scale[j] * h[j] + l.bias[j];
  else
    for (int64_t j = 0; j < l.out; ++j) y[j] = l.out_scale[j] * h[j];
}

// Parameter-gradient accumulators of one group, in the layout of SpectralGrads (one group).
template <class T>
struct Accumulators {
  std::vector<Acc> in_scale, inner_scale, out_scale, bias;

  explicit Accumulators(const SpectralLayer<T>& l)
      : in_scale(static_cast<size_t>(l.blocks * l.in)),
        inner_scale(static_cast<size_t>((l.depth - 1) * l.blocks * l.length)),
        out_scale(static_cast<size_t>(l.out)),
        bias(static_cast<size_t>(l.out)) {}

  void zero() {
    for (auto* v : {&in_scale, &inner_scale, &out_scale, &bias}) std::fill(v->begin(), v->end(), Acc(0));
  }
  void add(const Accumulators& other) {
    for (auto [dst, src] : {std::pair{&in_scale, &other.in_scale}, std::pair{&inner_scale, &other.inner_scale},
                            std::pair{&out_scale, &other.out_scale}, std::pair{&bias, &other.bias}})
      for (size_t i = 0; i < dst->size(); ++i) (*dst)[i] += (*src)[i];
  }
  // Write into group g of the outputs.
  void store(const SpectralGrads<T>& g, int64_t group) const {
    auto put = [](const std::vector<Acc>& from, T* to) {
      if (to != nullptr)
        for (size_t i = 0; i < from.size(); ++i) to[i] = static_cast<T>(from[i]);
    };
    put(in_scale, g.in_scale + group * int64_t(in_scale.size()));
    if (g.inner_scale != nullptr) put(inner_scale, g.inner_scale + group * int64_t(inner_scale.size()));
    put(out_scale, g.out_scale + group * int64_t(out_scale.size()));
    if (g.bias != nullptr) put(bias, g.bias + group * int64_t(bias.size()));
  }
};

// The backward pass of one row: adds its parameter gradients to acc and writes its input gradient (if
// grad_x is not null). Needs gathers.add_inverses.
template <class T>
DREIDEL_ROW_CLONES void backward_row(const SpectralLayer<T>& l, const Gathers<T>& gathers, const T* __restrict x,
                                     const T* __restrict g, T* __restrict grad_x, Workspace<T>& ws,
                                     Accumulators<T>& acc) {
  const int64_t n = l.in, width = ws.width, out = l.out;
  const T* __restrict last = run_stages(l, gathers, x, ws, true);
  {
    Acc* __restrict bias = acc.bias.data();
    Acc* __restrict out_scale = acc.out_scale.data();
    for (int64_t j = 0; j < out; ++j) {
      bias[j] += Acc(g[j]);
      out_scale[j] += Acc(g[j]) * Acc(last[j]);
    }
  }
  T* d = ws.buffer.data();  // ∂h_k, then ∂a_k = H ∂h_k
  T* u = d + width;
  for (int64_t j = 0; j < out; ++j) d[j] = l.out_scale[j] * g[j];
  std::fill(d + out, d + width, T(0));
  for (int64_t k = l.depth - 1; k >= 1; --k) {
    ws.transform(d, d, l.blocks);
    // a_k[i] = s_{k-1}[q] h_{k-1}[q] with q = perm_k[i]; walk q in order, reading ∂a_k at i = inverse[q].
    const int32_t* __restrict inverse = gathers.inverse.data() + (k - 1) * width;
    const T* __restrict s = l.inner_scale + (k - 1) * width;
    const T* __restrict h = ws.stage(k - 1);
    const T* __restrict dk = d;
    T* __restrict next = u;
    Acc* __restrict gs = acc.inner_scale.data() + (k - 1) * width;
    for (int64_t q = 0; q < width; ++q) {
      const T v = dk[inverse[q]];
      gs[q] += Acc(v) * Acc(h[q]);
      next[q] = v * s[q];
    }
    std::swap(d, u);
  }
  ws.transform(d, d, l.blocks);
  for (int64_t b = 0; b < l.blocks; ++b) {
    const int32_t* __restrict inverse = gathers.first_inverse.data() + b * n;
    const T* __restrict s = l.in_scale + b * n;
    const T* __restrict d1 = d;
    Acc* __restrict gs = acc.in_scale.data() + b * n;
    if (grad_x == nullptr) {
      for (int64_t i = 0; i < n; ++i) gs[i] += Acc(d1[inverse[i]]) * Acc(x[i]);
    } else if (b == 0) {
      for (int64_t i = 0; i < n; ++i) {
        const T v = d1[inverse[i]];
        gs[i] += Acc(v) * Acc(x[i]);
        grad_x[i] = v * s[i];
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const T v = d1[inverse[i]];
        gs[i] += Acc(v) * Acc(x[i]);
        grad_x[i] += v * s[i];
      }
    }
  }
}

template <class T>
void check_or_throw(const SpectralLayer<T>& l, Isa isa) {
  if (const char* err = spectral_check(l)) throw std::invalid_argument(err);
  if (!isa_available(isa)) throw std::invalid_argument("requested ISA is not available on this CPU");
}

// Buffers are allocated before the parallel region, so that a failure raises instead of terminating.
template <class T>
std::vector<Workspace<T>> workspaces(int team, const SpectralLayer<T>& l, Isa isa, int64_t stage_count) {
  std::vector<Workspace<T>> out;
  out.reserve(static_cast<size_t>(team));
  for (int t = 0; t < team; ++t) out.emplace_back(l, isa, stage_count);
  return out;
}

template <class T>
void forward(const SpectralLayer<T>& l, const T* x, T* y, int64_t rows, int threads, Isa isa) {
  check_or_throw(l, isa);
  if (rows <= 0) return;
  const int64_t width = l.blocks * l.length;
  const int team = threads_for(rows, width * l.depth, threads);
  const Gathers<T> gathers(l);
  std::vector<Workspace<T>> spaces = workspaces(team, l, isa, std::min<int64_t>(l.depth, 2));
#pragma omp parallel num_threads(team) if (team > 1)
  {
    Workspace<T>& ws = spaces[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) forward_row(l, gathers, x + r * l.in, y + r * l.out, ws);
  }
}

template <class T>
void backward(const SpectralLayer<T>& l, const T* x, const T* grad_y, int64_t rows, const SpectralGrads<T>& grads,
              int threads, Isa isa) {
  check_or_throw(l, isa);
  if (rows < 0 || grads.groups < 1 || rows % grads.groups != 0)
    throw std::invalid_argument("rows must be a non-negative multiple of groups");
  if ((grads.inner_scale == nullptr) != (l.depth == 1))
    throw std::invalid_argument("grads.inner_scale must be given exactly when depth > 1");
  const int64_t per_group = rows / grads.groups;
  const int64_t width = l.blocks * l.length;
  Gathers<T> gathers(l);
  gathers.add_inverses(l);
  auto grad_x_of = [&](int64_t r) { return grads.input != nullptr ? grads.input + r * l.in : nullptr; };

  // groups == 1: one sum over all rows; each thread sums a contiguous range, then the partial sums are
  // added in thread order (deterministic for a given thread count). Otherwise (e.g. per-sample gradients)
  // each group belongs to one thread.
  const bool one_sum = grads.groups == 1;
  int team = threads_for(rows, width * l.depth * 2, threads);
  if (!one_sum) team = static_cast<int>(std::min<int64_t>(team, grads.groups));
  std::vector<Accumulators<T>> partial(static_cast<size_t>(team), Accumulators<T>(l));
  std::vector<Workspace<T>> spaces = workspaces(team, l, isa, l.depth);
#pragma omp parallel num_threads(team) if (team > 1)
  {
    Workspace<T>& ws = spaces[static_cast<size_t>(omp_get_thread_num())];
    Accumulators<T>& acc = partial[static_cast<size_t>(omp_get_thread_num())];
    if (one_sum) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r)
        backward_row(l, gathers, x + r * l.in, grad_y + r * l.out, grad_x_of(r), ws, acc);
    } else {
#pragma omp for schedule(static)
      for (int64_t group = 0; group < grads.groups; ++group) {
        acc.zero();
        for (int64_t r = group * per_group; r < (group + 1) * per_group; ++r)
          backward_row(l, gathers, x + r * l.in, grad_y + r * l.out, grad_x_of(r), ws, acc);
        acc.store(grads, group);
      }
    }
  }
  if (one_sum) {
    for (size_t t = 1; t < partial.size(); ++t) partial[0].add(partial[t]);
    partial[0].store(grads, 0);
  }
}

}  // namespace

template <class T>
const char* spectral_check(const SpectralLayer<T>& l) {
  if (l.in < 1 || l.out < 1 || l.blocks < 1 || l.depth < 1) return "in, out, blocks and depth must be positive";
  if (const char* err = fwht_check(l.length, l.m)) return err;
  if (l.in > l.length) return "in must be at most length";
  // the flat offsets (k * blocks + b) * length stay below depth * blocks * length: it must fit 64 bits
  if (l.blocks > INT64_MAX / l.length || l.depth > INT64_MAX / (l.blocks * l.length))
    return "depth * blocks * length overflows 64 bits";
  if (l.out > l.blocks * l.length) return "out must be at most blocks * length";
  if (l.perm == nullptr || l.in_scale == nullptr || l.out_scale == nullptr) return "missing perm or scales";
  if ((l.inner_scale == nullptr) != (l.depth == 1)) return "inner_scale must be given exactly when depth > 1";
  if (l.m > 1 && l.hadamard_m == nullptr) return "missing hadamard_m";
  // Every index must stay in its own block (this keeps the gathers and scatters in bounds) and appear once
  // (the backward pass inverts the permutations).
  std::vector<char> seen(static_cast<size_t>(l.length));
  for (int64_t k = 0; k < l.depth; ++k)
    for (int64_t b = 0; b < l.blocks; ++b) {
      const int32_t* p = l.perm + (k * l.blocks + b) * l.length;
      std::fill(seen.begin(), seen.end(), char(0));
      for (int64_t j = 0; j < l.length; ++j) {
        const int64_t i = int64_t(p[j]) - b * l.length;
        if (i < 0 || i >= l.length) return "perm has an index outside its block";
        if (seen[static_cast<size_t>(i)]) return "perm repeats an index within a block: not a permutation";
        seen[static_cast<size_t>(i)] = 1;
      }
    }
  return nullptr;
}

template const char* spectral_check(const SpectralLayer<float>&);
template const char* spectral_check(const SpectralLayer<double>&);

void spectral_forward(const SpectralLayer<float>& l, const float* x, float* y, int64_t rows, int threads, Isa isa) {
  forward(l, x, y, rows, threads, isa);
}
void spectral_forward(const SpectralLayer<double>& l, const double* x, double* y, int64_t rows, int threads, Isa isa) {
  forward(l, x, y, rows, threads, isa);
}
void spectral_backward(const SpectralLayer<float>& l, const float* x, const float* grad_y, int64_t rows,
                       const SpectralGrads<float>& grads, int threads, Isa isa) {
  backward(l, x, grad_y, rows, grads, threads, isa);
}
void spectral_backward(const SpectralLayer<double>& l, const double* x, const double* grad_y, int64_t rows,
                       const SpectralGrads<double>& grads, int threads, Isa isa) {
  backward(l, x, grad_y, rows, grads, threads, isa);
}

}  // namespace dreidel
