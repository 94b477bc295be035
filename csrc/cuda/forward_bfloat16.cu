// The forward kernels of bfloat16 logits, every member and target form: a
// translation unit of their own, so that a build compiles the dtypes side by side
// (kernels.cuh).
#include "kernels.cuh"

namespace focal::cuda {

int64_t forward_grid_bfloat16(const FocalParams& p, int device) { return typed_forward_grid<c10::BFloat16>(p, device); }

void forward_bfloat16(const FocalParams& p, int device, void* partials, int64_t nblocks, void* out) {
  typed_forward<c10::BFloat16>(p, device, partials, nblocks, out);
}

}  // namespace focal::cuda
