// Python bindings for the native core. Only binds: all logic lives in the kernels and in dreidel.algo.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <omp.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache.h"
#include "fwht.h"
#include "isa.h"
#include "memory.h"
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

// The CPU the passes are chosen for: this one, or, for tests, another one's L2 size and L1 ways (-1: this
// CPU's value).
dreidel::CacheGeometry cache_for(int64_t l2_bytes, int l1d_ways) {
  dreidel::CacheGeometry cache = dreidel::host_cache_geometry();
  if (l2_bytes < -1 || l1d_ways < -1) throw std::invalid_argument("l2_bytes and l1d_ways must be >= 0, or -1 for this CPU's");
  if (l2_bytes >= 0) cache.l2_bytes = l2_bytes;
  if (l1d_ways >= 0) cache.l1d_ways = l1d_ways;
  return cache;
}

template <class T>
void fwht_binding(Buffer<const T> src, Buffer<T> dst, int64_t n, Buffer<const T> hadamard_m, double scale,
                  int threads, const std::string& isa, int64_t l2_bytes, int l1d_ways, int64_t interleave) {
  if (src.size() != dst.size()) throw std::invalid_argument("src and dst must have the same number of elements");
  for (const void* address : {static_cast<const void*>(src.data()), static_cast<const void*>(dst.data()),
                              static_cast<const void*>(hadamard_m.data())})
    if (reinterpret_cast<uintptr_t>(address) % alignof(T) != 0)
      throw std::invalid_argument("src, dst and hadamard_m must be aligned to the element size");
  const T* src_end = src.data() + src.size();
  if (src.data() != dst.data() && src.data() < dst.data() + dst.size() && dst.data() < src_end)
    throw std::invalid_argument("src and dst overlap without being the same buffer");
  // The plan reads H_m while the transform writes dst (mix_dense): a matrix inside dst would be overwritten
  const T* h_end = hadamard_m.data() + hadamard_m.size();
  if (hadamard_m.size() > 0 && hadamard_m.data() < dst.data() + dst.size() && dst.data() < h_end)
    throw std::invalid_argument("hadamard_m overlaps dst");
  if (interleave < 1) throw std::invalid_argument("interleave must be at least 1");
  if (n <= 0 || n > INT64_MAX / interleave || src.size() % static_cast<size_t>(n * interleave) != 0)
    throw std::invalid_argument("the buffer size must be a multiple of n * interleave");
  const int64_t m = hadamard_m.ndim() == 2 ? static_cast<int64_t>(hadamard_m.shape(0)) : -1;
  if (m < 1 || static_cast<int64_t>(hadamard_m.shape(1)) != m)
    throw std::invalid_argument("hadamard_m must be a square m x m matrix");
  if (const char* err = dreidel::fwht_check(n, static_cast<int>(m))) throw std::invalid_argument(err);
  const dreidel::Isa chosen = parse_isa(isa);
  const dreidel::CacheGeometry cache = cache_for(l2_bytes, l1d_ways);
  const int64_t rows = static_cast<int64_t>(src.size()) / (n * interleave);
  const dreidel::FwhtProblem<T> problem{src.data(), dst.data(), rows, n, static_cast<int>(m), hadamard_m.data(),
                                        static_cast<T>(scale), interleave};
  nb::gil_scoped_release release;
  dreidel::fwht(problem, threads, chosen, cache);
}

