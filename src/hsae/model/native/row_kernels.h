// The row kernels shared by the native sources, defined in stack_constraint.cpp (compiled there
// for AVX-512, AVX2 + FMA and plain x86-64). torch rebuilds the extension when a source
// changes, not when this header does: change a declaration here together with its definition.
#pragma once

#include <cstdint>

namespace hsae_native {
float row_dot(const float* a, const float* b, int64_t d);
void row_axpy(float* y, float w, const float* x, int64_t d);
void row_prefetch(const float* x, int64_t d);
}  // namespace hsae_native
