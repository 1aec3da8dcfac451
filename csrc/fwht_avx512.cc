#include "fwht_kernel_impl.h"

// Compiled with -mavx512f -mavx512dq; only called when the CPU reports both.
DREIDEL_DEFINE_KERNELS(avx512, 64)
