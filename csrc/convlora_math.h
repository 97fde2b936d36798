// Scalar arithmetic of Conv-LoRA, shared by the CPU and CUDA backends.
//
// Everything here is a __host__ __device__ function of plain scalars, so the CPU
// backend (compiled by the host compiler) executes the very math the GPU runs. All
// arithmetic is in acc_t (float, or double for double inputs).
//
// For a token t = (b, h, w) routed to expert e with integer scale s
// (docs/design.md, "The math"):
//     E_s(z)_t = Down_s( GELU( Conv3x3_e( Up_s(z) ) ) )(h, w)
// Down_s samples the s·H x s·W conv output at source row (h + 0.5)·s - 0.5
// (one row for odd s, two or four for even s); each conv output needs a 3x3
// patch of the upsampled map (zero outside it); each upsampled value is a 2x2
// (bilinear) or 4x4 (bicubic, indices clamped) combination of z. So a token
// depends only on z within HALO rows/columns of itself: 1 for bilinear, 3 for
// bicubic. No upsampled map is ever stored.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define CONVLORA_HD __host__ __device__ __forceinline__
#else
#define CONVLORA_HD inline
#endif

namespace convlora {

constexpr int kMaxExperts = 16;
constexpr int kMaxScale = 16;
constexpr int kMaxRank = 64;
constexpr int kBilinear = 0;
constexpr int kBicubic = 1;

// Precision-matched libm calls: erff/expf/floorf for float, erf/exp/floor for
// double, the same names on host and device.
CONVLORA_HD float erf_t(float x) { return erff(x); }
CONVLORA_HD double erf_t(double x) { return ::erf(x); }
CONVLORA_HD float exp_t(float x) { return expf(x); }
CONVLORA_HD double exp_t(double x) { return ::exp(x); }
CONVLORA_HD float floor_t(float x) { return floorf(x); }
CONVLORA_HD double floor_t(double x) { return ::floor(x); }

// Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), as nn.GELU() computes it.
template <typename T>
CONVLORA_HD T gelu_erf(T x) {
  const T inv_sqrt2 = T(0.70710678118654752440);
  return T(0.5) * x * (T(1) + erf_t(x * inv_sqrt2));
}

// d/dx GELU(x) = Phi(x) + x phi(x).
template <typename T>
CONVLORA_HD T gelu_erf_grad(T x) {
  const T inv_sqrt2 = T(0.70710678118654752440);
  const T inv_sqrt_2pi = T(0.39894228040143267794);
  return T(0.5) * (T(1) + erf_t(x * inv_sqrt2)) + x * inv_sqrt_2pi * exp_t(T(-0.5) * x * x);
}

// Both at once, one erf: GELU(x) returned, GELU'(x) to slope (the same values as the two
// functions above; the forward saves the slope, which is all the backward needs of x).
template <typename T>
CONVLORA_HD T gelu_erf_and_grad(T x, T& slope) {
  const T inv_sqrt2 = T(0.70710678118654752440);
  const T inv_sqrt_2pi = T(0.39894228040143267794);
  const T cdf2 = T(1) + erf_t(x * inv_sqrt2);  // 2 Phi(x)
  slope = T(0.5) * cdf2 + x * inv_sqrt_2pi * exp_t(T(-0.5) * x * x);
  return T(0.5) * x * cdf2;
}

// The reciprocal and the power of two of the 16-bit GELU below: on the GPU one
// special-function-unit instruction each (rcp.approx, ex2.approx: within 2^-22 or so, for
// the arguments it gives them, d >= 1 and x <= 0), on the CPU the libm ones (the same
// formula; as with erff, not bit for bit the GPU's).
CONVLORA_HD float fast_rcp(float d) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return r;
#else
  return 1.f / d;
#endif
}
CONVLORA_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return exp2f(x);
#endif
}

