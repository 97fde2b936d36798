// The tiled stencil: one block per tile of one map (8 x 8 tokens), written once as
// block programs of phases that both the CUDA kernels and the CPU backend run.
//
// A phase is a function of (block, thread) over the block's shared-memory arrays: the
// stretch of work between two barriers. The CUDA kernel runs each phase on its 128
// threads with __syncthreads() after it; the CPU runs the same phase as a loop over the
// 128 thread ids (blocks in parallel with at::parallel_for). Both read the same tables,
// stage the same tiles and reduce in the same order, so CI executes what the GPU runs.
// A checked CPU build (CONVLORA_CHECKED) bounds-checks every shared-memory index and
// poisons shared memory (NaN bytes) before each buffer is written, so a halo read or
// a read of a buffer before the phase that writes it shows up on the CPU.
//
// Work decomposition (docs/design.md, "The tiled stencil"):
//   items     one conv output of one token: odd scales need 1 per token, even scales
//             2x2 (bilinear) or up to 4x4 (bicubic). Items are listed per block, sorted
//             by (halo, expert, token), and spread evenly over the threads whatever mix
//             of odd and even scales the tile holds.
//   rounds    items are processed ROUND at a time so the per-item buffers have a fixed size.
//   forward   conv (thread per item: 9 upsampled taps from the staged z, r x r x 9 MACs,
//             GELU, times the down-sampling weight) -> per-token sums in item order.
//   backward  the block owns a tile of dz. Sources are tile + halo tokens (their stencils
//             reach the tile); their pre-activations are recomputed, g = w_o du GELU'(C).
//             dW: thread-owned entries summed over the tile's items in order.
//             dz: dU = W^T g per (item, tap), then scattered into the tile by colour
//             classes of sources that are (2 halo + 1) apart, so no two threads of a
//             phase write the same value: a gather with no atomics, deterministic.
//             Weight gradients leave as one fp32 partial per block, summed over blocks in
//             a fixed order by a small reduce kernel.
#pragma once

#include <stdint.h>
#include <string.h>

#include "convlora_math.h"

#if defined(CONVLORA_CHECKED)
#include <stdexcept>
#include <string>
#endif

#if defined(__CUDA_ARCH__)
#define CONVLORA_UNROLL _Pragma("unroll")
#else
#define CONVLORA_UNROLL
#endif

