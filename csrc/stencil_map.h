// The stencil when one expert serves a whole map (map routing, the authors' gating): block
// programs over dense grids, shared by the CUDA kernels and the CPU backend as
// stencil_tile.h's are (the same phases, the same reductions in the same order).
//
// With one expert e (scale s) for every token of a tile, the conv outputs the tile's
// tokens read form a grid: rows CY (the down-sampling rows of the tile's rows, at most
// kMaxDown per token) by columns CX; the upsampled values those outputs read form another,
// UY x UX (CY and CX widened by one, inside the s·H x s·W map). So a block computes U once
// per grid point, separably (rows, then columns), instead of once per conv output and tap
// as the per-token items do: at s = 8 bicubic, 36 U values per token where the items
// compute 144, each with 8 multiply-adds per channel instead of 16.
//
// Forward, per tile (phases, a barrier after each):
//   1 stage z (tile + halo), expert e's weights; warp 0 lists the conv rows, warp 1 the
//     conv columns       1b the U rows and columns, which tokens read each conv row
//   2 the U grid's up-sampling taps, from the per-call tables
//   3 V = Up_y(z) on the U rows                   4 U = Up_x(V)
//   5 C = bias + conv3x3(U) on the conv grid
//   6 u = z + sum of the token's down taps of GELU(C); GELU'(C) saved for the backward
// Backward (scatter, then a fold; no atomics, deterministic):
//   1-2 as the forward, du of the tile staged
//   3 V, and dC = GELU'(C) · sum over the tokens reading the output of w_down · du
//   4 U                       5 dW = sum over the grid of dC U (per block, fp32 partials)
//   6 dU = W^T dC on the U grid (over U)
//   7 T = Up_x^T(dU)          8 dZ = Up_y^T(T) over the tile and its halo, to a per-block
//                               partial in global memory
//   fold: dz = du + the partials of the (at most 2 x 2) blocks whose halo holds the token,
//         in block order; the weight-gradient partials are summed by reduce_entry.
#pragma once

#include "stencil_tile.h"

