// Python bindings for the native core. Only binds: all logic lives in the kernels and in dreidel.algo.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <omp.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fwht.h"
#include "isa.h"
#include "spectral.h"

namespace nb = nanobind;

namespace {

dreidel::Isa parse_isa(const std::string& name) {
  if (name == "auto") return dreidel::best_isa();
  if (name == "portable") return dreidel::Isa::portable;
  if (name == "avx2") return dreidel::Isa::avx2;
  if (name == "avx512") return dreidel::Isa::avx512;
  throw std::invalid_argument("isa must be 'auto', 'portable', 'avx2' or 'avx512', got '" + name + "'");
}

template <class T>
using Buffer = nb::ndarray<T, nb::c_contig, nb::device::cpu>;

template <class T>
void fwht_binding(Buffer<const T> src, Buffer<T> dst, int64_t n, Buffer<const T> hadamard_m, double scale,
                  int threads, const std::string& isa) {
  if (src.size() != dst.size()) throw std::invalid_argument("src and dst must have the same number of elements");
  if (n <= 0 || src.size() % static_cast<size_t>(n) != 0)
    throw std::invalid_argument("the buffer size must be a multiple of n");
  const int64_t m = hadamard_m.ndim() == 2 ? static_cast<int64_t>(hadamard_m.shape(0)) : -1;
  if (m < 1 || static_cast<int64_t>(hadamard_m.shape(1)) != m)
    throw std::invalid_argument("hadamard_m must be a square m x m matrix");
  if (const char* err = dreidel::fwht_check(n, static_cast<int>(m))) throw std::invalid_argument(err);
  const dreidel::Isa chosen = parse_isa(isa);
  const dreidel::FwhtProblem<T> problem{src.data(), dst.data(), static_cast<int64_t>(src.size()) / n, n,
                                        static_cast<int>(m), hadamard_m.data(), static_cast<T>(scale)};
  nb::gil_scoped_release release;
  dreidel::fwht(problem, threads, chosen);
}

// The same transform at raw addresses, for the eager path of dreidel.algo.fwht. Making ndarrays of torch
// tensors on every call (NumPy views or DLPack) costs more than the rest of the call: Tensor.numpy() takes
// 1 us warm, but 40-60 us right after a 16 MB copy has pushed the interpreter's code and objects out of the
// caches, which made a whole 16 MB in-place transform 7% slower (Zen 3); even the cached m x m matrix cost
// 7 us cold as an ndarray argument. The caller has checked what the ndarray casts of fwht() check: CPU,
// C-contiguous, the dtype (float64 or float32), rows * n elements at src and dst, m * m at hadamard_m.
template <class T>
void fwht_at(uintptr_t src, uintptr_t dst, int64_t rows, int64_t n, uintptr_t hadamard_m, int m, double scale,
             int threads) {
  if (rows < 0) throw std::invalid_argument("rows must be >= 0");
  if (const char* err = dreidel::fwht_check(n, m)) throw std::invalid_argument(err);
  if (rows == 0) return;
  if (rows > INT64_MAX / n) throw std::invalid_argument("rows * n overflows 64 bits");
  for (uintptr_t address : {src, dst, hadamard_m})
    if (address == 0 || address % alignof(T) != 0)
      throw std::invalid_argument("src, dst and hadamard_m must be non-null addresses aligned to the element size");
  const dreidel::FwhtProblem<T> problem{reinterpret_cast<const T*>(src), reinterpret_cast<T*>(dst), rows, n, m,
                                        reinterpret_cast<const T*>(hadamard_m), static_cast<T>(scale)};
  nb::gil_scoped_release release;
  dreidel::fwht(problem, threads, dreidel::best_isa());
}

void fwht_at_binding(uintptr_t src, uintptr_t dst, int64_t rows, int64_t n, uintptr_t hadamard_m, int m, double scale,
                     int threads, bool float64) {
  if (float64)
    fwht_at<double>(src, dst, rows, n, hadamard_m, m, scale, threads);
  else
    fwht_at<float>(src, dst, rows, n, hadamard_m, m, scale, threads);
}

// An empty array stands for an absent optional argument.
template <class A>
auto data_or_null(const A& a) -> decltype(a.data()) {
  return a.size() == 0 ? nullptr : a.data();
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// The layer description from its arrays: in_scale (blocks, n), inner_scale ((depth - 1) * blocks * L
// values, or empty), out_scale (out), bias (out, or empty), perm (depth, blocks * L) int32.
template <class T>
dreidel::SpectralLayer<T> spectral_layer(Buffer<const T> in_scale, Buffer<const T> inner_scale,
                                         Buffer<const T> out_scale, Buffer<const T> bias,
                                         Buffer<const int32_t> perm, Buffer<const T> hadamard_m) {
  require(in_scale.ndim() == 2, "in_scale must be (blocks, in_features)");
  require(perm.ndim() == 2, "perm must be (depth, blocks * length)");
  dreidel::SpectralLayer<T> l{};
  l.blocks = static_cast<int64_t>(in_scale.shape(0));
  l.in = static_cast<int64_t>(in_scale.shape(1));
  l.depth = static_cast<int64_t>(perm.shape(0));
  require(l.blocks > 0 && perm.shape(1) % static_cast<size_t>(l.blocks) == 0, "perm width must be blocks * length");
  l.length = static_cast<int64_t>(perm.shape(1)) / l.blocks;
  l.out = static_cast<int64_t>(out_scale.size());
  require(inner_scale.size() == static_cast<size_t>((l.depth - 1) * l.blocks * l.length),
          "inner_scale must hold (depth - 1) * blocks * length values");
  require(bias.size() == 0 || bias.size() == static_cast<size_t>(l.out), "bias must be empty or hold out_features values");
  require(hadamard_m.ndim() == 2 && hadamard_m.shape(0) == hadamard_m.shape(1), "hadamard_m must be square");
  l.m = static_cast<int>(hadamard_m.shape(0));
  l.hadamard_m = hadamard_m.data();
  l.perm = perm.data();
  l.in_scale = in_scale.data();
  l.inner_scale = data_or_null(inner_scale);
  l.out_scale = out_scale.data();
  l.bias = data_or_null(bias);
  return l;  // the kernels run dreidel::spectral_check themselves
}

template <class T>
void spectral_forward_binding(Buffer<const T> x, Buffer<T> y, Buffer<const T> in_scale, Buffer<const T> inner_scale,
                              Buffer<const T> out_scale, Buffer<const T> bias, Buffer<const int32_t> perm,
                              Buffer<const T> hadamard_m, int threads, const std::string& isa) {
  const auto l = spectral_layer(in_scale, inner_scale, out_scale, bias, perm, hadamard_m);
  require(x.ndim() == 2 && x.shape(1) == static_cast<size_t>(l.in), "x must be (rows, in_features)");
  const int64_t rows = static_cast<int64_t>(x.shape(0));
  require(y.ndim() == 2 && y.shape(0) == x.shape(0) && y.shape(1) == static_cast<size_t>(l.out),
          "y must be (rows, out_features)");
  const dreidel::Isa chosen = parse_isa(isa);
  nb::gil_scoped_release release;
  dreidel::spectral_forward(l, x.data(), y.data(), rows, threads, chosen);
}

template <class T>
void spectral_backward_binding(Buffer<const T> x, Buffer<const T> grad_y, Buffer<const T> in_scale,
                               Buffer<const T> inner_scale, Buffer<const T> out_scale, Buffer<const int32_t> perm,
                               Buffer<const T> hadamard_m, Buffer<T> grad_input, Buffer<T> grad_in_scale,
                               Buffer<T> grad_inner_scale, Buffer<T> grad_out_scale, Buffer<T> grad_bias,
                               int64_t groups, int threads, const std::string& isa) {
  const Buffer<const T> no_bias;
  const auto l = spectral_layer(in_scale, inner_scale, out_scale, no_bias, perm, hadamard_m);
  require(x.ndim() == 2 && x.shape(1) == static_cast<size_t>(l.in), "x must be (rows, in_features)");
  const int64_t rows = static_cast<int64_t>(x.shape(0));
  require(grad_y.ndim() == 2 && grad_y.shape(0) == x.shape(0) && grad_y.shape(1) == static_cast<size_t>(l.out),
          "grad_y must be (rows, out_features)");
  require(groups >= 1 && rows % groups == 0, "rows must be a positive multiple of groups");
  auto holds = [](size_t size, int64_t count) { return size == static_cast<size_t>(count); };
  require(grad_input.size() == 0 || holds(grad_input.size(), rows * l.in), "grad_input must be empty or (rows, in_features)");
  require(holds(grad_in_scale.size(), groups * l.blocks * l.in), "grad_in_scale must be (groups, blocks, in_features)");
  require(holds(grad_inner_scale.size(), groups * (l.depth - 1) * l.blocks * l.length),
          "grad_inner_scale must be (groups, depth - 1, blocks, length)");
  require(holds(grad_out_scale.size(), groups * l.out), "grad_out_scale must be (groups, out_features)");
  require(grad_bias.size() == 0 || holds(grad_bias.size(), groups * l.out), "grad_bias must be empty or (groups, out_features)");
  const dreidel::SpectralGrads<T> grads{groups, data_or_null(grad_input), grad_in_scale.data(),
                                        data_or_null(grad_inner_scale), grad_out_scale.data(), data_or_null(grad_bias)};
  const dreidel::Isa chosen = parse_isa(isa);
  nb::gil_scoped_release release;
  dreidel::spectral_backward(l, x.data(), grad_y.data(), rows, grads, threads, chosen);
}

// Both dtypes' spectral bindings (nanobind picks the overload by the arrays' dtype).
template <class T>
void def_spectral(nb::module_& m) {
  m.def("spectral_forward", &spectral_forward_binding<T>, nb::arg("x").noconvert(), nb::arg("y").noconvert(),
        nb::arg("in_scale").noconvert(), nb::arg("inner_scale").noconvert(), nb::arg("out_scale").noconvert(),
        nb::arg("bias").noconvert(), nb::arg("perm").noconvert(), nb::arg("hadamard_m").noconvert(), nb::arg("threads"),
        nb::arg("isa") = "auto",
        "spectral_forward(x, y, in_scale, inner_scale, out_scale, bias, perm, hadamard_m, threads, isa='auto')\n\n"
        "y = the spectral linear layer (csrc/spectral.h) applied to each row of x (rows, in). in_scale is\n"
        "(blocks, in), perm (depth, blocks * length) int32 with block offsets; empty arrays stand for no\n"
        "inner_scale (depth 1) or no bias. All buffers C-contiguous, one float dtype.");
  m.def("spectral_backward", &spectral_backward_binding<T>, nb::arg("x").noconvert(), nb::arg("grad_y").noconvert(),
        nb::arg("in_scale").noconvert(), nb::arg("inner_scale").noconvert(), nb::arg("out_scale").noconvert(),
        nb::arg("perm").noconvert(), nb::arg("hadamard_m").noconvert(), nb::arg("grad_input").noconvert(),
        nb::arg("grad_in_scale").noconvert(), nb::arg("grad_inner_scale").noconvert(),
        nb::arg("grad_out_scale").noconvert(), nb::arg("grad_bias").noconvert(), nb::arg("groups"), nb::arg("threads"),
        nb::arg("isa") = "auto",
        "spectral_backward(x, grad_y, in_scale, inner_scale, out_scale, perm, hadamard_m, grad_input,\n"
        "                  grad_in_scale, grad_inner_scale, grad_out_scale, grad_bias, groups, threads, isa='auto')\n\n"
        "Overwrites the gradient buffers; parameter gradients are summed within `groups` equal consecutive\n"
        "groups of rows (1: the usual sum; rows: per-sample). Empty grad_input / grad_bias: not computed.");
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (auto isa : {dreidel::Isa::portable, dreidel::Isa::avx2, dreidel::Isa::avx512})
    if (dreidel::isa_available(isa)) out.emplace_back(dreidel::isa_name(isa));
  return out;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "dreidel native core: FWHT and fused spectral-layer kernels (C++17, OpenMP, runtime SIMD dispatch)";
  const char* fwht_doc =
      "fwht(src, dst, n, hadamard_m, scale, threads, isa='auto')\n\n"
      "dst = scale * (H_m kron H_{n/m}) src for every contiguous row of length n. src and dst are\n"
      "C-contiguous CPU buffers of equal size (they may be the same buffer); hadamard_m is m x m.";
  m.def("fwht", &fwht_binding<float>, nb::arg("src").noconvert(), nb::arg("dst").noconvert(), nb::arg("n"), nb::arg("hadamard_m").noconvert(),
        nb::arg("scale"), nb::arg("threads"), nb::arg("isa") = "auto", fwht_doc);
  m.def("fwht", &fwht_binding<double>, nb::arg("src").noconvert(), nb::arg("dst").noconvert(), nb::arg("n"), nb::arg("hadamard_m").noconvert(),
        nb::arg("scale"), nb::arg("threads"), nb::arg("isa") = "auto");
  m.def("fwht_at", &fwht_at_binding, nb::arg("src_address"), nb::arg("dst_address"), nb::arg("rows"), nb::arg("n"),
        nb::arg("hadamard_m_address"), nb::arg("m"), nb::arg("scale"), nb::arg("threads"), nb::arg("float64"),
        "fwht_at(src_address, dst_address, rows, n, hadamard_m_address, m, scale, threads, float64)\n\n"
        "fwht() on rows * n contiguous elements at raw addresses (Tensor.data_ptr()), float64 or float32.\n"
        "Internal: the caller must have checked that each address holds that many elements of that dtype.");
  def_spectral<float>(m);
  def_spectral<double>(m);
  m.def("best_isa", [] { return std::string(dreidel::isa_name(dreidel::best_isa())); },
        "The widest instruction set compiled in and supported by this CPU.");
  m.def("available_isas", &available_isas, "Instruction sets compiled in and supported by this CPU.");
  m.def("openmp_max_threads", [] { return omp_get_max_threads(); });
}