namespace convlora {
namespace tile {

constexpr int kThreads = 128;
// Per-block shared memory that stages the conv weights or the weight-gradient
// accumulators only when they fit under this many bytes (else they stay in global memory).
constexpr int kSmemBudget = 96 * 1024;

// Expert index markers of staged tokens.
constexpr int kOutside = -2;  // outside the map: no token
constexpr int kBadExpert = -1;  // index out of range: NaN output, no contribution

template <int MODE>
struct Interp {
  static constexpr int kHalo = MODE == kBicubic ? 3 : 1;  // z reach of one token's stencil
  static constexpr int kSide = 2 * kHalo + 1;
  static constexpr int kUpTaps = MODE == kBicubic ? 4 : 2;   // z taps per upsampled index
  static constexpr int kMaxDown = MODE == kBicubic ? 4 : 2;  // conv outputs per axis
};

// Shared-memory and per-block sizes of one kernel configuration.
template <int R, int MODE, bool BWD>
struct Geometry {
  static constexpr int kHalo = Interp<MODE>::kHalo;
  // 8 x 8 tokens; 4 x 4 where the staged halo would outgrow an A100's 163 KB per block.
  static constexpr int kTileH = R >= 64 && MODE == kBicubic && BWD ? 4 : 8;
  static constexpr int kTileW = kTileH;
  static constexpr int kSH = BWD ? kHalo : 0;      // source ring around the tile
  static constexpr int kSrcH = kTileH + 2 * kSH;   // source tokens (items come from these)
  static constexpr int kSrcW = kTileW + 2 * kSH;
  static constexpr int kSrc = kSrcH * kSrcW;
  static constexpr int kZH = kSrcH + 2 * kHalo;    // staged z: sources + their reach
  static constexpr int kZW = kSrcW + 2 * kHalo;
  static constexpr int kCell = R + 1;              // odd row strides: no bank conflicts
  static constexpr int kMaxItems = kSrc * Interp<MODE>::kMaxDown * Interp<MODE>::kMaxDown;
  // Items per round: forward buffers hold R values per item, backward 10 R.
  static constexpr int kRound = !BWD ? 128 : (R <= 8 ? 64 : (R <= 16 ? 32 : (R <= 32 ? 16 : 8)));
  static constexpr int kItemRow = R + 1;           // cbuf row (GELU outputs or g)
  static constexpr int kURow = 9 * R + 1;          // ubuf row (U taps, then dU taps)
  static constexpr int kBuckets = 2 * kMaxExperts; // (tile or halo) x expert
};

// Row stride of one expert's zero-padded fp32 conv weights [co][ci][k] (R x R x 9):
// a multiple of 4 floats plus 4, so the 8 experts a warp may read at one (co, ci, k)
// fall in distinct banks.
template <int R>
CONVLORA_HD constexpr int weight_stride() { return ((R * R * 9 + 31) / 32) * 32 + 4; }

// Entries of one expert's weight gradient: r·r·9 conv weights, then r biases.
CONVLORA_HD int grad_entries(int r) { return r * r * 9 + r; }

// --- Per-call tables ----------------------------------------------------------------
//
// Down- and up-sampling taps of every expert's scale along each axis, computed once per
// call by a tiny prep pass (no fp64 and no division in the kernels' inner loops).
// down: n·H row entries then n·W column entries, entry e·H + h -> the conv-output rows
// Down_s reads for output row h (compacted, 1..4 taps). up: expert e's s·H rows from
// up_y[e], then s·W columns from up_x[e] -> the z rows Up_s combines (kUpTaps slots,
// unused slots repeat the first index with weight 0, so every index is in the halo).
struct Tables {
  int H, W, n, mode;
  int scale[kMaxExperts];
  int down_y, down_x;
  int up_y[kMaxExperts], up_x[kMaxExperts];
  int entries;
};

inline Tables make_tables(int H, int W, int n, int mode, const int* scales) {
  Tables T;
  T.H = H;
  T.W = W;
  T.n = n;
  T.mode = mode;
  int off = 0;
  T.down_y = off;
  off += n * H;
  T.down_x = off;
  off += n * W;
  for (int e = 0; e < kMaxExperts; ++e) {
    T.scale[e] = e < n ? scales[e] : 1;
    T.up_y[e] = off;
    if (e < n) off += scales[e] * H;
  }
  for (int e = 0; e < kMaxExperts; ++e) {
    T.up_x[e] = off;
    if (e < n) off += scales[e] * W;
  }
  T.entries = off;
  return T;
}

// Table entry i (the prep pass runs one per entry).
template <typename acc_t>
CONVLORA_HD void table_entry(const Tables& T, int i, Taps<acc_t>* out) {
  Taps<acc_t> t;
  if (i < T.down_x) {
    const int e = i / T.H;
    t = down_taps<acc_t>(i - e * T.H, T.H, T.scale[e], T.mode);
  } else if (i < T.up_y[0]) {
    const int e = (i - T.down_x) / T.W;
    t = down_taps<acc_t>(i - T.down_x - e * T.W, T.W, T.scale[e], T.mode);
  } else {
    const bool rows = i < T.up_x[0];
    int e = 0;
    while (e + 1 < T.n && i >= (rows ? T.up_y : T.up_x)[e + 1]) ++e;
    const int p = i - (rows ? T.up_y : T.up_x)[e];
    t = up_taps<acc_t>(p, rows ? T.H : T.W, T.scale[e], T.mode);
  }
  for (int k = t.n; k < 4; ++k) {
    t.idx[k] = t.idx[0];
    t.w[k] = acc_t(0);
  }
  out[i] = t;
}

// Prep entry i of the padded weights: (n, weight_stride) conv weights [co][ci][k], zero
// outside r x r, then (n, R) biases.
template <int R, typename acc_t>
CONVLORA_HD void weight_entry(const acc_t* conv_w, const acc_t* conv_b, int r, int n, int i,
                              acc_t* wbuf) {
  constexpr int WS = weight_stride<R>();
  if (i < n * WS) {
    const int e = i / WS, off = i - e * WS;
    acc_t v = acc_t(0);
    if (off < R * R * 9) {
      const int co = off / (9 * R), ci = (off / 9) % R, k = off % 9;
      if (co < r && ci < r) v = conv_w[((static_cast<int64_t>(e) * r + co) * r + ci) * 9 + k];
    }
    wbuf[i] = v;
  } else {
    const int j = i - n * WS, e = j / R, co = j % R;
    wbuf[i] = co < r ? conv_b[e * r + co] : acc_t(0);
  }
}

// --- Shared memory ------------------------------------------------------------------

#if defined(CONVLORA_CHECKED)
[[noreturn]] inline void smem_out_of_range(const char* name, int i, int n) {
  throw std::out_of_range(std::string("stencil (checked build): shared array ") + name +
                          " index " + std::to_string(i) + " outside [0, " + std::to_string(n) +
                          ")");
}
template <typename T>
struct SArr {
  T* p;
  int n;
  const char* name;
  T& operator[](int i) const {
    if (i < 0 || i >= n) smem_out_of_range(name, i, n);
    return p[i];
  }
};
#define CONVLORA_SARR(T, base, off, count, nm) \
  SArr<T> { reinterpret_cast<T*>((base) + (off)), (count), nm }
#else
template <typename T>
struct SArr {
  T* p;
  CONVLORA_HD T& operator[](int i) const { return p[i]; }
};
#define CONVLORA_SARR(T, base, off, count, nm) \
  SArr<T> { reinterpret_cast<T*>((base) + (off)) }
#endif

// Byte offsets of a block's shared arrays (16-byte aligned), the same on host and device.
struct Layout {
  int zs, src, es, nt, start, bucket, first, meta, items, cbuf, ubuf, acc, w, b, dw, bytes;
  int w_count, dw_count;
};

CONVLORA_HD int align16(int x) { return (x + 15) & ~15; }

template <int R, int MODE, bool BWD, typename acc_t>
CONVLORA_HD Layout make_layout(int r, int n, bool w_smem, bool dw_smem) {
  using G = Geometry<R, MODE, BWD>;
  Layout L;
  int off = 0;
  auto take = [&off](int bytes) {
    const int at = off;
    off += align16(bytes);
    return at;
  };
  const int A = static_cast<int>(sizeof(acc_t)), I = static_cast<int>(sizeof(int));
  L.zs = take(G::kZH * G::kZW * G::kCell * A);
  L.src = take(BWD ? G::kSrc * G::kCell * A : 0);  // du of the sources
  L.es = take(G::kSrc * I);
  L.nt = take(G::kSrc * I);
  L.start = take(G::kSrc * I);
  L.bucket = take(G::kBuckets * I);
  L.first = take((G::kBuckets + 1) * I);
  L.meta = take(4 * I);
  L.items = take(G::kMaxItems * I);
  L.cbuf = take(G::kRound * G::kItemRow * A);
  L.ubuf = take(BWD ? G::kRound * G::kURow * A : 0);
  L.acc = take(G::kTileH * G::kTileW * G::kCell * A);  // u (forward) or dz (backward) of the tile
  L.w_count = w_smem ? n * weight_stride<R>() : 0;
  L.w = take(L.w_count * A);
  L.b = take(n * R * A);
  L.dw_count = BWD && dw_smem ? n * grad_entries(r) : 0;
  L.dw = take(L.dw_count * A);
  L.bytes = off;
  return L;
}

// --- Arguments ----------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct TileArgs {
  const scalar_t* z;           // (N, r), N = maps·H·W tokens in (b, h, w) order
  const int* expert_index;     // (N,)
  const scalar_t* du;          // (N, r), backward
  scalar_t* out;               // u (forward) or dz (backward), (N, r)
  const acc_t* wbuf;           // prep: (n, weight_stride) weights, then (n, R) biases
  const Taps<acc_t>* taps;     // prep: Tables entries
  acc_t* dw_partial;           // backward: (blocks, n, grad_entries(r)) fp32 partials
  Tables T;
  int64_t maps;
  int H, W, r, n;
  int tiles_y, tiles_x;
  bool w_smem, dw_smem;
  bool vec_z;                  // z and du rows load as 16-byte vectors (r == R, aligned)
};

// --- Small helpers --------------------------------------------------------------------

// Loads VEC = 16 / sizeof(scalar_t) consecutive values from a 16-byte aligned address.
template <typename scalar_t, typename acc_t, int VEC>
CONVLORA_HD void load16(const scalar_t* p, acc_t* out) {
  struct alignas(16) Raw {
    uint32_t v[4];
  };
  Raw raw;
#if defined(__CUDA_ARCH__)
  raw = *reinterpret_cast<const Raw*>(p);
#else
  memcpy(&raw, p, 16);
#endif
  scalar_t vals[VEC];
  memcpy(vals, &raw, 16);
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<acc_t>(vals[j]);
}

template <typename acc_t>
CONVLORA_HD acc_t nan_value() {
  return acc_t(NAN);
}

// What staging stores for cells outside the map, which no correct program reads: NaN in
// the checked build (a stray read shows in the result), zero otherwise.
template <typename acc_t>
CONVLORA_HD acc_t outside_value() {
#if defined(CONVLORA_CHECKED)
  return nan_value<acc_t>();
#else
  return acc_t(0);
#endif
}

// Stages an RH x RW region of an (H, W, r) map (origin y0, x0, may reach outside the map)
// into dst[(ly·RW + lx)·kCell + c] as acc_t; channels c >= r and cells outside the map are
// outside_value() (never read: taps are clamped into the map).
template <int R, int RH, int RW, int CELL, typename scalar_t, typename acc_t>
CONVLORA_HD void stage_region(const scalar_t* map, int H, int W, int r, int y0, int x0,
                              bool vec, SArr<acc_t> dst, int tid) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));
  if constexpr (R % VEC == 0) {
    if (vec) {
      constexpr int QV = R / VEC;  // vectors per token
      for (int u = tid; u < RH * RW * QV; u += kThreads) {
        const int cell = u / QV, q = u - cell * QV;
        const int ly = cell / RW, lx = cell - ly * RW;
        const int gy = y0 + ly, gx = x0 + lx;
        acc_t v[VEC];
        if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
          load16<scalar_t, acc_t, VEC>(map + (static_cast<int64_t>(gy) * W + gx) * R + q * VEC,
                                       v);
        } else {
          for (int j = 0; j < VEC; ++j) v[j] = outside_value<acc_t>();
        }
        for (int j = 0; j < VEC; ++j) dst[cell * CELL + q * VEC + j] = v[j];
      }
      return;
    }
  }
  for (int u = tid; u < RH * RW * R; u += kThreads) {
    const int cell = u / R, c = u - cell * R;
    const int ly = cell / RW, lx = cell - ly * RW;
    const int gy = y0 + ly, gx = x0 + lx;
    const bool inside = gy >= 0 && gy < H && gx >= 0 && gx < W;
    acc_t v = inside ? acc_t(0) : outside_value<acc_t>();
    if (c < r && inside) v = static_cast<acc_t>(map[(static_cast<int64_t>(gy) * W + gx) * r + c]);
    dst[cell * CELL + c] = v;
  }
}