namespace convlora {
namespace tile {

// Ranks the map programs are built for (r <= 8: the paper's r = 3 and SAM's usual ranks);
// larger ranks run the per-token programs with the map's expert on every token.
constexpr int kMapMaxRank = 8;

template <int R, int INTERP>
struct MapGeometry {
  static constexpr int kHalo = Interp<INTERP>::kHalo;
  static constexpr int kDown = Interp<INTERP>::kMaxDown;  // conv rows one token reads
  static constexpr int kUT = Interp<INTERP>::kUpTaps;     // z rows one U row combines
  static constexpr int kCell = R + 1;                     // odd strides: no bank conflicts
  // 8 x 8 tokens unless the U grid would outgrow ~48 KB (bicubic at R = 8: 4 x 4).
  static constexpr int kTile = (kDown + 2) * 8 * (kDown + 2) * 8 * kCell <= 12288 ? 8 : 4;
  static constexpr int kZ = kTile + 2 * kHalo;       // staged z, and the dz partial, side
  static constexpr int kMaxC = kDown * kTile;        // conv rows (columns) of a tile
  static constexpr int kMaxU = (kDown + 2) * kTile;  // U rows (columns): conv rows +- 1
  static constexpr int kReaders = 2;                 // tokens reading one conv row, at most
  static_assert(R % 4 == 0, "weight rows read in 128-bit loads");
  // A conv-grid cell (C, dC): R channels in 128-bit accesses, 4 x an odd number of words,
  // so the 8 lanes of a quarter warp reading neighbouring cells fall in distinct banks.
  static constexpr int kCCell = R % 8 == 0 ? R + 4 : R;
  // Row stride of the conv grid: 16 words more than a multiple of 32, so cells of
  // neighbouring rows that a warp reads at once fall in other banks.
  // At R = 4 the forward's conv rows hold a spare cell after every 8 (c_fwd_at), so the
  // conv columns of a tile row's tokens, s apart (the combine's lanes read them at once),
  // fall in distinct banks up to s = 8, where without it every token's would share one
  // bank group (at R = 8 the cells' 12 words already spread them). The backward's dC keeps
  // plain rows: its loops walk them, and the spare cells' index arithmetic cost more
  // instructions there than the banks saved.
  static constexpr int kSpare = kCCell == R ? 1 : 0;
  static constexpr int kCRow =
      ((kMaxC + kSpare * ((kMaxC - 1) / 8)) * kCCell + 31) / 32 * 32 + 16;
  // A U-grid cell (U, dU). At R = 4 one 128-bit word group, which the forward's conv
  // reads and the backward's dU pass writes whole: the lanes' consecutive U columns then
  // fall in all eight bank quads. At R = 8 (two groups a cell, whose first groups would
  // share four quads) R + 1: scalar accesses, consecutive columns in distinct banks.
  static constexpr int kUCell = R == 4 ? 4 : kCell;
  static constexpr bool kVecU = kUCell % 4 == 0;
  // Row stride of the U grid: an odd multiple of R more than a multiple of 32, so the
  // 32 / R rows whose channel c the backward's column pass reads at once tile the 32 banks
  // and rows stay 128-bit aligned. 3R is the multiple the cost model
  // (benchmarks/cost_model.py) counts fewest wavefronts for: in the forward's conv (lanes:
  // conv outputs, of two conv rows where a warp straddles them) and in the backward's
  // weight gradient at R = 4 (lanes: the nine taps' channels of one conv output, three U
  // rows). The backward at R = 8 takes R: as many wavefronts there, and bilinear 2 KB
  // less shared memory than 3R, which keeps three of its blocks on an H100 SM.
  template <bool BWD>
  static CONVLORA_HD constexpr int u_row() {
    constexpr int off = (BWD && R == 8 ? 1 : 3) * R;
    return (kMaxU * kUCell - off + 31) / 32 * 32 + off;
  }
  // Row stride of V (T in the backward): R more than a multiple of 32 words, so the rows
  // of one warp's (row, channel) threads, R channels each, tile the 32 banks.
  static constexpr int kVRow = (kZ * kCell - R + 31) / 32 * 32 + R;
  static CONVLORA_HD constexpr int v_at(int j, int x) { return j * kVRow + x * kCell; }
  static CONVLORA_HD constexpr int c_at(int i, int j) { return i * kCRow + j * kCCell; }
  static CONVLORA_HD constexpr int c_fwd_at(int i, int j) {
    return i * kCRow + (j + kSpare * (j >> 3)) * kCCell;
  }
  // Up tap a of U entry j: by tap, then entry (threads of consecutive entries: consecutive
  // words).
  static CONVLORA_HD constexpr int ut(int j, int a) { return a * kMaxU + j; }
  template <bool BWD>
  static CONVLORA_HD constexpr int u_at(int p, int q) { return p * u_row<BWD>() + q * kUCell; }
};

// One axis's lists (rows or columns) of a tile, in shared memory.
//   n[0] conv rows, n[1] U rows
//   conv[i]     the conv row (in the s·H map) of list entry i, ascending
//   cu[3i + k]  U list entry of conv row conv[i] + k - 1, or -1 outside the map (zero)
//   uc[3j + k]  conv list entry i with cu[3i + k] == j, or -1
//   urow[j]     the U row of entry j, ascending
//   utap[ut(j, a)], utw[...]  its up-sampling taps: staged-z row (relative to the tile
//               origin minus the halo) and weight
//   tokc[4d + a], tokw[...]    conv list entry and weight of token row d's down tap a
//   tokn[d]     its down-tap count
//   readers[2i + m]  4d + a of the m-th token tap reading conv entry i, or -1
template <typename acc_t>
struct AxisLists {
  SArr<int> n, conv, cu, uc, urow, utap, tokc, tokn, readers;
  SArr<acc_t> utw, tokw;
};

template <int R, int INTERP>
struct AxisSizes {
  using G = MapGeometry<R, INTERP>;
  static constexpr int kInts = 2 + G::kMaxC + 3 * G::kMaxC + 3 * G::kMaxU + G::kMaxU +
                               G::kUT * G::kMaxU + 4 * G::kTile + G::kTile +
                               G::kReaders * G::kMaxC;
  static constexpr int kAccs = G::kUT * G::kMaxU + 4 * G::kTile;
};

// Byte offsets of a map block's shared arrays.
struct MapLayout {
  int zs, vbuf, ubuf, cbuf, dus, w, b, ints_y, ints_x, accs_y, accs_x, bytes;
};

template <int R, int INTERP, bool BWD, typename acc_t>
CONVLORA_HD MapLayout make_map_layout() {
  using G = MapGeometry<R, INTERP>;
  using S = AxisSizes<R, INTERP>;
  MapLayout L;
  int off = 0;
  auto take = [&off](int bytes) {
    const int at = off;
    off += align16(bytes);
    return at;
  };
  const int A = static_cast<int>(sizeof(acc_t)), I = static_cast<int>(sizeof(int));
  L.zs = take(G::kZ * G::kZ * G::kCell * A);  // z; in the backward later the dz region
  L.vbuf = take(G::kMaxU * G::kVRow * A);  // V; backward later T
  L.ubuf = take(G::kMaxU * G::template u_row<BWD>() * A);  // U; backward later dU
  L.cbuf = take(G::kMaxC * G::kCRow * A);  // C (forward) or dC (backward)
  L.dus = take(BWD ? G::kTile * G::kTile * G::kCell * A : 0);
  L.w = take(9 * R * R * A);  // forward W [k][ci][co]; backward W^T [k][co][ci]
  L.b = take(R * A);
  L.ints_y = take(S::kInts * I);
  L.ints_x = take(S::kInts * I);
  L.accs_y = take(S::kAccs * A);
  L.accs_x = take(S::kAccs * A);
  L.bytes = off;
  return L;
}

template <int R, int INTERP, typename acc_t>
CONVLORA_HD AxisLists<acc_t> axis_lists(unsigned char* base, int ints, int accs,
                                        const char* name) {
  using G = MapGeometry<R, INTERP>;
  (void)name;
  AxisLists<acc_t> X;
  int o = ints;
  auto next_int = [&](int count, const char* nm) {
    (void)nm;
    const SArr<int> a = CONVLORA_SARR(int, base, o, count, nm);
    o += count * static_cast<int>(sizeof(int));
    return a;
  };
  X.n = next_int(2, "axis counts");
  X.conv = next_int(G::kMaxC, "conv rows");
  X.cu = next_int(3 * G::kMaxC, "conv to U");
  X.uc = next_int(3 * G::kMaxU, "U to conv");
  X.urow = next_int(G::kMaxU, "U rows");
  X.utap = next_int(G::kUT * G::kMaxU, "up taps");
  X.tokc = next_int(4 * G::kTile, "token down taps");
  X.tokn = next_int(G::kTile, "token down-tap counts");
  X.readers = next_int(G::kReaders * G::kMaxC, "conv readers");
  int a = accs;
  X.utw = CONVLORA_SARR(acc_t, base, a, G::kUT * G::kMaxU, "up weights");
  a += G::kUT * G::kMaxU * static_cast<int>(sizeof(acc_t));
  X.tokw = CONVLORA_SARR(acc_t, base, a, 4 * G::kTile, "token down weights");
  return X;
}

// The typed shared arrays of a map block.
template <int R, int INTERP, bool BWD, typename acc_t>
struct MapSmem {
  using G = MapGeometry<R, INTERP>;
  SArr<acc_t> zs, vbuf, ubuf, cbuf, dus, w, b;
  AxisLists<acc_t> y, x;
  CONVLORA_HD MapSmem(unsigned char* base, const MapLayout& L)
      : zs(CONVLORA_SARR(acc_t, base, L.zs, G::kZ * G::kZ * G::kCell, "z")),
        vbuf(CONVLORA_SARR(acc_t, base, L.vbuf, G::kMaxU * G::kVRow, "V")),
        ubuf(CONVLORA_SARR(acc_t, base, L.ubuf, G::kMaxU * G::template u_row<BWD>(), "U")),
        cbuf(CONVLORA_SARR(acc_t, base, L.cbuf, G::kMaxC * G::kCRow, "C")),
        dus(CONVLORA_SARR(acc_t, base, L.dus, BWD ? G::kTile * G::kTile * G::kCell : 0, "du")),
        w(CONVLORA_SARR(acc_t, base, L.w, 9 * R * R, "weights")),
        b(CONVLORA_SARR(acc_t, base, L.b, R, "bias")),
        y(axis_lists<R, INTERP, acc_t>(base, L.ints_y, L.accs_y, "rows")),
        x(axis_lists<R, INTERP, acc_t>(base, L.ints_x, L.accs_x, "columns")) {}
};

// Checked build: the list invariants the programs rely on (down taps of consecutive tokens
// are contiguous and advance; one conv row is read by at most two token taps).
CONVLORA_HD void check_list(bool ok, const char* what) {
#if defined(CONVLORA_CHECKED)
  if (!ok) throw std::logic_error(std::string("stencil map lists (checked build): ") + what);
#else
  (void)ok;
  (void)what;
#endif
}

// Lists of one axis, built by one warp in two phases (lane = thread index mod 32). The
// tile covers map rows [o, o + t) of L; down = table offset of its expert's down taps on
// this axis; sL the upsampled extent. A token's down taps are consecutive conv rows
// [lo_d, hi_d], and lo_d and hi_d do not decrease with d (checked), so the conv list is
// the union of those ranges in order: token d adds the rows above hi_{d-1}, from the
// count the tokens before it add.
//
// Phase 1 (axis_conv): every lane adds up the tokens' new rows (the same loop of reads of
// the per-call tables); lane d < t writes its token's taps and its new conv rows; all
// lanes mark the readers and U-to-conv slots empty (phase 2 fills them).
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void axis_conv(const Taps<acc_t>* taps, int down, int o, int t, int lane,
                           const AxisLists<acc_t>& X) {
  using G = MapGeometry<R, INTERP>;
  for (int i = lane; i < G::kReaders * G::kMaxC; i += 32) X.readers[i] = -1;
  for (int j = lane; j < 3 * G::kMaxU; j += 32) X.uc[j] = -1;
  int nc = 0, prev_lo = -1, prev_hi = -1, off = 0, first = 0;
  for (int d = 0; d < t; ++d) {
    const Taps<acc_t>& tp = taps[down + o + d];
    const int lo = tp.idx[0], hi = lo + tp.n - 1;
#if defined(CONVLORA_CHECKED)
    for (int a = 1; a < tp.n; ++a)
      check_list(tp.idx[a] == lo + a, "a token's down taps not consecutive");
#endif
    check_list(lo >= prev_lo && hi >= prev_hi, "a token's down taps going back");
    const int f = lo > prev_hi + 1 ? lo : prev_hi + 1;  // the first row it adds
    if (d == lane) {
      off = nc;
      first = f;
    }
    nc += hi >= f ? hi - f + 1 : 0;
    prev_lo = lo;
    prev_hi = hi;
  }
  check_list(nc <= G::kMaxC, "too many conv rows");
  if (lane == t - 1) X.n[0] = nc;
  if (lane >= t) return;
  const Taps<acc_t>& tp = taps[down + o + lane];
  const int lo = tp.idx[0];
  X.tokn[lane] = tp.n;
  for (int a = 0; a < tp.n; ++a) {
    const int c = lo + a;
    // rows below `first` are the previous token's last rows: entries off - 1, off - 2, ...
    const int k = off + c - first;
    if (c >= first) X.conv[k] = c;
    X.tokc[4 * lane + a] = k;
    X.tokw[4 * lane + a] = tp.w[a];
  }
}

// Phase 2 (axis_u): lane i < nc (conv entry i, row c) adds up the conv entries' new U rows
// (each entry's rows c - 1 .. c + 1 inside the map, above the previous entry's), then
// writes entry i's links to the U list, the U rows it adds, and the token taps reading
// row c (at most two, in token order).
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void axis_u(const Taps<acc_t>* taps, int down, int o, int t, int sL, int lane,
                        const AxisLists<acc_t>& X) {
  using G = MapGeometry<R, INTERP>;
  const int nc = X.n[0];
  int nu = 0, prev = -3, off = 0, first = 0, c = 0, pc = -3;
  for (int i = 0; i < nc; ++i) {
    const int ci = X.conv[i];
    const int lo = ci - 1 > prev + 2 ? ci - 1 : prev + 2;  // the first U row it adds
    const int f = lo > 0 ? lo : 0, l = ci + 1 < sL - 1 ? ci + 1 : sL - 1;
    if (i == lane) {
      off = nu;
      first = f;
      c = ci;
      pc = prev;
    }
    nu += l >= f ? l - f + 1 : 0;
    prev = ci;
  }
  check_list(nu <= G::kMaxU, "too many U rows");
  if (lane == 0) X.n[1] = nu;
  if (lane >= nc) return;
  for (int k = 0; k < 3; ++k) {
    const int p = c + k - 1;
    int j = -1;
    if (p >= 0 && p < sL) {
      // rows below `first` are the previous entry's last U rows (its last: pc + 1)
      j = p >= first ? off + p - first : off - 1 - (pc + 1 - p);
      if (p >= first) X.urow[j] = p;
      X.uc[3 * j + k] = lane;
    }
    X.cu[3 * lane + k] = j;
  }
  int m = 0;
  for (int d = 0; d < t; ++d) {
    const Taps<acc_t>& tp = taps[down + o + d];
    const int a = c - tp.idx[0];
    if (a < 0 || a >= tp.n) continue;
    check_list(m < G::kReaders, "a conv row read by three token taps");
    X.readers[G::kReaders * lane + m] = 4 * d + a;
    ++m;
  }
}

// Up-sampling taps of U entry j (one thread per entry): staged-z rows and weights.
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void load_up_taps(const Taps<acc_t>* taps, int up, int z0, int j,
                              const AxisLists<acc_t>& X) {
  using G = MapGeometry<R, INTERP>;
  const Taps<acc_t>& tp = taps[up + X.urow[j]];
  CONVLORA_UNROLL
  for (int a = 0; a < G::kUT; ++a) {
    X.utap[G::ut(j, a)] = tp.idx[a] - z0;
    X.utw[G::ut(j, a)] = tp.w[a];
  }
}

// The staged-z columns (rows) [lo, hi) the U grid reads along an axis.
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void z_span(const AxisLists<acc_t>& X, int& lo, int& hi) {
  using G = MapGeometry<R, INTERP>;
  const int nu = X.n[1];
  lo = X.utap[G::ut(0, 0)];
  hi = lo;
  for (int a = 0; a < G::kUT; ++a) {
    const int v = X.utap[G::ut(nu - 1, a)];
    hi = v > hi ? v : hi;
  }
  ++hi;
}

// Where a map block sits, and its expert (or -1 when the map's index is out of range).
struct MapPos {
  BlockPos P;
  int m;       // map
  int e, s;    // expert and scale
  int th, tw;  // tokens of the tile inside the map
};

template <int R, int INTERP, typename scalar_t, typename acc_t>
CONVLORA_HD MapPos map_pos(const TileArgs<scalar_t, acc_t>& A, int64_t block) {
  using G = MapGeometry<R, INTERP>;
  MapPos M;
  M.P = block_pos<G::kTile, G::kTile>(A, block);
  M.m = static_cast<int>(block) / (A.tiles_y * A.tiles_x);
  const int e = A.expert_index[M.m];
  M.e = e >= 0 && e < A.n ? e : -1;
  M.s = M.e >= 0 ? A.T.scale[M.e] : 1;
  M.th = A.H - M.P.h0 < G::kTile ? A.H - M.P.h0 : G::kTile;
  M.tw = A.W - M.P.w0 < G::kTile ? A.W - M.P.w0 : G::kTile;
  return M;
}

// Phase 1: stage z (and du), the expert's weights (W, or W^T for the backward) and bias;
// warp 0 lists the conv rows, warp 1 the conv columns.
template <int R, int INTERP, bool BWD, typename scalar_t, typename acc_t>
CONVLORA_HD void map_phase_load(const TileArgs<scalar_t, acc_t>& A, const MapPos& M,
                                const MapSmem<R, INTERP, BWD, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  if (M.e < 0) return;
  const BlockPos& P = M.P;
  stage_region<R, G::kZ, G::kZ, G::kCell>(A.z + P.token0 * A.r, A.H, A.W, A.r, P.h0 - G::kHalo,
                                         P.w0 - G::kHalo, A.vec_z, S.zs, tid);
  if (BWD)
    stage_region<R, G::kTile, G::kTile, G::kCell>(A.du + P.token0 * A.r, A.H, A.W, A.r, P.h0,
                                                 P.w0, A.vec_z, S.dus, tid);
  constexpr int WS = weight_stride<R>();
  const int wsrc = BWD ? A.n * (WS + R) + M.e * WS : M.e * WS;
  for (int i = tid; i < 9 * R * R; i += kThreads) S.w[i] = A.wbuf[wsrc + i];
  for (int i = tid; i < R; i += kThreads) S.b[i] = A.wbuf[A.n * WS + M.e * R + i];
  if (tid < 32)
    axis_conv<R, INTERP>(A.taps, A.T.down_y + M.e * A.H, P.h0, M.th, tid, S.y);
  else if (tid < 64)
    axis_conv<R, INTERP>(A.taps, A.T.down_x + M.e * A.W, P.w0, M.tw, tid - 32, S.x);
}

// Phase 1b: warp 0 links the rows' lists, warp 1 the columns'.
template <int R, int INTERP, bool BWD, typename scalar_t, typename acc_t>
CONVLORA_HD void map_phase_lists(const TileArgs<scalar_t, acc_t>& A, const MapPos& M,
                                 const MapSmem<R, INTERP, BWD, acc_t>& S, int tid) {
  if (M.e < 0) return;
  if (tid < 32)
    axis_u<R, INTERP>(A.taps, A.T.down_y + M.e * A.H, M.P.h0, M.th, M.s * A.H, tid, S.y);
  else if (tid < 64)
    axis_u<R, INTERP>(A.taps, A.T.down_x + M.e * A.W, M.P.w0, M.tw, M.s * A.W, tid - 32, S.x);
}

// Phase 2: the up-sampling taps of every U row and column.
template <int R, int INTERP, bool BWD, typename scalar_t, typename acc_t>
CONVLORA_HD void map_phase_taps(const TileArgs<scalar_t, acc_t>& A, const MapPos& M,
                                const MapSmem<R, INTERP, BWD, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  if (M.e < 0) return;
  const int nuy = S.y.n[1], nux = S.x.n[1];
  for (int j = tid; j < nuy + nux; j += kThreads) {
    if (j < nuy)
      load_up_taps<R, INTERP>(A.taps, A.T.up_y[M.e], M.P.h0 - G::kHalo, j, S.y);
    else
      load_up_taps<R, INTERP>(A.taps, A.T.up_x[M.e], M.P.w0 - G::kHalo, j - nuy, S.x);
  }
}

// V[j][x] = sum_a wy z[row a of U row j][x], for the staged columns the U grid reads.
// Rows in turn, each row's (column, channel) values across the threads (no division by a
// runtime size on the per-value path).
template <int R, int INTERP, bool BWD, typename acc_t>
CONVLORA_HD void map_rows_up(const MapSmem<R, INTERP, BWD, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  int lo, hi;
  z_span<R, INTERP>(S.x, lo, hi);
  const int nuy = S.y.n[1];
  for (int j = 0; j < nuy; ++j) {
    for (int v = tid; v < (hi - lo) * R; v += kThreads) {
      const int x = lo + v / R, c = v % R;
      acc_t sum = acc_t(0);
      CONVLORA_UNROLL
      for (int a = 0; a < G::kUT; ++a)
        sum += S.y.utw[G::ut(j, a)] *
               S.zs[(S.y.utap[G::ut(j, a)] * G::kZ + x) * G::kCell + c];
      S.vbuf[G::v_at(j, x) + c] = sum;
    }
  }
}

// U[j][q] = sum_b wx V[j][column b of U column q].
template <int R, int INTERP, bool BWD, typename acc_t>
CONVLORA_HD void map_cols_up(const MapSmem<R, INTERP, BWD, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  const int nuy = S.y.n[1], nux = S.x.n[1];
  for (int j = 0; j < nuy; ++j) {
    for (int v = tid; v < nux * R; v += kThreads) {
      const int q = v / R, c = v % R;
      acc_t sum = acc_t(0);
      CONVLORA_UNROLL
      for (int b = 0; b < G::kUT; ++b)
        sum += S.x.utw[G::ut(q, b)] *
               S.vbuf[G::v_at(j, S.x.utap[G::ut(q, b)]) + c];
      S.ubuf[G::template u_at<BWD>(j, q) + c] = sum;
    }
  }
}

// Forward phase 5: C = bias + conv3x3(U) at every conv grid point (zero U outside the map).
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void map_phase_conv(const MapSmem<R, INTERP, false, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  const int ncy = S.y.n[0], ncx = S.x.n[0];
  for (int cell = tid; cell < ncy * ncx; cell += kThreads) {
    const int i = cell / ncx, j = cell - i * ncx;
    acc_t c[R];
    CONVLORA_UNROLL
    for (int co = 0; co < R; ++co) c[co] = S.b[co];
    // every lane takes every tap (a tap outside the map: U read at (0, 0), times zero),
    // so a warp's lanes stay together
    CONVLORA_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      const int p = S.y.cu[3 * i + ky];
      CONVLORA_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        const int q = S.x.cu[3 * j + kx];
        const bool in = p >= 0 && q >= 0;
        const int k = ky * 3 + kx, ub = in ? G::template u_at<false>(p, q) : 0;
        acc_t uc[R];  // every lane loads (R = 4: one 128-bit load)
        if constexpr (G::kVecU) {
          CONVLORA_UNROLL
          for (int ci = 0; ci < R; ci += 4) {
            const V4<acc_t> v = S.ubuf.load4(ub + ci);
            CONVLORA_UNROLL
            for (int q4 = 0; q4 < 4; ++q4) uc[ci + q4] = v.v[q4];
          }
        } else {
          CONVLORA_UNROLL
          for (int ci = 0; ci < R; ++ci) uc[ci] = S.ubuf[ub + ci];
        }
        CONVLORA_UNROLL
        for (int ci = 0; ci < R; ++ci) {
          const acc_t uv = in ? uc[ci] : acc_t(0);
          CONVLORA_UNROLL
          for (int co = 0; co < R; co += 4) {  // 128-bit loads of W's row (R: x4)
            const V4<acc_t> wv = S.w.load4((k * R + ci) * R + co);
            CONVLORA_UNROLL
            for (int q4 = 0; q4 < 4; ++q4) c[co + q4] += wv.v[q4] * uv;
          }
        }
      }
    }
    CONVLORA_UNROLL
    for (int co = 0; co < R; co += 4)
      S.cbuf.store4(G::c_fwd_at(i, j) + co, {{c[co], c[co + 1], c[co + 2], c[co + 3]}});
  }
}

