#include "fwht_kernel_impl.h"

// SSE2 on x86-64, NEON on aarch64: 16-byte registers are everywhere.
DREIDEL_DEFINE_KERNELS(portable, 16)