// --- The block program --------------------------------------------------------------

// Item encoding: source token | down-row tap << 12 | down-column tap << 14.
CONVLORA_HD int make_item(int t, int a, int b) { return t | (a << 12) | (b << 14); }
CONVLORA_HD int item_token(int it) { return it & 0xFFF; }
CONVLORA_HD int item_a(int it) { return (it >> 12) & 3; }
CONVLORA_HD int item_b(int it) { return (it >> 14) & 3; }

// Pre-activation of one item: C[co] = bias[co] + sum_{k, ci} W[co, ci, k] U(tap k)[ci] for
// the conv output (oy, ox) of expert e at scale s, U read from the staged z through the
// up tables (zero outside the s·H x s·W map). Writes C to crow[0..R) and, with STORE_U,
// the nine U vectors to urow[k·R + ci] (zero for taps outside the map).
template <int R, int MODE, int ZW, int CELL, bool STORE_U, typename acc_t>
CONVLORA_HD void conv_item(const Taps<acc_t>* taps, const Tables& T, int e, int s, int oy,
                           int ox, int zy0, int zx0, SArr<acc_t> zs, SArr<acc_t> w, int w_off,
                           SArr<acc_t> bias, SArr<acc_t> crow, int crow_off, SArr<acc_t> urow,
                           int urow_off) {
  constexpr int UT = Interp<MODE>::kUpTaps;
  constexpr int CC = R < 16 ? R : 16;  // output channels per pass: bounded registers
  int ry[3][UT], rx[3][UT];
  acc_t wy[3][UT], wx[3][UT];
  bool vy[3], vx[3];
  const int sH = s * T.H, sW = s * T.W;
  CONVLORA_UNROLL
  for (int k = 0; k < 3; ++k) {
    const int p = oy + k - 1, q = ox + k - 1;
    vy[k] = p >= 0 && p < sH;
    vx[k] = q >= 0 && q < sW;
    const Taps<acc_t>& ty = taps[T.up_y[e] + (vy[k] ? p : 0)];
    const Taps<acc_t>& tx = taps[T.up_x[e] + (vx[k] ? q : 0)];
    CONVLORA_UNROLL
    for (int a = 0; a < UT; ++a) {
      ry[k][a] = (ty.idx[a] - zy0) * ZW;
      wy[k][a] = ty.w[a];
      rx[k][a] = tx.idx[a] - zx0;
      wx[k][a] = tx.w[a];
    }
  }
  for (int co0 = 0; co0 < R; co0 += CC) {
    acc_t c[CC];
    CONVLORA_UNROLL
    for (int j = 0; j < CC; ++j) c[j] = bias[e * R + co0 + j];
    CONVLORA_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      CONVLORA_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        const int k = ky * 3 + kx;
        if (!(vy[ky] && vx[kx])) {
          if (STORE_U && co0 == 0)
            for (int ci = 0; ci < R; ++ci) urow[urow_off + k * R + ci] = acc_t(0);
          continue;
        }
        for (int ci = 0; ci < R; ++ci) {
          acc_t u = acc_t(0);
          CONVLORA_UNROLL
          for (int a = 0; a < UT; ++a) {
            acc_t ua = acc_t(0);
            CONVLORA_UNROLL
            for (int b = 0; b < UT; ++b) ua += wx[kx][b] * zs[(ry[ky][a] + rx[kx][b]) * CELL + ci];
            u += wy[ky][a] * ua;
          }
          if (STORE_U && co0 == 0) urow[urow_off + k * R + ci] = u;
          CONVLORA_UNROLL
          for (int j = 0; j < CC; ++j) c[j] += w[w_off + ((co0 + j) * R + ci) * 9 + k] * u;
        }
      }
    }
    CONVLORA_UNROLL
    for (int j = 0; j < CC; ++j) crow[crow_off + co0 + j] = c[j];
  }
}