// Forward phase 6: u = z + sum_{a, b} wy_a wx_b GELU(C) for each tile token, the slopes
// GELU'(C) to their slots (a · taps_x + b; the unused slots zero). Thread per (token,
// channel) of the r channels, not R: at the authors' r = 3 (R = 4) a quarter fewer warps
// run the GELUs (the rank's divisor made once a call, A.by_r). A map whose expert index is
// out of range gets NaN: no taps, every slot zero (one path of code: the lists and z of
// such a block are not staged and not read).
template <int R, int INTERP, typename scalar_t, typename acc_t>
CONVLORA_HD void map_phase_combine(const TileArgs<scalar_t, acc_t>& A, const MapPos& M,
                                   const MapSmem<R, INTERP, false, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  constexpr int SLOTS = Interp<INTERP>::kMaxDown * Interp<INTERP>::kMaxDown;
  const int r = A.r;
  const bool ok = M.e >= 0;
  for (int u = tid; u < M.th * M.tw * r; u += kThreads) {
    const int cell = A.by_r(u), c = u - cell * r;
    const int ty = cell / M.tw, tx = cell - ty * M.tw;
    const int64_t tok = M.P.token0 + static_cast<int64_t>(M.P.h0 + ty) * A.W + M.P.w0 + tx;
    acc_t* pre = A.pre == nullptr ? nullptr : A.pre + tok * SLOTS * r + c;
    const int na = ok ? S.y.tokn[ty] : 0, nb = ok ? S.x.tokn[tx] : 0;
    acc_t sum = acc_t(0);
    for (int a = 0; a < na; ++a) {
      const int i = S.y.tokc[4 * ty + a];
      const acc_t wa = S.y.tokw[4 * ty + a];
      for (int b = 0; b < nb; ++b) {
        const acc_t cv = S.cbuf[G::c_fwd_at(i, S.x.tokc[4 * tx + b]) + c];
        acc_t slope;  // computed saved or not: one path of code
        sum += wa * S.x.tokw[4 * tx + b] * gelu_and_grad<scalar_t>(cv, slope);
        if (pre != nullptr) pre[(a * nb + b) * r] = A.raw_pre ? cv : slope;
      }
    }
    if (pre != nullptr)
      for (int slot = na * nb; slot < SLOTS; ++slot) pre[slot * r] = acc_t(0);
    const acc_t zv = ok ? S.zs[((ty + G::kHalo) * G::kZ + tx + G::kHalo) * G::kCell + c]
                        : nan_value<acc_t>();
    A.out[tok * r + c] = static_cast<scalar_t>(zv + sum);
  }
}

