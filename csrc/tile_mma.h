// Warp-level matrix multiply-add (mma.sync m16n8k8, tf32 in, fp32 accumulate) as the
// composed-weight forward runs it (stencil_cells.h), and the same operation on the CPU.
//
// A warp phase (Exec::warps) is written once for both: its per-lane code sits in loops
// over the lanes [lane0, lane1) the caller runs, and its per-lane state in arrays of
// kLanes. On the GPU each thread runs its own lane (kLanes = 1, lane1 = lane0 + 1) and
// mma_tf32 is one instruction of the warp; on the CPU one call runs all 32 lanes
// (kLanes = 32) and mma_tf32 gathers their fragments into the 16 x 8 x 8 product, rounds
// the operands to tf32 as the GPU's conversion does and sums in fp32. The GPU's tensor
// cores sum a product's eight terms in an order (and with an internal precision) that is
// not published, so the two agree to fp32 rounding of each sum, not bit for bit.
//
// Fragment layout (PTX ISA, mma.m16n8k8 .tf32): lane = 4 g + t holds
//   A (16 x 8, row-major): a0 (row g, col t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
//   B (8 x 8, column-major): b0 (row t, col g), b1 (t + 4, g)
//   C (16 x 8): c0 (row g, col 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1).
#pragma once

#include <stdint.h>
#include <string.h>

#include "convlora_math.h"
#include "shared_array.h"

namespace convlora {
namespace tile {

#if defined(__CUDA_ARCH__)
constexpr int kLanes = 1;
#else
constexpr int kLanes = 32;
#endif

// The checked build counts and race-checks a warp phase's accesses per lane: thread
// 32 warp + lane makes the accesses that follow.
CONVLORA_HD void as_thread(int tid) {
#if defined(CONVLORA_CHECKED)
  if (g_shadow != nullptr) g_shadow->tid = tid;
#else
  (void)tid;
#endif
}

// x rounded to tf32 (10 mantissa bits; to nearest, ties away from zero): cvt.rna.tf32.f32.
CONVLORA_HD float tf32_round(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
  return __uint_as_float(u);
#else
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7F800000u) != 0x7F800000u) u = (u + 0x1000u) & 0xFFFFE000u;  // inf, NaN: kept
  float y;
  memcpy(&y, &u, 4);
  return y;
#endif
}

// The OR of v over the warp's 32 lanes, in every lane (redux.sync).
CONVLORA_HD int warp_or(const int (&v)[kLanes]) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  return static_cast<int>(__reduce_or_sync(0xffffffffu, static_cast<unsigned>(v[0])));
#else
  __trap();
  return 0;
#endif
#else
  int o = 0;
  for (int lane = 0; lane < 32; ++lane) o |= v[lane];
  return o;
#endif
}

// The least of v (non-negative) over the warp's 32 lanes, in every lane (redux.sync).
CONVLORA_HD int warp_min(const int (&v)[kLanes]) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  return static_cast<int>(__reduce_min_sync(0xffffffffu, static_cast<unsigned>(v[0])));
#else
  __trap();
  return 0;
#endif
#else
  int m = v[0];
  for (int lane = 1; lane < 32; ++lane) m = v[lane] < m ? v[lane] : m;
  return m;
#endif
}

// v += v of lane ^ mask, in every lane (shfl.sync.bfly): a lane and its partner get the
// same sum (addition commutes), so a butterfly of these is one fixed sum in all lanes.
CONVLORA_HD void warp_xor_add(float (&v)[kLanes], int mask) {
#if defined(__CUDA_ARCH__)
  v[0] += __shfl_xor_sync(0xffffffffu, v[0], mask);
#else
  float w[kLanes];
  for (int lane = 0; lane < 32; ++lane) w[lane] = v[lane];
  for (int lane = 0; lane < 32; ++lane) v[lane] = w[lane] + w[lane ^ mask];
#endif
}

// The index of x's lowest set bit (x != 0).
CONVLORA_HD int lowest_bit(int x) {
#if defined(__CUDA_ARCH__)
  return __ffs(x) - 1;
#else
  return __builtin_ctz(static_cast<unsigned>(x));
#endif
}

// c += a b for one m16n8k8 tile of the warp, the operands already tf32 (tf32_round).
CONVLORA_HD void mma_tf32(const float (&a)[kLanes][4], const float (&b)[kLanes][2],
                          float (&c)[kLanes][4]) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0][0]), "+f"(c[0][1]), "+f"(c[0][2]), "+f"(c[0][3])
      : "r"(__float_as_uint(a[0][0])), "r"(__float_as_uint(a[0][1])),
        "r"(__float_as_uint(a[0][2])), "r"(__float_as_uint(a[0][3])),
        "r"(__float_as_uint(b[0][0])), "r"(__float_as_uint(b[0][1])));
#else
  __trap();  // the host launches the MMA programs on sm_80 and later only
#endif
#else
#if defined(CONVLORA_CHECKED)
  if (g_shadow != nullptr && g_shadow->trace != nullptr) g_shadow->trace->mma(g_shadow->tid);
#endif
  float A[16][8], B[8][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    A[g][t] = tf32_round(a[lane][0]);
    A[g + 8][t] = tf32_round(a[lane][1]);
    A[g][t + 4] = tf32_round(a[lane][2]);
    A[g + 8][t + 4] = tf32_round(a[lane][3]);
    B[t][g] = tf32_round(b[lane][0]);
    B[t + 4][g] = tf32_round(b[lane][1]);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int q = 0; q < 4; ++q) {
      const int row = g + 8 * (q >> 1), col = 2 * t + (q & 1);
      float s = 0.f;
      for (int k = 0; k < 8; ++k) s += A[row][k] * B[k][col];
      c[lane][q] += s;
    }
  }
#endif
}

}  // namespace tile
}  // namespace convlora