// Where this block's tile sits.
struct BlockPos {
  int64_t token0;  // first token of the block's map
  int h0, w0;      // tile origin in the map
};

template <int TH, int TW, typename scalar_t, typename acc_t>
CONVLORA_HD BlockPos block_pos(const TileArgs<scalar_t, acc_t>& A, int64_t block) {
  const int64_t per_map = static_cast<int64_t>(A.tiles_y) * A.tiles_x;
  const int64_t m = block / per_map;
  const int t = static_cast<int>(block - m * per_map);
  const int ty = t / A.tiles_x;
  BlockPos P;
  P.token0 = m * A.H * A.W;
  P.h0 = ty * TH;
  P.w0 = (t - ty * A.tiles_x) * TW;
  return P;
}

// The shared arrays of one block, typed.
template <int R, int MODE, bool BWD, typename acc_t>
struct Smem {
  using G = Geometry<R, MODE, BWD>;
  SArr<acc_t> zs, src, cbuf, ubuf, acc, w, b, dw;
  SArr<int> es, nt, start, bucket, first, meta, items;

  CONVLORA_HD Smem(unsigned char* base, const Layout& L, int n, const acc_t* wglobal,
                   acc_t* dwglobal, int r)
      : zs(CONVLORA_SARR(acc_t, base, L.zs, G::kZH * G::kZW * G::kCell, "z")),
        src(CONVLORA_SARR(acc_t, base, L.src, BWD ? G::kSrc * G::kCell : 0, "du")),
        cbuf(CONVLORA_SARR(acc_t, base, L.cbuf, G::kRound * G::kItemRow, "item values")),
        ubuf(CONVLORA_SARR(acc_t, base, L.ubuf, BWD ? G::kRound * G::kURow : 0, "taps")),
        acc(CONVLORA_SARR(acc_t, base, L.acc, G::kTileH * G::kTileW * G::kCell, "tile sums")),
        w(L.w_count ? CONVLORA_SARR(acc_t, base, L.w, L.w_count, "weights")
                    : CONVLORA_SARR(acc_t, reinterpret_cast<unsigned char*>(
                                               const_cast<acc_t*>(wglobal)),
                                    0, n * weight_stride<R>(), "weights (global)")),
        b(CONVLORA_SARR(acc_t, base, L.b, n * R, "bias")),
        dw(L.dw_count ? CONVLORA_SARR(acc_t, base, L.dw, L.dw_count, "weight gradients")
                      : CONVLORA_SARR(acc_t, reinterpret_cast<unsigned char*>(dwglobal), 0,
                                      BWD ? n * grad_entries(r) : 0,
                                      "weight gradients (global)")),
        es(CONVLORA_SARR(int, base, L.es, G::kSrc, "expert")),
        nt(CONVLORA_SARR(int, base, L.nt, G::kSrc, "taps per token")),
        start(CONVLORA_SARR(int, base, L.start, G::kSrc, "item start")),
        bucket(CONVLORA_SARR(int, base, L.bucket, G::kBuckets, "bucket size")),
        first(CONVLORA_SARR(int, base, L.first, G::kBuckets + 1, "bucket start")),
        meta(CONVLORA_SARR(int, base, L.meta, 4, "meta")),
        items(CONVLORA_SARR(int, base, L.items, G::kMaxItems, "items")) {}
};