// GELU(x) and GELU'(x) (to slope) for calls on 16-bit inputs, in float: 1 + erf(x / sqrt 2)
// from Abramowitz & Stegun 7.1.26, erfc(t) = k (a1 + k (a2 + ... + k a5)) e^(-t^2) with
// k = 1 / (1 + p |t|), whose e^(-t^2) is also the slope's phi(x) sqrt(2 pi): one exponential,
// one reciprocal and 12 multiply-adds for both, against erff's two polynomials and expf.
// The formula is within 1.5e-7 of erf; evaluated in float32, within 3.1e-7 of Phi(x) and
// GELU'(x) and 4.3e-7 of GELU(x) for |x| <= 20 (tests/test_backends.py holds it against
// float64, on the CPU and on the GPU), three orders below a float16 value's rounding and
// four below a bfloat16 one's; the exact form (gelu_erf_and_grad) stays for float32 and
// float64.
CONVLORA_HD float gelu_as_and_grad(float x, float& slope) {
  // p |t| = (p / sqrt 2) |x|; e^(-t^2) = 2^(-x^2 log2(e) / 2)
  const float k = fast_rcp(fmaf(0.23164189f, fabsf(x), 1.f));
  const float poly =
      k * fmaf(k, fmaf(k, fmaf(k, fmaf(k, 1.061405429f, -1.453152027f), 1.421413741f),
                       -0.284496736f),
               0.254829592f);
  const float e = fast_exp2(x * (x * -0.72134752044448170f));  // e^(-x^2 / 2)
  const float q = poly * e;                                    // erfc(|x| / sqrt 2)
  const float cdf2 = x >= 0.f ? 2.f - q : q;                   // 1 + erf(x / sqrt 2)
  slope = fmaf(x, 0.39894228040143267794f * e, 0.5f * cdf2);
  return 0.5f * x * cdf2;
}

// The stencils' GELU with its slope for a call on scalar_t inputs (accumulating in T): the
// 16-bit form above for float16 and bfloat16, the exact one otherwise.
template <typename scalar_t, typename T>
CONVLORA_HD T gelu_and_grad(T x, T& slope) {
  if constexpr (sizeof(scalar_t) == 2 && sizeof(T) == 4) {
    return gelu_as_and_grad(x, slope);
  } else {
    return gelu_erf_and_grad(x, slope);
  }
}

CONVLORA_HD int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Up to four taps of 1-D resampling: out = sum_k w[k] * in[idx[k]], distinct
// indices, nonzero weights.
template <typename acc_t>
struct Taps {
  int idx[4];
  acc_t w[4];
  int n;
};

// Cubic convolution weights (A = -0.75) of taps -1, 0, 1, 2 for the fraction t.
//   |d| <= 1: ((A + 2)|d| - (A + 3)) d^2 + 1
//   1 < |d| < 2: ((A|d| - 5A)|d| + 8A)|d| - 4A
template <typename acc_t>
CONVLORA_HD void cubic_weights(acc_t t, acc_t w[4]) {
  const acc_t a = acc_t(-0.75);
  const acc_t d0 = t + acc_t(1), d3 = acc_t(2) - t, d2 = acc_t(1) - t;
  w[0] = ((a * d0 - acc_t(5) * a) * d0 + acc_t(8) * a) * d0 - acc_t(4) * a;
  w[1] = ((a + acc_t(2)) * t - (a + acc_t(3))) * t * t + acc_t(1);
  w[2] = ((a + acc_t(2)) * d2 - (a + acc_t(3))) * d2 * d2 + acc_t(1);
  w[3] = ((a * d3 - acc_t(5) * a) * d3 + acc_t(8) * a) * d3 - acc_t(4) * a;
}

