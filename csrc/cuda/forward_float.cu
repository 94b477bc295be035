// The forward kernels of float32 logits, every member and target form: a
// translation unit of their own, so that a build compiles the dtypes side by side
// (kernels.cuh).
#include "kernels.cuh"

namespace focal::cuda {

int64_t forward_grid_float(const FocalParams& p, int device) { return typed_forward_grid<float>(p, device); }

void forward_float(const FocalParams& p, int device, void* partials, int64_t nblocks, void* out) {
  typed_forward<float>(p, device, partials, nblocks, out);
}

}  // namespace focal::cuda