// Phase 1: stage z (and du), the expert of every source token, weights and biases;
// zero the tile accumulators.
template <int R, int MODE, bool BWD, typename scalar_t, typename acc_t>
CONVLORA_HD void phase_load(const TileArgs<scalar_t, acc_t>& A, const BlockPos& P,
                            const Smem<R, MODE, BWD, acc_t>& S, int tid) {
  using G = Geometry<R, MODE, BWD>;
  const int sy0 = P.h0 - G::kSH, sx0 = P.w0 - G::kSH;
  stage_region<R, G::kZH, G::kZW, G::kCell>(A.z + P.token0 * A.r, A.H, A.W, A.r,
                                           sy0 - G::kHalo, sx0 - G::kHalo, A.vec_z, S.zs, tid);
  if (BWD)
    stage_region<R, G::kSrcH, G::kSrcW, G::kCell>(A.du + P.token0 * A.r, A.H, A.W, A.r, sy0,
                                                 sx0, A.vec_z, S.src, tid);
  for (int t = tid; t < G::kSrc; t += kThreads) {
    const int ly = t / G::kSrcW, lx = t - ly * G::kSrcW;
    const int gy = sy0 + ly, gx = sx0 + lx;
    int e = kOutside, nt = 0;
    if (gy >= 0 && gy < A.H && gx >= 0 && gx < A.W) {
      e = A.expert_index[P.token0 + static_cast<int64_t>(gy) * A.W + gx];
      if (e < 0 || e >= A.n) {
        e = kBadExpert;
      } else {
        nt = A.taps[A.T.down_y + e * A.H + gy].n * 8 + A.taps[A.T.down_x + e * A.W + gx].n;
      }
    }
    S.es[t] = e;
    S.nt[t] = nt;
  }
  if (A.w_smem) {
    for (int i = tid; i < A.n * weight_stride<R>(); i += kThreads) S.w[i] = A.wbuf[i];
  }
  for (int i = tid; i < A.n * R; i += kThreads) S.b[i] = A.wbuf[A.n * weight_stride<R>() + i];
  for (int i = tid; i < G::kTileH * G::kTileW * G::kCell; i += kThreads) S.acc[i] = acc_t(0);
  if (BWD) {
    const int ne = A.n * grad_entries(A.r);
    for (int i = tid; i < ne; i += kThreads) S.dw[i] = acc_t(0);
  }
}

template <int R, int MODE, bool BWD>
CONVLORA_HD bool in_tile(int t) {
  using G = Geometry<R, MODE, BWD>;
  const int ly = t / G::kSrcW - G::kSH, lx = t % G::kSrcW - G::kSH;
  return ly >= 0 && ly < G::kTileH && lx >= 0 && lx < G::kTileW;
}

// Bucket of a source token: its expert, + n for halo tokens; -1 without items.
template <int R, int MODE, bool BWD>
CONVLORA_HD int token_bucket(int t, int e, int nt, int n) {
  if (nt == 0) return -1;
  return in_tile<R, MODE, BWD>(t) ? e : n + e;
}

// Phase 2: thread b < 2n counts the items of bucket b.
template <int R, int MODE, bool BWD, typename acc_t>
CONVLORA_HD void phase_count(int n, const Smem<R, MODE, BWD, acc_t>& S, int tid) {
  using G = Geometry<R, MODE, BWD>;
  if (tid >= 2 * n) return;
  int total = 0;
  for (int t = 0; t < G::kSrc; ++t) {
    const int nt = S.nt[t];
    if (token_bucket<R, MODE, BWD>(t, S.es[t], nt, n) == tid) total += (nt >> 3) * (nt & 7);
  }
  S.bucket[tid] = total;
}

// Phase 3: thread b < 2n walks the sources in order and lists the items of bucket b from
// the bucket's offset: items sorted by (halo, expert, token, down tap). first[b] is the
// first item of bucket b (first[2n]: the item count, also in meta[0]).
template <int R, int MODE, bool BWD, typename acc_t>
CONVLORA_HD void phase_list(int n, const Smem<R, MODE, BWD, acc_t>& S, int tid) {
  using G = Geometry<R, MODE, BWD>;
  if (tid > 2 * n) return;
  int off = 0;
  for (int b = 0; b < tid; ++b) off += S.bucket[b];
  S.first[tid] = off;
  if (tid == 2 * n) {
    S.meta[0] = off;
    return;
  }
  for (int t = 0; t < G::kSrc; ++t) {
    const int nt = S.nt[t];
    if (token_bucket<R, MODE, BWD>(t, S.es[t], nt, n) != tid) continue;
    S.start[t] = off;
    for (int a = 0; a < (nt >> 3); ++a)
      for (int b = 0; b < (nt & 7); ++b) S.items[off++] = make_item(t, a, b);
  }
}