// Backward phase 3 (with V): dC[i][j][co] = GELU'(C) sum over the token taps reading
// (conv row i, conv column j) of wy wx du[token][co]; GELU'(C) from the forward's saved
// slots.
template <int R, int INTERP, typename scalar_t, typename acc_t>
CONVLORA_HD void map_dc(const TileArgs<scalar_t, acc_t>& A, const MapPos& M,
                        const MapSmem<R, INTERP, true, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  constexpr int SLOTS = Interp<INTERP>::kMaxDown * Interp<INTERP>::kMaxDown;
  const int ncy = S.y.n[0], ncx = S.x.n[0], r = A.r;
  for (int i = 0; i < ncy; ++i) {
    for (int v = tid; v < ncx * R; v += kThreads) {
      const int j = v / R, co = v % R;
      acc_t g = acc_t(0);
      if (co < r) {
        acc_t sum = acc_t(0), slope = acc_t(0);
        CONVLORA_UNROLL
        for (int my = 0; my < G::kReaders; ++my) {
          const int ry = S.y.readers[G::kReaders * i + my];
          if (ry < 0) continue;
          const int ty = ry >> 2, a = ry & 3;
          CONVLORA_UNROLL
          for (int mx = 0; mx < G::kReaders; ++mx) {
            const int rx = S.x.readers[G::kReaders * j + mx];
            if (rx < 0) continue;
            const int tx = rx >> 2, b = rx & 3;
            const int64_t tok =
                M.P.token0 + static_cast<int64_t>(M.P.h0 + ty) * A.W + M.P.w0 + tx;
            slope = A.pre[(tok * SLOTS + a * S.x.tokn[tx] + b) * r + co];
            sum += S.y.tokw[ry] * S.x.tokw[rx] * S.dus[(ty * G::kTile + tx) * G::kCell + co];
          }
        }
        g = sum * slope;
      }
      S.cbuf[G::c_at(i, j) + co] = g;
    }
  }
}