// The same transform at raw addresses, for the eager path of dreidel.algo.fwht. Making ndarrays of torch
// tensors on every call (NumPy views or DLPack) costs more than the rest of the call: Tensor.numpy() takes
// 1 us warm, but 40-60 us right after a 16 MB copy has pushed the interpreter's code and objects out of the
// caches, which made a whole 16 MB in-place transform 7% slower (Zen 3); even the cached m x m matrix cost
// 7 us cold as an ndarray argument. The caller has checked what the ndarray casts of fwht() check: CPU,
// C-contiguous, the dtype (float64 or float32), rows * n * interleave elements at src and dst, m * m at
// hadamard_m.
template <class T>
void fwht_at(uintptr_t src, uintptr_t dst, int64_t rows, int64_t n, uintptr_t hadamard_m, int m, double scale,
             int threads, int64_t interleave) {
  if (rows < 0) throw std::invalid_argument("rows must be >= 0");
  if (interleave < 1) throw std::invalid_argument("interleave must be at least 1");
  if (const char* err = dreidel::fwht_check(n, m)) throw std::invalid_argument(err);
  if (rows == 0) return;
  if (interleave > INT64_MAX / n / static_cast<int64_t>(sizeof(T)) ||
      rows > INT64_MAX / (n * interleave) / static_cast<int64_t>(sizeof(T)))
    throw std::invalid_argument("rows * n * interleave elements overflow 64 bits of bytes");
  for (uintptr_t address : {src, dst, hadamard_m})
    if (address == 0 || address % alignof(T) != 0)
      throw std::invalid_argument("src, dst and hadamard_m must be non-null addresses aligned to the element size");
  const dreidel::FwhtProblem<T> problem{reinterpret_cast<const T*>(src), reinterpret_cast<T*>(dst), rows, n, m,
                                        reinterpret_cast<const T*>(hadamard_m), static_cast<T>(scale), interleave};
  nb::gil_scoped_release release;
  dreidel::fwht(problem, threads, dreidel::best_isa());
}

void fwht_at_binding(uintptr_t src, uintptr_t dst, int64_t rows, int64_t n, uintptr_t hadamard_m, int m, double scale,
                     int threads, bool float64, int64_t interleave) {
  if (float64)
    fwht_at<double>(src, dst, rows, n, hadamard_m, m, scale, threads, interleave);
  else
    fwht_at<float>(src, dst, rows, n, hadamard_m, m, scale, threads, interleave);
}

// The spectral layer kernels at raw addresses too (the eager path of dreidel.layers), for the reason given at
// fwht_at: at batch 1 the NumPy views of the layer's eight buffers cost several times the kernel itself.
// `layer` is (in, out, length, blocks, depth, m, in_scale, inner_scale, out_scale, bias, perm, hadamard_m):
// the sizes of csrc/spectral.h, then the addresses of the buffers (0 for an absent inner_scale or bias).
// The caller (dreidel.layers._spectral_native) has checked that every address holds a C-contiguous CPU
// buffer of that size and of the layer's dtype (perm: int32); the kernels check the sizes' consistency and
// every permutation entry (spectral_check) before any other access.
using LayerAt = std::array<uint64_t, 12>;