// Conv output (oy, ox) and down-sampling weight of an item.
template <typename acc_t>
struct ItemPos {
  int oy, ox;
  acc_t w;
};

template <typename scalar_t, typename acc_t>
CONVLORA_HD ItemPos<acc_t> item_pos(const TileArgs<scalar_t, acc_t>& A, int e, int gy, int gx,
                                    int a, int b) {
  const Taps<acc_t>& ry = A.taps[A.T.down_y + e * A.H + gy];
  const Taps<acc_t>& rx = A.taps[A.T.down_x + e * A.W + gx];
  ItemPos<acc_t> p;
  p.oy = ry.idx[a];
  p.ox = rx.idx[b];
  p.w = ry.w[a] * rx.w[b];
  return p;
}

// Phase 4 (per round): thread per item: pre-activation, then
//   forward:  cbuf = w_o GELU(C)
//   backward: cbuf = g = w_o du GELU'(C), ubuf = the nine U vectors
template <int R, int MODE, bool BWD, typename scalar_t, typename acc_t>
CONVLORA_HD void phase_conv(const TileArgs<scalar_t, acc_t>& A, const BlockPos& P, int r0,
                            int nitems, const Smem<R, MODE, BWD, acc_t>& S, int tid) {
  using G = Geometry<R, MODE, BWD>;
  const int sy0 = P.h0 - G::kSH, sx0 = P.w0 - G::kSH;
  const int zy0 = sy0 - G::kHalo, zx0 = sx0 - G::kHalo;
  for (int j = tid; j < G::kRound && r0 + j < nitems; j += kThreads) {
    const int it = S.items[r0 + j];
    const int t = item_token(it);
    const int ly = t / G::kSrcW, lx = t - ly * G::kSrcW;
    const int e = S.es[t];
    const ItemPos<acc_t> ip = item_pos(A, e, sy0 + ly, sx0 + lx, item_a(it), item_b(it));
    conv_item<R, MODE, G::kZW, G::kCell, BWD>(A.taps, A.T, e, A.T.scale[e], ip.oy, ip.ox, zy0,
                                              zx0, S.zs, S.w, e * weight_stride<R>(), S.b,
                                              S.cbuf, j * G::kItemRow, S.ubuf, j * G::kURow);
    for (int co = 0; co < R; ++co) {
      const acc_t c = S.cbuf[j * G::kItemRow + co];
      if (BWD) {
        S.cbuf[j * G::kItemRow + co] = ip.w * S.src[t * G::kCell + co] * gelu_erf_grad(c);
      } else {
        S.cbuf[j * G::kItemRow + co] = ip.w * gelu_erf(c);
      }
    }
  }
}

// Forward phase 5 (per round): thread per (tile token, channel): add the round's items of
// the token in item order.
template <int R, int MODE, typename acc_t>
CONVLORA_HD void phase_combine(int r0, const Smem<R, MODE, false, acc_t>& S, int tid) {
  using G = Geometry<R, MODE, false>;
  for (int u = tid; u < G::kSrc * R; u += kThreads) {
    const int t = u / R, c = u - t * R;
    const int nt = S.nt[t];
    if (nt == 0) continue;
    const int i0 = S.start[t], i1 = i0 + (nt >> 3) * (nt & 7);
    const int lo = i0 > r0 ? i0 : r0, hi = i1 < r0 + G::kRound ? i1 : r0 + G::kRound;
    acc_t sum = S.acc[t * G::kCell + c];
    for (int i = lo; i < hi; ++i) sum += S.cbuf[(i - r0) * G::kItemRow + c];
    S.acc[t * G::kCell + c] = sum;
  }
}

// Last phase: write the tile's rows of u = z + E(z) (forward) or dz = du + the gathered
// contributions (backward); tokens with an out-of-range expert get NaN.
template <int R, int MODE, bool BWD, typename scalar_t, typename acc_t>
CONVLORA_HD void phase_store(const TileArgs<scalar_t, acc_t>& A, const BlockPos& P,
                             const Smem<R, MODE, BWD, acc_t>& S, int tid) {
  using G = Geometry<R, MODE, BWD>;
  const int r = A.r;
  for (int u = tid; u < G::kTileH * G::kTileW * r; u += kThreads) {
    const int cell = u / r, c = u - cell * r;
    const int ty = cell / G::kTileW, tx = cell - ty * G::kTileW;
    const int gy = P.h0 + ty, gx = P.w0 + tx;
    if (gy >= A.H || gx >= A.W) continue;
    const int t = (ty + G::kSH) * G::kSrcW + tx + G::kSH;  // source index
    acc_t v;
    if (S.es[t] == kBadExpert) {
      v = nan_value<acc_t>();
    } else if (BWD) {
      v = S.src[t * G::kCell + c] + S.acc[cell * G::kCell + c];
    } else {
      const int zc = (ty + G::kHalo) * G::kZW + tx + G::kHalo;
      v = S.zs[zc * G::kCell + c] + S.acc[cell * G::kCell + c];
    }
    A.out[P.token0 * r + (static_cast<int64_t>(gy) * A.W + gx) * r + c] =
        static_cast<scalar_t>(v);
  }
}

