#include "fwht_kernel_impl.h"

// Compiled with -mavx2 -mfma (see CMakeLists.txt); only called when the CPU reports AVX2 and FMA.
DREIDEL_DEFINE_KERNELS(avx2, 32)
