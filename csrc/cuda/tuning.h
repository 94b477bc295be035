// The CUDA kernels' tuning choices, in one place. Each is a compile-time knob
// with the measured (or, where marked, reasoned) default, and each can be
// overridden at build time: FOCAL_CUDA_TUNING="ROW_PACKS_F32=1 LABEL_ROWS=0"
// in the environment of setup.py becomes -DFOCAL_CUDA_ROW_PACKS_F32=1
// -DFOCAL_CUDA_LABEL_ROWS=0. benchmarks/race_cuda.py builds the tree once per
// knob set and times the builds against each other; build_info() reports the
// overrides a build was made with.
#pragma once

// 16-byte packs per thread per grid-stride step in the general kernel: float32,
// and 16-bit logits. Measured on an H100 (COCO batch 16, labels, forward +
// backward): float32 two (1.02-1.06 ms against 1.19 with one); 16-bit one (8
// elements a pack already; two cost registers and gave 0.80 ms either way).
#ifndef FOCAL_CUDA_PACKS_F32
#define FOCAL_CUDA_PACKS_F32 2
#endif
#ifndef FOCAL_CUDA_PACKS_F16
#define FOCAL_CUDA_PACKS_F16 1
#endif

// Packs per thread per step of the label-rows kernel (loaded one step ahead).
// Not measured yet: the general kernel's counts, which fit both types' registers.
#ifndef FOCAL_CUDA_ROW_PACKS_F32
#define FOCAL_CUDA_ROW_PACKS_F32 FOCAL_CUDA_PACKS_F32
#endif
#ifndef FOCAL_CUDA_ROW_PACKS_F16
#define FOCAL_CUDA_ROW_PACKS_F16 FOCAL_CUDA_PACKS_F16
#endif

// 1: class labels with C >= the pack, no weight or one per row, run in the
// label-rows kernel; 0: every call runs in the general kernel.
#ifndef FOCAL_CUDA_LABEL_ROWS
#define FOCAL_CUDA_LABEL_ROWS 1
#endif

// Blocks of 256 threads per SM asked of ptxas for the label-rows kernel (a
// register cap of 64K / 256 / blocks). 0: per instantiation, the occupancy its
// natural register count allows (see kRowMinBlocks in kernels.cuh).
#ifndef FOCAL_CUDA_ROW_MIN_BLOCKS
#define FOCAL_CUDA_ROW_MIN_BLOCKS 0
#endif

// log1p(e) on the device: 1 refines the polynomial's reciprocal 1/(2 + e) by a
// Newton step (about 1 ulp); 0 uses rcp.approx alone, two FFMA per element
// fewer and up to ~1 ulp more relative error in log1p.
#ifndef FOCAL_CUDA_LOG1P_NEWTON
#define FOCAL_CUDA_LOG1P_NEWTON 1
#endif