// Backward phase 5 (per round): weight gradients. Each thread owns entries (co, ci, k) and
// biases of every expert and adds, in item order, the round's tile items of that expert:
//   dW[e, co, ci, k] += g[co] U(tap k)[ci],   db[e, co] += g[co]
template <int R, int MODE, typename acc_t>
CONVLORA_HD void phase_dw(int r, int n, int r0, int nitems,
                          const Smem<R, MODE, true, acc_t>& S, int tid) {
  using G = Geometry<R, MODE, true>;
  const int ne = grad_entries(r), nw = r * r * 9;
  const int lo_round = r0, hi_round = r0 + G::kRound < nitems ? r0 + G::kRound : nitems;
  for (int entry = tid; entry < ne; entry += kThreads) {
    int co, ci = 0, k = 0;
    if (entry < nw) {
      co = entry / (9 * r);
      const int rest = entry - co * 9 * r;
      ci = rest / 9;
      k = rest - ci * 9;
    } else {
      co = entry - nw;
    }
    for (int e = 0; e < n; ++e) {
      const int b0 = S.first[e], b1 = S.first[e + 1];  // tile items of expert e
      const int lo = b0 > lo_round ? b0 : lo_round, hi = b1 < hi_round ? b1 : hi_round;
      if (lo >= hi) continue;
      acc_t sum = acc_t(0);
      if (entry < nw) {
        for (int i = lo; i < hi; ++i)
          sum += S.cbuf[(i - r0) * G::kItemRow + co] * S.ubuf[(i - r0) * G::kURow + k * R + ci];
      } else {
        for (int i = lo; i < hi; ++i) sum += S.cbuf[(i - r0) * G::kItemRow + co];
      }
      S.dw[e * ne + entry] += sum;
    }
  }
}

// Backward phase 6 (per round): thread per (item, tap k): dU = W[e, :, :, k]^T g into ubuf
// (replacing U, which phase_dw has consumed).
template <int R, int MODE, typename scalar_t, typename acc_t>
CONVLORA_HD void phase_dU(int r0, int nitems, const Smem<R, MODE, true, acc_t>& S, int tid) {
  using G = Geometry<R, MODE, true>;
  for (int u = tid; u < G::kRound * 9; u += kThreads) {
    const int j = u / 9, k = u - j * 9;
    if (r0 + j >= nitems) break;
    const int e = S.es[item_token(S.items[r0 + j])];
    const int w_off = e * weight_stride<R>();
    acc_t d[R];
    CONVLORA_UNROLL
    for (int ci = 0; ci < R; ++ci) d[ci] = acc_t(0);
    for (int co = 0; co < R; ++co) {
      const acc_t g = S.cbuf[j * G::kItemRow + co];
      CONVLORA_UNROLL
      for (int ci = 0; ci < R; ++ci) d[ci] += S.w[w_off + (co * R + ci) * 9 + k] * g;
    }
    CONVLORA_UNROLL
    for (int ci = 0; ci < R; ++ci) S.ubuf[j * G::kURow + k * R + ci] = d[ci];
  }
}

// Backward phase 7 (per round, one per colour (cy, cx)): thread per (source of the colour,
// channel ci) adds its round items' dU, through the up-sampling taps, to the tile's dz.
// Sources of one colour are kSide apart, so their z reach (± halo) never overlaps: no two
// threads of the phase write the same value.
template <int R, int MODE, typename scalar_t, typename acc_t>
CONVLORA_HD void phase_scatter(const TileArgs<scalar_t, acc_t>& A, const BlockPos& P, int r0,
                               int nitems, int cy, int cx, const Smem<R, MODE, true, acc_t>& S,
                               int tid) {
  using G = Geometry<R, MODE, true>;
  constexpr int UT = Interp<MODE>::kUpTaps, SIDE = Interp<MODE>::kSide;
  const int ny = (G::kSrcH - cy + SIDE - 1) / SIDE, nx = (G::kSrcW - cx + SIDE - 1) / SIDE;
  const int sy0 = P.h0 - G::kSH, sx0 = P.w0 - G::kSH;
  const int hi_round = r0 + G::kRound < nitems ? r0 + G::kRound : nitems;
  for (int u = tid; u < ny * nx * R; u += kThreads) {
    const int j = u / R, ci = u - j * R;
    const int jy = j / nx, jx = j - jy * nx;
    const int t = (cy + jy * SIDE) * G::kSrcW + cx + jx * SIDE;
    const int nt = S.nt[t];
    if (nt == 0) continue;
    const int i0 = S.start[t], i1 = i0 + (nt >> 3) * (nt & 7);
    const int lo = i0 > r0 ? i0 : r0, hi = i1 < hi_round ? i1 : hi_round;
    if (lo >= hi) continue;
    const int e = S.es[t], s = A.T.scale[e];
    const int sH = s * A.H, sW = s * A.W;
    const int gy = sy0 + t / G::kSrcW, gx = sx0 + t % G::kSrcW;
    for (int i = lo; i < hi; ++i) {
      const int it = S.items[i];
      const ItemPos<acc_t> ip = item_pos(A, e, gy, gx, item_a(it), item_b(it));
      for (int ky = 0; ky < 3; ++ky) {
        const int p = ip.oy + ky - 1;
        if (p < 0 || p >= sH) continue;
        const Taps<acc_t>& tyt = A.taps[A.T.up_y[e] + p];
        for (int kx = 0; kx < 3; ++kx) {
          const int q = ip.ox + kx - 1;
          if (q < 0 || q >= sW) continue;
          const Taps<acc_t>& txt = A.taps[A.T.up_x[e] + q];
          const acc_t d = S.ubuf[(i - r0) * G::kURow + (ky * 3 + kx) * R + ci];
          CONVLORA_UNROLL
          for (int a = 0; a < UT; ++a) {
            const int ty = tyt.idx[a] - P.h0;
            if (ty < 0 || ty >= G::kTileH) continue;
            CONVLORA_UNROLL
            for (int b = 0; b < UT; ++b) {
              const int tx = txt.idx[b] - P.w0;
              if (tx < 0 || tx >= G::kTileW) continue;
              S.acc[(ty * G::kTileW + tx) * G::kCell + ci] += tyt.w[a] * txt.w[b] * d;
            }
          }
        }
      }
    }
  }
}

