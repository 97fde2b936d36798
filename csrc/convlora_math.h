// Per-token arithmetic of Conv-LoRA, shared by the CPU and CUDA backends.
//
// Everything here is a __host__ __device__ function of plain scalars and
// pointers, so the CPU backend (compiled by the host compiler) executes the very
// math the GPU runs. Inputs may be half, bfloat16, float or double; all
// arithmetic is in acc_t (float, or double for double inputs).
//
// For a token t = (b, h, w) routed to expert e with integer scale s
// (DESIGN.md §1):
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
template <typename acc_t>
CONVLORA_HD void compact(Taps<acc_t>& t) {
  int n = 0;
  for (int k = 0; k < t.n; ++k) {
    if (t.w[k] == acc_t(0)) continue;
    int j = 0;
    while (j < n && t.idx[j] != t.idx[k]) ++j;
    if (j < n) {
      t.w[j] += t.w[k];
    } else {
      t.idx[n] = t.idx[k];
      t.w[n] = t.w[k];
      ++n;
    }
  }
  t.n = n;
}

// Source taps of output index d when resampling an axis of n_in values with
// ratio `scale` (PyTorch's: 1/s for an upsample by scale_factor s, n_in/n_out = s
// for a downsample to a size), align_corners=False:
//   source = scale * (d + 0.5) - 0.5
//   bilinear: source clamped at 0; taps floor, floor + 1 (capped at n_in - 1)
//   bicubic:  no clamp; taps floor - 1 .. floor + 2, each clamped to [0, n_in - 1]
template <typename acc_t>
CONVLORA_HD Taps<acc_t> resample_taps(int d, int n_in, acc_t scale, int mode) {
  Taps<acc_t> t;
  acc_t src = scale * (acc_t(d) + acc_t(0.5)) - acc_t(0.5);
  if (mode == kBilinear) {
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
CONVLORA_HD Taps<acc_t> down_taps(int d, int n, int s, int mode) {
  return s == 1 ? identity_tap<acc_t>(d) : resample_taps<acc_t>(d, s * n, acc_t(s), mode);
}

// z rows (or columns) that Up_s combines into upsampled index p.
template <typename acc_t>
CONVLORA_HD Taps<acc_t> up_taps(int p, int n, int s, int mode) {
  return s == 1 ? identity_tap<acc_t>(p)
                : resample_taps<acc_t>(p, n, static_cast<acc_t>(1.0 / s), mode);
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

// How far (in tokens) a token's stencil reaches, and the side of its square.
CONVLORA_HD int stencil_halo(int mode) { return mode == kBicubic ? 3 : 1; }
CONVLORA_HD int stencil_side(int mode) { return 2 * stencil_halo(mode) + 1; }
// Most conv outputs one token reads: 2x2 (bilinear, even s) or 4x4 (bicubic, even s).
CONVLORA_HD int max_conv_outputs(int mode) { return mode == kBicubic ? 16 : 4; }

// The tensors of one stencil problem. z is (N, r) with token t = (b·H + h)·W + w;
// conv_w (n, r, r, 3, 3) and conv_b (n, r) are contiguous.
template <typename scalar_t>
struct StencilParams {
  const scalar_t* z;
  const scalar_t* conv_w;
  const scalar_t* conv_b;
  int64_t tokens;
  int H, W, r, n, mode;
  int scales[kMaxExperts];
};

// Upsampled vector U(p, q, :) of a map zmap (H, W, r), into U[0..r).
template <int R, typename scalar_t, typename acc_t>
CONVLORA_HD void up_vector(const StencilParams<scalar_t>& P, const scalar_t* zmap, int s, int p,
                           int q, acc_t* U) {
  const Taps<acc_t> ty = up_taps<acc_t>(p, P.H, s, P.mode);
  const Taps<acc_t> tx = up_taps<acc_t>(q, P.W, s, P.mode);
  for (int c = 0; c < R; ++c) U[c] = acc_t(0);
  for (int a = 0; a < ty.n; ++a) {
    for (int b = 0; b < tx.n; ++b) {
      const acc_t wgt = ty.w[a] * tx.w[b];
      const scalar_t* zp = zmap + (static_cast<int64_t>(ty.idx[a]) * P.W + tx.idx[b]) * P.r;
      for (int c = 0; c < R; ++c)
        if (c < P.r) U[c] += wgt * static_cast<acc_t>(zp[c]);
    }
  }
}

// One channel of U(p, q, :).
template <typename scalar_t, typename acc_t>
CONVLORA_HD acc_t up_scalar(const StencilParams<scalar_t>& P, const scalar_t* zmap, int s, int p,
                            int q, int c) {
  const Taps<acc_t> ty = up_taps<acc_t>(p, P.H, s, P.mode);
  const Taps<acc_t> tx = up_taps<acc_t>(q, P.W, s, P.mode);
  acc_t v = acc_t(0);
  for (int a = 0; a < ty.n; ++a)
    for (int b = 0; b < tx.n; ++b)
      v += ty.w[a] * tx.w[b] *
           static_cast<acc_t>(zmap[(static_cast<int64_t>(ty.idx[a]) * P.W + tx.idx[b]) * P.r + c]);
  return v;
}

// Pre-activation C(oy, ox, :) of expert e's conv on the upsampled map:
//   C[co] = bias[co] + sum_{ky,kx,ci} w[co, ci, ky, kx] U(oy + ky - 1, ox + kx - 1, ci)
// with U = 0 outside [0, sH) x [0, sW). When Ucache is given, the nine U vectors
// are kept there (Ucache[k*R + c], k = ky*3 + kx) and valid[k] says which exist.
template <int R, typename scalar_t, typename acc_t>
CONVLORA_HD void conv_preact(const StencilParams<scalar_t>& P, const scalar_t* zmap, int e, int s,
                             int oy, int ox, acc_t* C, acc_t* U, acc_t* Ucache, bool* valid) {
  const int r = P.r;
  const scalar_t* wt = P.conv_w + static_cast<int64_t>(e) * r * r * 9;
  const scalar_t* bs = P.conv_b + static_cast<int64_t>(e) * r;
  for (int co = 0; co < R; ++co) C[co] = co < r ? static_cast<acc_t>(bs[co]) : acc_t(0);
  const int sH = s * P.H, sW = s * P.W;
  for (int ky = 0; ky < 3; ++ky) {
    const int p = oy + ky - 1;
    for (int kx = 0; kx < 3; ++kx) {
      const int q = ox + kx - 1;
      const int k = ky * 3 + kx;
      const bool inside = p >= 0 && p < sH && q >= 0 && q < sW;
      if (valid) valid[k] = inside;
      if (!inside) continue;
      acc_t* u = Ucache ? Ucache + k * R : U;
      up_vector<R>(P, zmap, s, p, q, u);
      for (int co = 0; co < R; ++co) {
        if (co >= r) break;
        acc_t acc = acc_t(0);
        for (int ci = 0; ci < R; ++ci)
          if (ci < r) acc += static_cast<acc_t>(wt[((co * r + ci) * 3 + ky) * 3 + kx]) * u[ci];
        C[co] += acc;
      }
    }
  }
}

// Decomposes a token index into (map base offset into z, h, w).
CONVLORA_HD void token_coords(int64_t t, int H, int W, int64_t* map_token0, int* h, int* w) {
  const int64_t hw = static_cast<int64_t>(H) * W;
  const int64_t b = t / hw;
  const int64_t rem = t - b * hw;
  *map_token0 = b * hw;
  *h = static_cast<int>(rem / W);
  *w = static_cast<int>(rem - static_cast<int64_t>(*h) * W);
}

// out[0..r) = E_e(z)_t, the expert's output at token t (without the residual z_t).
template <int R, typename scalar_t, typename acc_t>
CONVLORA_HD void token_forward(const StencilParams<scalar_t>& P, int64_t t, int e, acc_t* out) {
  int64_t t0;
  int h, w;
  token_coords(t, P.H, P.W, &t0, &h, &w);
  const scalar_t* zmap = P.z + t0 * P.r;
  const int s = P.scales[e];
  const Taps<acc_t> rows = down_taps<acc_t>(h, P.H, s, P.mode);
  const Taps<acc_t> cols = down_taps<acc_t>(w, P.W, s, P.mode);
  acc_t C[R], U[R];
  for (int c = 0; c < R; ++c) out[c] = acc_t(0);
  for (int a = 0; a < rows.n; ++a) {
    for (int b = 0; b < cols.n; ++b) {
      conv_preact<R>(P, zmap, e, s, rows.idx[a], cols.idx[b], C, U,
                     static_cast<acc_t*>(nullptr), static_cast<bool*>(nullptr));
      const acc_t wgt = rows.w[a] * cols.w[b];
      for (int c = 0; c < R; ++c)
        if (c < P.r) out[c] += wgt * gelu_erf(C[c]);
    }
  }
}

// Vector-Jacobian product of token t's expert output, for du = dL/dE_e(z)_t:
//   g_o[co] = w_o · du[co] · GELU'(C_o[co])            per conv output o (weight w_o)
//   dU(p, q, ci) = sum_co w[co, ci, ky, kx] g_o[co]    at each of o's 3x3 taps
//   dz(iy, ix, ci) += wy wx dU(p, q, ci)               over Up_s's taps of (p, q)
// dz lands in contrib[(slot)*r + ci] where slot = (iy - h + halo)*side + (ix - w + halo)
// (the caller zeroes contrib). If g_out is given, g_o goes to g_out[o*r + co]; with
// WITH_DW the weight gradients of expert e accumulate into dw[(co*r + ci)*9 + k]
// (+= g_o[co] U(tap k)[ci]) and db[co] (+= g_o[co]).
template <int R, bool WITH_DW, typename scalar_t, typename acc_t>
CONVLORA_HD void token_backward(const StencilParams<scalar_t>& P, int64_t t, int e,
                                const acc_t* du, acc_t* g_out, acc_t* contrib, acc_t* dw,
                                acc_t* db) {
  int64_t t0;
  int h, w;
  token_coords(t, P.H, P.W, &t0, &h, &w);
  const int r = P.r;
  const scalar_t* zmap = P.z + t0 * r;
  const scalar_t* wt = P.conv_w + static_cast<int64_t>(e) * r * r * 9;
  const int s = P.scales[e];
  const int halo = stencil_halo(P.mode), side = stencil_side(P.mode);
  const int sH = s * P.H, sW = s * P.W;
  const Taps<acc_t> rows = down_taps<acc_t>(h, P.H, s, P.mode);
  const Taps<acc_t> cols = down_taps<acc_t>(w, P.W, s, P.mode);
  acc_t C[R], U[R], g[R], dU[R];
  acc_t Ucache[WITH_DW ? 9 * R : 1];
  bool valid[9];
  int o = 0;
  for (int a = 0; a < rows.n; ++a) {
    for (int b = 0; b < cols.n; ++b, ++o) {
      const int oy = rows.idx[a], ox = cols.idx[b];
      conv_preact<R>(P, zmap, e, s, oy, ox, C, U, WITH_DW ? Ucache : static_cast<acc_t*>(nullptr),
                     WITH_DW ? valid : static_cast<bool*>(nullptr));
      const acc_t wgt = rows.w[a] * cols.w[b];
      for (int c = 0; c < R; ++c) g[c] = c < r ? wgt * du[c] * gelu_erf_grad(C[c]) : acc_t(0);
      if (g_out)
        for (int c = 0; c < R; ++c)
          if (c < r) g_out[o * r + c] = g[c];
      if (WITH_DW) {
        for (int co = 0; co < R; ++co) {
          if (co >= r) break;
          db[co] += g[co];
          for (int k = 0; k < 9; ++k) {
            if (!valid[k]) continue;
            for (int ci = 0; ci < R; ++ci)
              if (ci < r) dw[(co * r + ci) * 9 + k] += g[co] * Ucache[k * R + ci];
          }
        }
      }
      for (int ky = 0; ky < 3; ++ky) {
        const int p = oy + ky - 1;
        if (p < 0 || p >= sH) continue;
        const Taps<acc_t> ty = up_taps<acc_t>(p, P.H, s, P.mode);
        for (int kx = 0; kx < 3; ++kx) {
          const int q = ox + kx - 1;
          if (q < 0 || q >= sW) continue;
          for (int ci = 0; ci < R; ++ci) {
            dU[ci] = acc_t(0);
            if (ci >= r) continue;
            for (int co = 0; co < R; ++co)
              if (co < r) dU[ci] += static_cast<acc_t>(wt[((co * r + ci) * 3 + ky) * 3 + kx]) * g[co];
          }
          const Taps<acc_t> tx = up_taps<acc_t>(q, P.W, s, P.mode);
          for (int i = 0; i < ty.n; ++i) {
            for (int j = 0; j < tx.n; ++j) {
              const acc_t wgt2 = ty.w[i] * tx.w[j];
              const int slot = (ty.idx[i] - h + halo) * side + (tx.idx[j] - w + halo);
              acc_t* dst = contrib + static_cast<int64_t>(slot) * r;
              for (int ci = 0; ci < R; ++ci)
                if (ci < r) dst[ci] += wgt2 * dU[ci];
            }
          }
        }
      }
    }
  }
}

// dz_j = du_j (the residual) + the contributions of every token whose stencil reaches j,
// summed in a fixed order (deterministic without atomics). contrib is (N, side², r).
template <typename acc_t>
CONVLORA_HD acc_t gather_dz(const acc_t* contrib, int64_t j, int c, int H, int W, int r,
                            int mode) {
  int64_t t0;
  int h, w;
  token_coords(j, H, W, &t0, &h, &w);
  const int halo = stencil_halo(mode), side = stencil_side(mode);
  acc_t acc = acc_t(0);
  for (int a = -halo; a <= halo; ++a) {
    const int ht = h - a;
    if (ht < 0 || ht >= H) continue;
    for (int b = -halo; b <= halo; ++b) {
      const int wt = w - b;
      if (wt < 0 || wt >= W) continue;
      const int64_t t = t0 + static_cast<int64_t>(ht) * W + wt;
      const int slot = (a + halo) * side + (b + halo);
      acc += contrib[(t * side * side + slot) * r + c];
    }
  }
  return acc;
}

// Weight-gradient entry `entry` of expert e from token t, given its g (P x r):
//   entry < r·r·9: (co, ci, k) -> sum_o g_o[co] U(o's tap k)[ci];  else bias co -> sum_o g_o[co]
template <typename scalar_t, typename acc_t>
CONVLORA_HD acc_t token_dw_entry(const StencilParams<scalar_t>& P, int64_t t, int e,
                                 const acc_t* g, int entry) {
  int64_t t0;
  int h, w;
  token_coords(t, P.H, P.W, &t0, &h, &w);
  const int r = P.r;
  const int s = P.scales[e];
  const Taps<acc_t> rows = down_taps<acc_t>(h, P.H, s, P.mode);
  const Taps<acc_t> cols = down_taps<acc_t>(w, P.W, s, P.mode);
  const int nw = r * r * 9;
  acc_t acc = acc_t(0);
  if (entry >= nw) {
    const int co = entry - nw;
    for (int o = 0; o < rows.n * cols.n; ++o) acc += g[o * r + co];
    return acc;
  }
  const int k = entry % 9, ci = (entry / 9) % r, co = entry / (9 * r);
  const int ky = k / 3, kx = k % 3;
  const int sH = s * P.H, sW = s * P.W;
  const scalar_t* zmap = P.z + t0 * r;
  int o = 0;
  for (int a = 0; a < rows.n; ++a) {
    const int p = rows.idx[a] + ky - 1;
    for (int b = 0; b < cols.n; ++b, ++o) {
      const int q = cols.idx[b] + kx - 1;
      if (p < 0 || p >= sH || q < 0 || q >= sW) continue;
      acc += g[o * r + co] * up_scalar<scalar_t, acc_t>(P, zmap, s, p, q, ci);
    }
  }
  return acc;
}

}  // namespace convlora