// Merges taps on the same (clamped) index and drops zero weights: an odd-scale
// downsample is then one tap, and no work is spent on taps that add nothing.
// Every loop has a fixed trip count and every write a fixed index (the slot chosen by a
// comparison), so a Taps stays in registers on the GPU (the composed weights' prep computes
// eight of them per entry). Slots from n on keep their old contents.
template <typename acc_t>
CONVLORA_HD void compact(Taps<acc_t>& t) {
  Taps<acc_t> o = t;
  int n = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < 4; ++k) {
    const bool live = k < t.n && t.w[k] != acc_t(0);
    bool merged = false;  // into an earlier slot with its index
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < k; ++j) {
      const bool hit = live && !merged && j < n && o.idx[j] == t.idx[k];
      if (hit) o.w[j] += t.w[k];
      merged = merged || hit;
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j <= k; ++j) {
      if (live && !merged && j == n) {
        o.idx[j] = t.idx[k];
        o.w[j] = t.w[k];
      }
    }
    n += live && !merged ? 1 : 0;
  }
  o.n = n;
  t = o;
}

// Source taps of output index d when resampling an axis of n_in values with
// ratio `scale` (PyTorch's: 1/s for an upsample by scale_factor s, n_in/n_out = s
// for a downsample to a size), align_corners=False:
//   source = scale * (d + 0.5) - 0.5
//   bilinear: source clamped at 0; taps floor, floor + 1 (capped at n_in - 1)
//   bicubic:  no clamp; taps floor - 1 .. floor + 2, each clamped to [0, n_in - 1]
template <typename acc_t>
CONVLORA_HD Taps<acc_t> resample_taps(int d, int n_in, acc_t scale, int interp) {
  Taps<acc_t> t;
  acc_t src = scale * (acc_t(d) + acc_t(0.5)) - acc_t(0.5);
  if (interp == kBilinear) {
    if (src < acc_t(0)) src = acc_t(0);
    const int i0 = static_cast<int>(src);  // floor: src >= 0
    const acc_t lam = src - acc_t(i0);
    t.idx[0] = i0;
    t.w[0] = acc_t(1) - lam;
    t.idx[1] = i0 < n_in - 1 ? i0 + 1 : i0;
    t.w[1] = lam;
    t.n = 2;
  } else {
    const acc_t fl = floor_t(src);
    const int i0 = static_cast<int>(fl);
    cubic_weights(src - fl, t.w);
    for (int k = 0; k < 4; ++k) t.idx[k] = clamp_int(i0 - 1 + k, 0, n_in - 1);
    t.n = 4;
  }
  compact(t);
  return t;
}

// Scale 1 resamples nothing: index d itself, weight 1.
template <typename acc_t>
CONVLORA_HD Taps<acc_t> identity_tap(int d) {
  Taps<acc_t> t;
  t.idx[0] = d;
  t.w[0] = acc_t(1);
  t.n = 1;
  return t;
}

// Rows (or columns) of the s·n conv output that Down_s reads for output index d.
template <typename acc_t>
CONVLORA_HD Taps<acc_t> down_taps(int d, int n, int s, int interp) {
  return s == 1 ? identity_tap<acc_t>(d) : resample_taps<acc_t>(d, s * n, acc_t(s), interp);
}

// z rows (or columns) that Up_s combines into upsampled index p.
template <typename acc_t>
CONVLORA_HD Taps<acc_t> up_taps(int p, int n, int s, int interp) {
  return s == 1 ? identity_tap<acc_t>(p)
                : resample_taps<acc_t>(p, n, static_cast<acc_t>(1.0 / s), interp);
}

// Calls f.template operator()<R>() with the smallest compiled rank bound R >= r.
template <typename F>
inline void dispatch_rank(int64_t r, F&& f) {
  if (r <= 4) {
    f.template operator()<4>();
  } else if (r <= 8) {
    f.template operator()<8>();
  } else if (r <= 16) {
    f.template operator()<16>();
  } else if (r <= 32) {
    f.template operator()<32>();
  } else {
    f.template operator()<64>();
  }
}

// Calls f.template operator()<INTERP>() with the interpolation as a compile-time constant.
template <typename F>
inline void dispatch_interpolation(int64_t interpolation, F&& f) {
  if (interpolation == kBicubic) {
    f.template operator()<kBicubic>();
  } else {
    f.template operator()<kBilinear>();
  }
}

}  // namespace convlora