// Backward last phase: the block's weight-gradient partial to global memory (when the
// accumulators were in shared memory; otherwise they already are).
template <int R, int MODE, typename acc_t>
CONVLORA_HD void phase_flush_dw(int r, int n, bool dw_smem, acc_t* partial,
                                const Smem<R, MODE, true, acc_t>& S, int tid) {
  if (!dw_smem) return;
  const int ne = n * grad_entries(r);
  for (int i = tid; i < ne; i += kThreads) partial[i] = S.dw[i];
}

// Runs one block. Exec::phase(f) calls f(tid) for every thread of the block and then
// synchronises (a __syncthreads() on the GPU); Exec::poison(p, bytes) fills a buffer with
// NaN bytes in the checked CPU build and does nothing elsewhere.
template <int R, int MODE, bool BWD, typename Exec, typename scalar_t, typename acc_t>
CONVLORA_HD void run_block(Exec& ex, const TileArgs<scalar_t, acc_t>& A, const Layout& L,
                           unsigned char* smem, int64_t block) {
  using G = Geometry<R, MODE, BWD>;
  const BlockPos P = block_pos<G::kTileH, G::kTileW>(A, block);
  acc_t* partial = BWD ? A.dw_partial + block * A.n * grad_entries(A.r) : nullptr;
  const Smem<R, MODE, BWD, acc_t> S(smem, L, A.n, A.wbuf, partial, A.r);
  ex.poison(smem, L.bytes);
  ex.phase([&](int tid) { phase_load<R, MODE, BWD>(A, P, S, tid); });
  ex.phase([&](int tid) { phase_count<R, MODE, BWD>(A.n, S, tid); });
  ex.phase([&](int tid) { phase_list<R, MODE, BWD>(A.n, S, tid); });
  const int nitems = S.meta[0];
  for (int r0 = 0; r0 < nitems; r0 += G::kRound) {
    ex.poison(&S.cbuf[0], G::kRound * G::kItemRow * static_cast<int>(sizeof(acc_t)));
    if (BWD) ex.poison(&S.ubuf[0], G::kRound * G::kURow * static_cast<int>(sizeof(acc_t)));
    ex.phase([&](int tid) { phase_conv<R, MODE, BWD>(A, P, r0, nitems, S, tid); });
    if constexpr (!BWD) {
      ex.phase([&](int tid) { phase_combine<R, MODE>(r0, S, tid); });
    } else {
      ex.phase([&](int tid) { phase_dw<R, MODE>(A.r, A.n, r0, nitems, S, tid); });
      ex.phase([&](int tid) { phase_dU<R, MODE, scalar_t>(r0, nitems, S, tid); });
      for (int cy = 0; cy < Interp<MODE>::kSide; ++cy)
        for (int cx = 0; cx < Interp<MODE>::kSide; ++cx)
          ex.phase([&](int tid) { phase_scatter<R, MODE>(A, P, r0, nitems, cy, cx, S, tid); });
    }
  }
  ex.phase([&](int tid) { phase_store<R, MODE, BWD>(A, P, S, tid); });
  if constexpr (BWD) {
    ex.phase([&](int tid) { phase_flush_dw<R, MODE>(A.r, A.n, A.dw_smem, partial, S, tid); });
  }
}

// The reduce after the backward: dw[i] = sum over blocks of partial[block, i], in block
// order within four interleaved sums (i = e·grad_entries + entry; one thread per i).
template <typename acc_t>
CONVLORA_HD void reduce_entry(const acc_t* partial, int64_t blocks, int64_t per_block,
                              int64_t i, acc_t* dw) {
  acc_t s0 = acc_t(0), s1 = acc_t(0), s2 = acc_t(0), s3 = acc_t(0);
  int64_t b = 0;
  for (; b + 4 <= blocks; b += 4) {
    s0 += partial[(b + 0) * per_block + i];
    s1 += partial[(b + 1) * per_block + i];
    s2 += partial[(b + 2) * per_block + i];
    s3 += partial[(b + 3) * per_block + i];
  }
  for (; b < blocks; ++b) s0 += partial[b * per_block + i];
  dw[i] = (s0 + s1) + (s2 + s3);
}

}  // namespace tile
}  // namespace convlora