// Threads per input of map_phase_dw: its 9R + 1 inputs (the bias one of them) take 37 of
// the block's 256 threads at R = 4, so each input's sums are split over this many runs of
// conv rows (one per thread), added up by map_phase_dw_sum.
template <int R>
CONVLORA_HD constexpr int map_dw_runs() {
  return kThreads / (9 * R + 1) > 1 ? kThreads / (9 * R + 1) : 1;
}

// Where input u's R output-channel sums go in expert e's slice dst of a partial ([co][k][ci]:
// output channels 9R apart; u = 9R, the bias: contiguous) and the step between them.
template <int R, typename acc_t>
struct DwOut {
  acc_t* at;
  int step;
  CONVLORA_HD DwOut(acc_t* dst, int u) {
    const bool bias = u == 9 * R;
    at = dst + (bias ? grad_bias_index<R>(0) : grad_index<R>(0, u / R, u % R));
    step = bias ? 1 : 9 * R;
  }
};

// Backward phase 5: the block's weight gradients, written to its partial (the other
// experts' entries zero). Thread per input (tap k, input channel ci; or the bias, an input
// of one) and run of conv rows: R output-channel sums over its rows of the conv grid in
// order. Every lane takes every grid point (a tap outside the map: U read at (0, 0), times
// zero), so a warp's lanes stay together. With one run the sums go to the partial; with
// several to scratch (over V, which the backward no longer reads) for map_phase_dw_sum.
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void map_phase_dw(int n, const MapPos& M, acc_t* partial,
                              const MapSmem<R, INTERP, true, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  constexpr int GS = grad_stride<R>(), NS = 9 * R + 1, RUNS = map_dw_runs<R>();
  static_assert(RUNS == 1 || RUNS * NS * (R + 1) <= G::kMaxU * G::kVRow,
                "the runs' sums fit over V");
  for (int i = tid; i < n * GS; i += kThreads)
    if (M.e < 0 || i / GS != M.e) partial[i] = acc_t(0);
  if (M.e < 0) return;
  const int ncy = S.y.n[0], ncx = S.x.n[0];
  acc_t* dst = partial + M.e * GS;
  for (int v = tid; v < RUNS * NS; v += kThreads) {
    const int u = v % NS, run = v / NS;
    const int i0 = run * ncy / RUNS, i1 = (run + 1) * ncy / RUNS;
    const int scratch = (run * NS + u) * (R + 1);  // odd stride: no bank conflict
    const bool bias = u == 9 * R;
    const int k = bias ? 0 : u / R, ci = u - k * R, ky = k / 3, kx = k - ky * 3;
    acc_t acc[R];
    CONVLORA_UNROLL
    for (int co = 0; co < R; ++co) acc[co] = acc_t(0);
    for (int i = i0; i < i1; ++i) {
      const int p = S.y.cu[3 * i + ky];
      for (int j = 0; j < ncx; ++j) {
        const int q = S.x.cu[3 * j + kx];
        const bool in = p >= 0 && q >= 0;
        const acc_t raw = S.ubuf[in ? G::template u_at<true>(p, q) + ci : 0];  // all lanes load
        const acc_t uv = bias ? acc_t(1) : in ? raw : acc_t(0);
        const int cb = G::c_at(i, j);
        CONVLORA_UNROLL
        for (int co = 0; co < R; co += 4) {  // dC in 128-bit loads
          const V4<acc_t> g = S.cbuf.load4(cb + co);
          CONVLORA_UNROLL
          for (int q4 = 0; q4 < 4; ++q4) acc[co + q4] += g.v[q4] * uv;
        }
      }
    }
    if (RUNS > 1) {
      CONVLORA_UNROLL
      for (int co = 0; co < R; ++co) S.vbuf[scratch + co] = acc[co];
    } else {
      const DwOut<R, acc_t> out(dst, u);
      CONVLORA_UNROLL
      for (int co = 0; co < R; ++co) out.at[co * out.step] = acc[co];
    }
  }
}

