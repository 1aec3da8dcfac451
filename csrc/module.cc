// Python bindings for the native core. Only binds: all logic lives in the kernels and in dreidel.algo.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <omp.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "fwht.h"
#include "isa.h"

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

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (auto isa : {dreidel::Isa::portable, dreidel::Isa::avx2, dreidel::Isa::avx512})
    if (dreidel::isa_available(isa)) out.emplace_back(dreidel::isa_name(isa));
  return out;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "dreidel native core: FWHT kernels (C++17, OpenMP, runtime SIMD dispatch)";
  const char* fwht_doc =
      "fwht(src, dst, n, hadamard_m, scale, threads, isa='auto')\n\n"
      "dst = scale * (H_m kron H_{n/m}) src for every contiguous row of length n. src and dst are\n"
      "C-contiguous CPU buffers of equal size (they may be the same buffer); hadamard_m is m x m.";
  m.def("fwht", &fwht_binding<float>, nb::arg("src").noconvert(), nb::arg("dst").noconvert(), nb::arg("n"), nb::arg("hadamard_m").noconvert(),
        nb::arg("scale"), nb::arg("threads"), nb::arg("isa") = "auto", fwht_doc);
  m.def("fwht", &fwht_binding<double>, nb::arg("src").noconvert(), nb::arg("dst").noconvert(), nb::arg("n"), nb::arg("hadamard_m").noconvert(),
        nb::arg("scale"), nb::arg("threads"), nb::arg("isa") = "auto");
  m.def("best_isa", [] { return std::string(dreidel::isa_name(dreidel::best_isa())); },
        "The widest instruction set compiled in and supported by this CPU.");
  m.def("available_isas", &available_isas, "Instruction sets compiled in and supported by this CPU.");
  m.def("openmp_max_threads", [] { return omp_get_max_threads(); });
}
