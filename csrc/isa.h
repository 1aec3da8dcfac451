// Instruction-set levels the kernels are compiled for, and run-time detection of the best one.
#pragma once

namespace dreidel {

enum class Isa { portable = 0, avx2 = 1, avx512 = 2 };

// The widest instruction set this CPU (and OS) supports among those compiled in.
Isa best_isa();
// True when `isa` is compiled in and this CPU can run it.
bool isa_available(Isa isa);
const char* isa_name(Isa isa);

}  // namespace dreidel