// Backward phase 5b (map_dw_runs > 1): thread per input adds its runs' partial sums in run
// order into the block's partial.
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void map_phase_dw_sum(const MapPos& M, acc_t* partial,
                                  const MapSmem<R, INTERP, true, acc_t>& S, int tid) {
  constexpr int NS = 9 * R + 1, RUNS = map_dw_runs<R>();
  if (M.e < 0) return;
  acc_t* dst = partial + M.e * grad_stride<R>();
  for (int u = tid; u < NS; u += kThreads) {
    const DwOut<R, acc_t> out(dst, u);
    for (int co = 0; co < R; ++co) {
      acc_t acc = S.vbuf[u * (R + 1) + co];
      for (int run = 1; run < RUNS; ++run) acc += S.vbuf[(run * NS + u) * (R + 1) + co];
      out.at[co * out.step] = acc;
    }
  }
}

// Backward phase 6: dU[p][q][ci] = sum over the conv outputs reading U(p, q) at tap
// (ky, kx) of sum_co W^T[k][co][ci] dC[co], over U.
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void map_phase_du(const MapSmem<R, INTERP, true, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  const int nuy = S.y.n[1], nux = S.x.n[1];
  for (int cell = tid; cell < nuy * nux; cell += kThreads) {
    const int p = cell / nux, q = cell - p * nux;
    acc_t d[R];
    CONVLORA_UNROLL
    for (int ci = 0; ci < R; ++ci) d[ci] = acc_t(0);
    // every lane takes every tap (no conv output there: dC read at (0, 0), times zero)
    CONVLORA_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      const int i = S.y.uc[3 * p + ky];
      CONVLORA_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        const int j = S.x.uc[3 * q + kx];
        const bool in = i >= 0 && j >= 0;
        const int k = ky * 3 + kx, cb = in ? G::c_at(i, j) : 0;
        CONVLORA_UNROLL
        for (int co0 = 0; co0 < R; co0 += 4) {
          const V4<acc_t> raw = S.cbuf.load4(cb + co0);  // every lane loads (128 bits)
          CONVLORA_UNROLL
          for (int c4 = 0; c4 < 4; ++c4) {
            const acc_t g = in ? raw.v[c4] : acc_t(0);
            CONVLORA_UNROLL
            for (int ci = 0; ci < R; ci += 4) {  // 128-bit loads of Wᵀ's row (R: x4)
              const V4<acc_t> wv = S.w.load4((k * R + co0 + c4) * R + ci);
              CONVLORA_UNROLL
              for (int q4 = 0; q4 < 4; ++q4) d[ci + q4] += wv.v[q4] * g;
            }
          }
        }
      }
    }
    const int ub = G::template u_at<true>(p, q);
    if constexpr (G::kVecU) {  // 128-bit stores
      CONVLORA_UNROLL
      for (int ci = 0; ci < R; ci += 4)
        S.ubuf.store4(ub + ci, {{d[ci], d[ci + 1], d[ci + 2], d[ci + 3]}});
    } else {
      CONVLORA_UNROLL
      for (int ci = 0; ci < R; ++ci) S.ubuf[ub + ci] = d[ci];
    }
  }
}