// Non-null and aligned, or (where allowed) 0 for an absent buffer.
template <class T>
T* pointer_at(uint64_t address, const char* name, bool optional) {
  if (address == 0 && optional) return nullptr;
  if (address == 0 || address % alignof(T) != 0)
    throw std::invalid_argument(std::string(name) + " must be a non-null address aligned to its element size");
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

int64_t size_at(uint64_t value) {
  if (value > uint64_t(INT64_MAX)) throw std::invalid_argument("spectral layer sizes must fit in int64");
  return static_cast<int64_t>(value);
}

template <class T>
dreidel::SpectralLayer<T> spectral_layer_at(const LayerAt& a) {
  dreidel::SpectralLayer<T> l{};
  l.in = size_at(a[0]);
  l.out = size_at(a[1]);
  l.length = size_at(a[2]);
  l.blocks = size_at(a[3]);
  l.depth = size_at(a[4]);
  if (a[5] > 28) throw std::invalid_argument("m must be 1, 12, 20 or 28");
  l.m = static_cast<int>(a[5]);
  l.in_scale = pointer_at<const T>(a[6], "in_scale", false);
  l.inner_scale = pointer_at<const T>(a[7], "inner_scale", true);
  l.out_scale = pointer_at<const T>(a[8], "out_scale", false);
  l.bias = pointer_at<const T>(a[9], "bias", true);
  l.perm = pointer_at<const int32_t>(a[10], "perm", false);
  l.hadamard_m = pointer_at<const T>(a[11], "hadamard_m", false);
  return l;  // the kernels run dreidel::spectral_check themselves
}

template <class T>
void spectral_forward_at(uint64_t x, uint64_t y, int64_t rows, const LayerAt& layer, int threads) {
  const auto l = spectral_layer_at<T>(layer);
  const T* xp = pointer_at<const T>(x, "x", rows == 0);  // no rows: an empty tensor's address may be 0
  T* yp = pointer_at<T>(y, "y", rows == 0);
  nb::gil_scoped_release release;
  dreidel::spectral_forward(l, xp, yp, rows, threads, dreidel::best_isa());
}

// grads: the addresses of (input, in_scale, inner_scale, out_scale, bias); 0 for input or bias: not computed.
template <class T>
void spectral_backward_at(uint64_t x, uint64_t grad_y, int64_t rows, const LayerAt& layer,
                          const std::array<uint64_t, 5>& grads, int64_t groups, int threads) {
  const auto l = spectral_layer_at<T>(layer);  // rows and groups: checked by the kernel
  const T* xp = pointer_at<const T>(x, "x", rows == 0);
  const T* gp = pointer_at<const T>(grad_y, "grad_y", rows == 0);
  const dreidel::SpectralGrads<T> g{groups, pointer_at<T>(grads[0], "grad_input", true),
                                    pointer_at<T>(grads[1], "grad_in_scale", false),
                                    pointer_at<T>(grads[2], "grad_inner_scale", l.depth == 1),
                                    pointer_at<T>(grads[3], "grad_out_scale", false),
                                    pointer_at<T>(grads[4], "grad_bias", true)};
  nb::gil_scoped_release release;
  dreidel::spectral_backward(l, xp, gp, rows, g, threads, dreidel::best_isa());
}

void spectral_forward_binding(uint64_t x, uint64_t y, int64_t rows, const LayerAt& layer, int threads, bool float64) {
  if (float64)
    spectral_forward_at<double>(x, y, rows, layer, threads);
  else
    spectral_forward_at<float>(x, y, rows, layer, threads);
}

void spectral_backward_binding(uint64_t x, uint64_t grad_y, int64_t rows, const LayerAt& layer,
                               const std::array<uint64_t, 5>& grads, int64_t groups, int threads, bool float64) {
  if (float64)
    spectral_backward_at<double>(x, grad_y, rows, layer, grads, groups, threads);
  else
    spectral_backward_at<float>(x, grad_y, rows, layer, grads, groups, threads);
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
      "fwht(src, dst, n, hadamard_m, scale, threads, isa='auto', l2_bytes=-1, l1d_ways=-1, interleave=1)\n\n"
      "dst = scale * (H_m kron H_{n/m}) src for every contiguous row of length n; with interleave c, for\n"
      "every column of each block of n rows of c values (a dimension other than the last). src and dst are\n"
      "C-contiguous CPU buffers of equal size (the same buffer, or apart); hadamard_m is m x m. Their memory is\n"
      "read as it is: a torch tensor's lazy negation or conjugation bit is not seen (dreidel.fwht resolves it).\n"
      "l2_bytes and l1d_ways (-1: this CPU's) choose the passes another CPU would take, for tests.";
  m.def("fwht", &fwht_binding<float>, nb::arg("src").noconvert(), nb::arg("dst").noconvert(), nb::arg("n"), nb::arg("hadamard_m").noconvert(),
        nb::arg("scale"), nb::arg("threads"), nb::arg("isa") = "auto", nb::arg("l2_bytes") = -1,
        nb::arg("l1d_ways") = -1, nb::arg("interleave") = 1, fwht_doc);
  m.def("fwht", &fwht_binding<double>, nb::arg("src").noconvert(), nb::arg("dst").noconvert(), nb::arg("n"), nb::arg("hadamard_m").noconvert(),
        nb::arg("scale"), nb::arg("threads"), nb::arg("isa") = "auto", nb::arg("l2_bytes") = -1,
        nb::arg("l1d_ways") = -1, nb::arg("interleave") = 1);
  m.def("fwht_at", &fwht_at_binding, nb::arg("src_address"), nb::arg("dst_address"), nb::arg("rows"), nb::arg("n"),
        nb::arg("hadamard_m_address"), nb::arg("m"), nb::arg("scale"), nb::arg("threads"), nb::arg("float64"),
        nb::arg("interleave") = 1,
        "fwht_at(src_address, dst_address, rows, n, hadamard_m_address, m, scale, threads, float64, interleave=1)\n\n"
        "fwht() on rows * n * interleave contiguous elements at raw addresses (Tensor.data_ptr()), float64 or\n"
        "float32.\n"
        "Internal: the caller must have checked that each address holds that many elements of that dtype.");
  m.def("spectral_forward_at", &spectral_forward_binding, nb::arg("x_address"), nb::arg("y_address"), nb::arg("rows"),
        nb::arg("layer"), nb::arg("threads"), nb::arg("float64"),
        "spectral_forward_at(x_address, y_address, rows, layer, threads, float64)\n\n"
        "y (rows, out) = the spectral linear layer (csrc/spectral.h) applied to each row of x (rows, in). layer:\n"
        "(in, out, length, blocks, depth, m, in_scale, inner_scale, out_scale, bias, perm, hadamard_m), sizes\n"
        "then addresses (0: no inner_scale / bias). Internal: the caller must have checked every buffer.");
  m.def("spectral_backward_at", &spectral_backward_binding, nb::arg("x_address"), nb::arg("grad_y_address"),
        nb::arg("rows"), nb::arg("layer"), nb::arg("grads"), nb::arg("groups"), nb::arg("threads"), nb::arg("float64"),
        "spectral_backward_at(x_address, grad_y_address, rows, layer, grads, groups, threads, float64)\n\n"
        "Overwrites the gradient buffers at grads = (input, in_scale, inner_scale, out_scale, bias) addresses\n"
        "(0: input / bias not computed); parameter gradients are summed within `groups` equal consecutive\n"
        "groups of rows (1: the usual sum; rows: per-sample). Internal, as spectral_forward_at.");
  m.def("advise_huge_pages",
        [](uintptr_t address, size_t bytes) { return dreidel::advise_huge_pages(reinterpret_cast<void*>(address), bytes); },
        nb::arg("address"), nb::arg("bytes"),
        "advise_huge_pages(address, bytes) -> bool\n\n"
        "Asks Linux to back the 2 MB-aligned part of the bytes at address with transparent huge pages when\n"
        "first written (madvise MADV_HUGEPAGE): only advice, the contents are unchanged. Internal: for buffers\n"
        "dreidel has just allocated and is about to fill. False where madvise was not called or refused it.");
  m.def("mostly_on_huge_pages",
        [](uintptr_t address, size_t bytes) {
          return dreidel::mostly_on_huge_pages(reinterpret_cast<const void*>(address), bytes);
        },
        nb::arg("address"), nb::arg("bytes"),
        "mostly_on_huge_pages(address, bytes) -> bool\n\n"
        "Whether more than half of the bytes at address are on huge pages, as Linux 6.7+ reports it (PAGEMAP_SCAN);\n"
        "False where it cannot tell. Internal: the transform picks its passes over long rows by it.");
  m.def("bytes_equal",
        [](uintptr_t a, uintptr_t b, size_t bytes) {
          return bytes == 0 || std::memcmp(reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b), bytes) == 0;
        },
        nb::arg("a"), nb::arg("b"), nb::arg("bytes"),
        "bytes_equal(a, b, bytes) -> bool\n\n"
        "Whether the bytes at the two addresses are the same (memcmp). Internal: for a layer to notice, in about\n"
        "a microsecond, that a buffer it derived indices from was rewritten where its version counter does not\n"
        "see (through .data or a NumPy view).");
  m.def("cache_geometry",
        [] {
          const dreidel::CacheGeometry cache = dreidel::host_cache_geometry();
          return std::make_pair(cache.l2_bytes, cache.l1d_ways);
        },
        "cache_geometry() -> (l2_bytes, l1d_ways)\n\n"
        "A core's L2 size in bytes and the associativity of its L1 data cache, as the C library reports them\n"
        "(0: not reported). The FWHT chooses its passes over long rows by them.");
  m.def("best_isa", [] { return std::string(dreidel::isa_name(dreidel::best_isa())); },
        "The widest instruction set compiled in and supported by this CPU.");
  m.def("available_isas", &available_isas, "Instruction sets compiled in and supported by this CPU.");
  m.def("openmp_max_threads", [] { return omp_get_max_threads(); });
}