// Backward phase 7: T[p][x] = sum over U columns q of wx dU[p][q] at q's taps x; thread per
// (U row, channel), so each thread owns the row it accumulates.
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void map_phase_cols_down(const MapSmem<R, INTERP, true, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  int lo, hi;
  z_span<R, INTERP>(S.x, lo, hi);
  const int nuy = S.y.n[1], nux = S.x.n[1];
  for (int u = tid; u < nuy * R; u += kThreads) {
    const int p = u / R, c = u - p * R;
    for (int x = lo; x < hi; ++x) S.vbuf[G::v_at(p, x) + c] = acc_t(0);
    for (int q = 0; q < nux; ++q) {
      const acc_t g = S.ubuf[G::template u_at<true>(p, q) + c];
      CONVLORA_UNROLL
      for (int b = 0; b < G::kUT; ++b)
        S.vbuf[G::v_at(p, S.x.utap[G::ut(q, b)]) + c] +=
            S.x.utw[G::ut(q, b)] * g;
    }
  }
}

// Backward phase 8: the block's dz partial over the tile and its halo, kZ x kZ x R in
// global memory: dZ[y][x] = sum over U rows p of wy T[p][x] at p's taps y; thread per
// (staged column, channel), accumulating in the staged-z buffer, then storing its column.
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void map_phase_rows_down(const MapPos& M, acc_t* region,
                                     const MapSmem<R, INTERP, true, acc_t>& S, int tid) {
  using G = MapGeometry<R, INTERP>;
  int lo = 0, hi = 0;
  if (M.e >= 0) z_span<R, INTERP>(S.x, lo, hi);
  const int nuy = M.e >= 0 ? static_cast<int>(S.y.n[1]) : 0;
  for (int u = tid; u < G::kZ * R; u += kThreads) {
    const int x = u / R, c = u - x * R;
    for (int y = 0; y < G::kZ; ++y) S.zs[(y * G::kZ + x) * G::kCell + c] = acc_t(0);
    if (x >= lo && x < hi) {
      for (int p = 0; p < nuy; ++p) {
        const acc_t t = S.vbuf[G::v_at(p, x) + c];
        CONVLORA_UNROLL
        for (int a = 0; a < G::kUT; ++a)
          S.zs[(S.y.utap[G::ut(p, a)] * G::kZ + x) * G::kCell + c] += S.y.utw[G::ut(p, a)] * t;
      }
    }
    for (int y = 0; y < G::kZ; ++y)
      region[(y * G::kZ + x) * R + c] = S.zs[(y * G::kZ + x) * G::kCell + c];
  }
}

// Runs one map block (Exec as for run_block).
template <int R, int INTERP, bool BWD, typename Exec, typename scalar_t, typename acc_t>
CONVLORA_HD void run_map_block(Exec& ex, const TileArgs<scalar_t, acc_t>& A, const MapLayout& L,
                               unsigned char* smem, int64_t block) {
  using G = MapGeometry<R, INTERP>;
  const MapPos M = map_pos<R, INTERP>(A, block);
  const MapSmem<R, INTERP, BWD, acc_t> S(smem, L);
  ex.poison(smem, L.bytes);
  const bool ok = M.e >= 0;
  ex.phase("load", [&](int tid) { map_phase_load<R, INTERP, BWD>(A, M, S, tid); });
  ex.phase("lists", [&](int tid) { map_phase_lists<R, INTERP, BWD>(A, M, S, tid); });
  ex.phase("taps", [&](int tid) { map_phase_taps<R, INTERP, BWD>(A, M, S, tid); });
  if constexpr (!BWD) {
    if (ok) {
      ex.phase("rows_up", [&](int tid) { map_rows_up<R, INTERP, false>(S, tid); });
      ex.phase("cols_up", [&](int tid) { map_cols_up<R, INTERP, false>(S, tid); });
      ex.phase("conv", [&](int tid) { map_phase_conv<R, INTERP>(S, tid); });
    }
    ex.phase("combine", [&](int tid) { map_phase_combine<R, INTERP>(A, M, S, tid); });
  } else {
    acc_t* partial = A.dw_partial + block * A.n * grad_stride<R>();
    acc_t* region = A.region + block * G::kZ * G::kZ * R;
    if (ok) {
      ex.phase("rows_up+dc", [&](int tid) {
        map_rows_up<R, INTERP, true>(S, tid);
        map_dc<R, INTERP>(A, M, S, tid);
      });
      ex.phase("cols_up", [&](int tid) { map_cols_up<R, INTERP, true>(S, tid); });
    }
    ex.phase("dw", [&](int tid) { map_phase_dw<R, INTERP>(A.n, M, partial, S, tid); });
    if constexpr (map_dw_runs<R>() > 1) {
      ex.phase("dw_sum", [&](int tid) { map_phase_dw_sum<R, INTERP>(M, partial, S, tid); });
    }
    if (ok) {
      ex.phase("du", [&](int tid) { map_phase_du<R, INTERP>(S, tid); });
      ex.phase("cols_down", [&](int tid) { map_phase_cols_down<R, INTERP>(S, tid); });
    }
    ex.phase("rows_down", [&](int tid) { map_phase_rows_down<R, INTERP>(M, region, S, tid); });
  }
}

// The fold after the map backward, one call per (token, channel) i < N·r: dz = du + the dz
// partials of the blocks whose tile-plus-halo holds the token, in block order; NaN where
// the map's expert index is out of range.
template <int R, int INTERP, typename scalar_t, typename acc_t>
CONVLORA_HD void fold_entry(const TileArgs<scalar_t, acc_t>& A, int64_t i) {
  using G = MapGeometry<R, INTERP>;
  const int r = A.r;
  const int64_t tok = i / r;
  const int c = static_cast<int>(i - tok * r);
  const int64_t hw = static_cast<int64_t>(A.H) * A.W;
  const int64_t m = tok / hw;
  const int rest = static_cast<int>(tok - m * hw);
  const int gy = rest / A.W, gx = rest - gy * A.W;
  const int e = A.expert_index[m];
  if (e < 0 || e >= A.n) {
    A.out[i] = static_cast<scalar_t>(nan_value<acc_t>());
    return;
  }
  const int ly0 = gy - G::kTile - G::kHalo, lx0 = gx - G::kTile - G::kHalo;
  const int ty0 = ly0 < 0 ? 0 : ly0 / G::kTile + 1, tx0 = lx0 < 0 ? 0 : lx0 / G::kTile + 1;
  const int ty1 = (gy + G::kHalo) / G::kTile < A.tiles_y - 1 ? (gy + G::kHalo) / G::kTile
                                                              : A.tiles_y - 1;
  const int tx1 = (gx + G::kHalo) / G::kTile < A.tiles_x - 1 ? (gx + G::kHalo) / G::kTile
                                                              : A.tiles_x - 1;
  acc_t acc = static_cast<acc_t>(A.du[i]);
  for (int ty = ty0; ty <= ty1; ++ty) {
    for (int tx = tx0; tx <= tx1; ++tx) {
      const int64_t blk = (m * A.tiles_y + ty) * A.tiles_x + tx;
      const int ly = gy - ty * G::kTile + G::kHalo, lx = gx - tx * G::kTile + G::kHalo;
      acc += A.region[((blk * G::kZ + ly) * G::kZ + lx) * R + c];
    }
  }
  A.out[i] = static_cast<scalar_t>(acc);
}

}  // namespace tile
}  // namespace convlora
