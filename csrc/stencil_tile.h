// The tiled stencil: one block per tile of one map (8 x 8 tokens), written once as
// block programs of phases that both the CUDA kernels and the CPU backend run.
//
// A phase is a function of (block, thread) over the block's shared-memory arrays: the
// stretch of work between two barriers. The CUDA kernel runs each phase on its 128
// threads with __syncthreads() after it; the CPU runs the same phase as a loop over the
// 128 thread ids (blocks in parallel with at::parallel_for). Both read the same tables,
// stage the same tiles and reduce in the same order, so CI executes what the GPU runs.
// A checked CPU build (CONVLORA_CHECKED) bounds-checks every shared-memory index and fails
// when two threads touch one shared word in one phase with one of them writing (what a
// missing barrier would make a race on the GPU; shared_array.h), and poisons shared memory
// (NaN bytes) before each buffer is written, so a halo read, a race or a read of a buffer
// before the phase that writes it shows up on the CPU.
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
//             reach the tile); g = w_o du GELU'(C) with the slopes GELU'(C) the forward
//             saved (N x 4 x r fp32 bilinear, N x 16 x r bicubic); U is recomputed for the
//             tile's items only, for the weight gradient.
//             dW: thread-owned entries summed over the tile's items in order.
//             dz: per item, dU = W^T g at the nine taps, through the up taps, into
//             the item's contributions to its source's z neighbourhood
//             (2 halo + 1)^2; then each tile token pulls, in a fixed order, what its
//             neighbours' items give it: a gather with no atomics, deterministic.
//             Weight gradients leave as one fp32 partial per block, summed over blocks in
//             a fixed order by a small reduce kernel.
#pragma once

#include <stdint.h>
#include <string.h>

#include "convlora_math.h"
#include "shared_array.h"

#if defined(CONVLORA_CHECKED)
#include <stdexcept>
#include <string>
#endif

#if defined(__CUDA_ARCH__)
#define CONVLORA_UNROLL _Pragma("unroll")
#define CONVLORA_NO_UNROLL _Pragma("unroll 1")  // chunk loops: keep one chunk's registers
#define CONVLORA_UNROLL_4 _Pragma("unroll 4")   // a few loads in flight, not all of them
#else
#define CONVLORA_UNROLL_4
#define CONVLORA_UNROLL
#define CONVLORA_NO_UNROLL
#endif

namespace convlora {
namespace tile {

// Threads per block of the map programs (the tile programs': Geometry::kThreads). Eight
// warps: a map block's phases are loops over its grid's points with every thread taking
// one in turn, so twice the warps of 128 halve the block's critical path (the cost model's
// H100-fitted bound at the authors' setting) for the same instructions.
constexpr int kThreads = 256;
// Per-block shared memory that stages the conv weights or the weight-gradient
// accumulators only when they fit under this many bytes (else they stay in global memory).
// A first choice, not a measured one: the ops' smem_kb argument overrides it (stencil.h; the
// internal switch CONVLORA_STENCIL_SMEM_KB sets it) and benchmarks/stencil_time.py times the
// alternatives on a GPU.
constexpr int kSmemBudget = 96 * 1024;

// Expert index markers of staged tokens.
constexpr int kOutside = -2;  // outside the map: no token
constexpr int kBadExpert = -1;  // index out of range: NaN output, no contribution

template <int INTERP>
struct Interp {
  static constexpr int kHalo = INTERP == kBicubic ? 3 : 1;  // z reach of one token's stencil
  static constexpr int kSide = 2 * kHalo + 1;
  static constexpr int kUpTaps = INTERP == kBicubic ? 4 : 2;   // z taps per upsampled index
  static constexpr int kMaxDown = INTERP == kBicubic ? 4 : 2;  // conv outputs per axis
};

// Largest power of two <= 9216 / row, within [4, 128]: backward items per round.
CONVLORA_HD constexpr int round_items(int row) {
  int m = 128;
  while (m > 4 && m * row > 9216) m /= 2;
  return m;
}

// Shared-memory and per-block sizes of one kernel configuration.
template <int R, int INTERP, bool BWD>
struct Geometry {
  static constexpr int kHalo = Interp<INTERP>::kHalo;
  // Threads per block: 256 in the forward at R <= 8 (a round is one item a thread, so a
  // block takes twice the items at once, and an SM holds twice the warps to hide the
  // conv's latencies: 128 registers a thread allow two blocks); else 128 (the forward at
  // R >= 16 takes more registers than two such blocks would leave).
  static constexpr int kThreads = !BWD && R <= 8 ? 256 : 128;
  // 8 x 8 tokens; 4 x 4 where the staged halo would outgrow an A100's 163 KB per block.
  static constexpr int kTileH = R >= 64 && INTERP == kBicubic && BWD ? 4 : 8;
  static constexpr int kTileW = kTileH;
  static constexpr int kSH = BWD ? kHalo : 0;      // source ring around the tile
  static constexpr int kSrcH = kTileH + 2 * kSH;   // source tokens (items come from these)
  static constexpr int kSrcW = kTileW + 2 * kSH;
  static constexpr int kSrc = kSrcH * kSrcW;
  // Staged z: the tile and the reach of its tokens (the backward recomputes U for tile
  // items only; halo items read their saved slopes).
  static constexpr int kZH = kTileH + 2 * kHalo;
  static constexpr int kZW = kTileW + 2 * kHalo;
  // Saved slots (GELU'(C) of a pre-activation C) per token: its largest item count.
  static constexpr int kPreSlots = Interp<INTERP>::kMaxDown * Interp<INTERP>::kMaxDown;
  // Tile sums (u or dz of the tile tokens). Forward: dense rows of R, read and written by
  // lanes that hold consecutive channels of consecutive tokens (or 128-bit runs of them).
  // Backward: only 128-bit accesses, of a run of channels per lane (the gather's half
  // rows); from R = 16, R + 4 words (4 x an odd number), so the lanes' runs fall in all
  // eight bank quads, where dense rows would put every token's half rows in the same four
  // quads (or fewer). At R = 8 dense rows already spread them.
  static constexpr int kAccCell = BWD && R >= 16 ? R + 4 : R;
  static constexpr int kMaxItems = kSrc * Interp<INTERP>::kMaxDown * Interp<INTERP>::kMaxDown;
  // The bicubic backward's per-item phases are channel-major (see kItemSplit), and an
  // item's threads share its neighbourhood weights (kNbrRow): its rows of contributions
  // (49 cells) hold so few items a round that each item has a thread per channel.
  static constexpr bool kChannelMajor = BWD && INTERP == kBicubic;
  // cbuf row (GELU outputs or g). Forward: odd, so the rows of the items a warp holds fall
  // in distinct banks. Backward: 4 x an odd number, read and written in 128-bit accesses,
  // which the 8 lanes of a quarter warp then make in distinct banks; channel-major: R, so
  // the 32 / R items a warp holds (R lanes each, a word apiece) fall in distinct banks.
  static constexpr int kItemRow = kChannelMajor ? R : BWD ? 4 * ((R / 4) | 1) : R + 1;
  // ubuf row (backward): an item's nine U vectors (contiguous: the weight gradient's
  // threads read one item's at once), then its contributions to the z neighbourhood
  // (side x side cells of R) of its source token. Bilinear (kVecU), those are written and
  // gathered in 128-bit accesses and the row is 4 x an odd number of words, so the rows of
  // the items a warp holds fall in distinct banks. Bicubic (channel-major), 49 R words: an
  // odd multiple of R, so the 32 / R items a warp writes a word of each channel of fall in
  // distinct banks, and a multiple of 4, so the gather reads it in 128-bit loads.
  static constexpr int kNeighbours = Interp<INTERP>::kSide * Interp<INTERP>::kSide;
  static constexpr int kUTap = R;
  static constexpr bool kVecU = BWD && INTERP != kBicubic;
  static constexpr int kURowMin = kNeighbours * R > 9 * kUTap ? kNeighbours * R : 9 * kUTap;
  static constexpr int kURowQuads = (kURowMin + 3) / 4;  // 16-byte groups, rounded up
  static constexpr int kURow = kVecU ? 4 * (kURowQuads | 1) : kURowMin;
  static_assert(!kChannelMajor || kURow == kNeighbours * R, "bicubic rows: 49 R words");
  // Items per round: one a thread forward (R values each); backward, about 36 KB of ubuf.
  static constexpr int kRound = !BWD ? kThreads : round_items(kURow);
  // The backward's gather walks the round's items (each adding the one cell of its
  // source's neighbourhood a tile token is, if any) where a round has fewer items than a
  // neighbourhood has cells (bicubic: 16 against 49 at R = 8; bilinear at R = 64: 8
  // against 9); else the neighbourhood's cells, each adding its source's items in the round.
  static constexpr bool kGatherByItem = BWD && kRound < kNeighbours;
  // Threads per item in the per-item phases (phase_conv, phase_delta), each owning
  // R / kItemSplit of the item's channels: every thread of the block busy when a round
  // has fewer items than threads (the backward's; the forward's rounds fill the block).
  // Thread v takes item v % kRound and channel run v / kRound (a warp's lanes: consecutive
  // items), or channel-major, item v / kItemSplit and run v % kItemSplit (a warp's lanes:
  // consecutive channels of 32 / kItemSplit items).
  static constexpr int kItemSplit = kThreads / kRound < R ? kThreads / kRound : R;
  // Channel-major: each item's neighbourhood weights (neighbour_weights of its three conv
  // columns, then its three conv rows: 6 x side) are built once, by the item's threads in
  // phase_conv, and read by all of them in phase_delta (else every thread of an item
  // builds all six). A row of 42 words: the items a warp holds fall in distinct banks.
  static constexpr int kNbrRow = 6 * Interp<INTERP>::kSide;
  // A staged z cell: read in 128-bit loads by the conv, 4 x an odd number of words, so the
  // 8 lanes of a quarter warp reading different cells fall in distinct banks; odd where a
  // backward thread takes fewer than 4 channels of an item (scalar loads: R = 4, bicubic).
  static constexpr int kZCell = BWD && R / kItemSplit < 4 ? R + 1 : (R / 4) % 2 == 1 ? R : R + 4;
  static_assert(R % 4 == 0, "z cells in 128-bit loads");
  // A staged du cell (backward): 4 x an odd number of words, like kZCell, so the last
  // phase reads it in 128-bit loads; the per-item phase reads R / kItemSplit channels of it
  // a thread, in 128-bit loads where that is a multiple of 4 (kVecSrc).
  static constexpr bool kVecSrc = (R / kItemSplit) % 4 == 0;
  static constexpr int kSrcCell = (R / 4) % 2 == 1 ? R : R + 4;
  static constexpr int kBuckets = 2 * kMaxExperts; // (tile or halo) x expert
};

// Row stride of one expert's zero-padded fp32 conv weights [k][ci][co] (9 x R x R, output
// channels contiguous): a multiple of 4 floats plus 4, so the 8 experts a warp may read at
// one (k, ci, co) fall in distinct banks.
template <int R>
CONVLORA_HD constexpr int weight_stride() { return ((R * R * 9 + 31) / 32) * 32 + 4; }

// Entries of one expert's weight gradient: r·r·9 conv weights, then r biases.
CONVLORA_HD int grad_entries(int r) { return r * r * 9 + r; }

// One expert's weight-gradient accumulators inside the kernels: [co][k][ci] (R x 9 rows of
// R input channels: the threads that flush at once own consecutive (k, ci), so one output
// channel's words), then R biases; reduce_entry maps them to (co, ci, k).
template <int R>
CONVLORA_HD constexpr int grad_stride() { return R * 9 * R + R; }
template <int R>
CONVLORA_HD constexpr int grad_index(int co, int k, int ci) { return (co * 9 + k) * R + ci; }
template <int R>
CONVLORA_HD constexpr int grad_bias_index(int co) { return R * 9 * R + co; }

// --- Per-call tables ----------------------------------------------------------------
//
// Down- and up-sampling taps of every expert's scale along each axis, computed once per
// call by a tiny prep pass (no fp64 and no division in the kernels' inner loops).
// down: n·H row entries then n·W column entries, entry e·H + h -> the conv-output rows
// Down_s reads for output row h (compacted, 1..4 taps). up: expert e's s·H rows from
// up_y[e], then s·W columns from up_x[e] -> the z rows Up_s combines (kUpTaps slots,
// unused slots repeat the first index with weight 0, so every index is in the halo).
struct Tables {
  int H, W, n, interp;
  int scale[kMaxExperts];
  int down_y, down_x;
  int up_y[kMaxExperts], up_x[kMaxExperts];
  int entries;
};

inline Tables make_tables(int H, int W, int n, int interp, const int* scales) {
  Tables T;
  T.H = H;
  T.W = W;
  T.n = n;
  T.interp = interp;
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

// The composed-weight forward's classes of map rows (stencil_cells.h): a row's up-sampling
// weights, seen from the row, are the same for every row but the first and the last
// (clamped taps, the conv's zero padding). row_classes(n): 3 from n = 3 (0 inside, 1 the
// first row, 2 the last), else one per row.
CONVLORA_HD int row_classes(int n) { return n >= 3 ? 3 : n; }
CONVLORA_HD int row_class(int i, int n) {
  return n >= 3 ? (i == 0 ? 1 : i == n - 1 ? 2 : 0) : i;
}
CONVLORA_HD int class_row(int c, int n) {  // a row of class c
  return n >= 3 ? (c == 0 ? 1 : c == 1 ? 0 : n - 1) : c;
}

// Where each expert's composed weights start (in blocks of one (row class, column class,
// row phase, column phase): 9 cells x R x R) and how many phases (down taps) an axis has.
struct CellTables {
  int ns_y, ns_x;               // row and column classes
  int ph[kMaxExperts];          // down taps a token has per axis at the expert's scale
  int off[kMaxExperts + 1];     // first block of each expert; off[n]: all blocks
};

inline CellTables make_cell_tables(const Tables& T) {
  CellTables C{};
  C.ns_y = row_classes(T.H);
  C.ns_x = row_classes(T.W);
  C.off[0] = 0;
  for (int e = 0; e < T.n; ++e) {
    C.ph[e] = down_taps<float>(0, T.H, T.scale[e], T.interp).n;
    C.off[e + 1] = C.off[e] + C.ns_y * C.ns_x * C.ph[e] * C.ph[e];
  }
  return C;
}

// t as a table entry holds it: the taps from t.n on at tap 0's index with weight zero
// (fixed indices: the Taps stays in registers).
template <typename acc_t>
CONVLORA_HD Taps<acc_t> padded_taps(Taps<acc_t> t) {
  CONVLORA_UNROLL
  for (int k = 1; k < 4; ++k) {
    if (k >= t.n) {
      t.idx[k] = t.idx[0];
      t.w[k] = acc_t(0);
    }
  }
  return t;
}

// Table entry i (the prep pass writes one per entry: table_entry; the composed weights it
// writes in the same launch compute their taps from down_taps, up_taps: cell_axis_row).
template <typename acc_t>
CONVLORA_HD Taps<acc_t> table_value(const Tables& T, int i) {
  Taps<acc_t> t;
  if (i < T.down_x) {
    const int e = i / T.H;
    t = down_taps<acc_t>(i - e * T.H, T.H, T.scale[e], T.interp);
  } else if (i < T.up_y[0]) {
    const int e = (i - T.down_x) / T.W;
    t = down_taps<acc_t>(i - T.down_x - e * T.W, T.W, T.scale[e], T.interp);
  } else {
    const bool rows = i < T.up_x[0];
    int e = 0;
    while (e + 1 < T.n && i >= (rows ? T.up_y : T.up_x)[e + 1]) ++e;
    const int p = i - (rows ? T.up_y : T.up_x)[e];
    t = up_taps<acc_t>(p, rows ? T.H : T.W, T.scale[e], T.interp);
  }
  return padded_taps(t);
}

template <typename acc_t>
CONVLORA_HD void table_entry(const Tables& T, int i, Taps<acc_t>* out) {
  out[i] = table_value<acc_t>(T, i);
}

// Prep entry i of the padded weights: (n, weight_stride) conv weights [k][ci][co], zero
// outside r x r; then (n, R) biases; then (n, weight_stride) transposed weights [k][co][ci]
// (the backward's W^T g runs over contiguous input channels).
// w_t: the weights' dtype as stored (acc_t, or the inputs' 16-bit type, read and widened
// here so no cast of the weights runs before the prep).
template <int R, typename acc_t, typename w_t = acc_t>
CONVLORA_HD void weight_entry(const w_t* conv_w, const w_t* conv_b, int r, int n, int i,
                              acc_t* wbuf) {
  constexpr int WS = weight_stride<R>();
  if (i < n * WS) {
    const int e = i / WS, off = i - e * WS;
    acc_t v = acc_t(0);
    if (off < R * R * 9) {
      const int k = off / (R * R), ci = (off / R) % R, co = off % R;
      if (co < r && ci < r)
        v = static_cast<acc_t>(conv_w[((static_cast<int64_t>(e) * r + co) * r + ci) * 9 + k]);
    }
    wbuf[i] = v;
  } else if (i < n * (WS + R)) {
    const int j = i - n * WS, e = j / R, co = j % R;
    wbuf[i] = co < r ? static_cast<acc_t>(conv_b[e * r + co]) : acc_t(0);
  } else {
    const int j = i - n * (WS + R), e = j / WS, off = j - e * WS;
    acc_t v = acc_t(0);
    if (off < R * R * 9) {
      const int k = off / (R * R), co = (off / R) % R, ci = off % R;
      if (co < r && ci < r)
        v = static_cast<acc_t>(conv_w[((static_cast<int64_t>(e) * r + co) * r + ci) * 9 + k]);
    }
    wbuf[i] = v;
  }
}

// Byte offsets of a block's shared arrays (16-byte aligned), the same on host and device.
struct Layout {
  int zs, src, es, nt, start, key, first, items, cbuf, ubuf, nbr, acc, w, wt, b, dw, bytes;
  int w_count, dw_count;
  bool mma;  // the composed-weight forward's (stencil_cells.h: make_cells_layout)
};

CONVLORA_HD int align16(int x) { return (x + 15) & ~15; }

template <int R, int INTERP, bool BWD, typename acc_t>
CONVLORA_HD Layout make_layout(int r, int n, bool w_smem, bool dw_smem) {
  using G = Geometry<R, INTERP, BWD>;
  Layout L{};
  int off = 0;
  auto take = [&off](int bytes) {
    const int at = off;
    off += align16(bytes);
    return at;
  };
  const int A = static_cast<int>(sizeof(acc_t)), I = static_cast<int>(sizeof(int));
  L.zs = take(G::kZH * G::kZW * G::kZCell * A);
  L.src = take(BWD ? G::kSrc * G::kSrcCell * A : 0);  // du of the sources
  L.es = take(G::kSrc * I);
  L.nt = take(G::kSrc * I);
  L.start = take(G::kSrc * I);
  L.key = take(G::kSrc * I);
  L.first = take((G::kBuckets + 1) * I);
  L.items = take(G::kMaxItems * I);
  L.cbuf = take(G::kRound * G::kItemRow * A);
  L.ubuf = take(BWD ? G::kRound * G::kURow * A : 0);
  L.nbr = take(G::kChannelMajor ? G::kRound * G::kNbrRow * A : 0);
  L.acc = take(G::kTileH * G::kTileW * G::kAccCell * A);  // u (fwd) or dz (bwd) of the tile
  L.w_count = w_smem ? n * weight_stride<R>() : 0;
  L.w = take(L.w_count * A);
  L.wt = take(BWD && !G::kChannelMajor ? L.w_count * A : 0);  // phase_delta's Wᵀ
  L.b = take(n * R * A);
  L.dw_count = BWD && dw_smem ? n * grad_stride<R>() : 0;
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
  const acc_t* wbuf;           // prep: weights, biases, transposed weights (weight_entry)
  const Taps<acc_t>* taps;     // prep: Tables entries
  acc_t* dw_partial;           // backward: (blocks, n, grad_stride) fp32 partials
  acc_t* pre;                  // (N, kPreSlots, r) per slot GELU'(C) of its pre-activation
                               // C (C itself when raw_pre): written by the forward when not
                               // null, read by the backward
  acc_t* region;               // map backward: (blocks, kZ, kZ, R) dz partials (stencil_map.h)
  Tables T;
  int64_t maps;
  int H, W, r, n;
  SmallDiv by_r;               // n / r (made on the host: no division a thread)
  int tiles_y, tiles_x;
  bool w_smem, dw_smem;
  bool vec_z;                  // z and du rows load as 16-byte vectors (r == R, aligned)
  bool raw_pre;                // the forward saves C, not GELU'(C) (stencil_fwd's raw_preact)
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
// into dst[(ly·RW + lx)·CELL + c] as acc_t; channels c >= r are zero, cells outside the map
// outside_value() (never read: taps are clamped into the map), or zero with ZERO_OUTSIDE
// (programs that multiply them by zero weights). THREADS: the block's.
template <int R, int RH, int RW, int CELL, int THREADS = kThreads, bool ZERO_OUTSIDE = false,
          typename scalar_t, typename acc_t>
CONVLORA_HD void stage_region(const scalar_t* map, int H, int W, int r, int y0, int x0,
                              bool vec, SArr<acc_t> dst, int tid) {
  const acc_t outside = ZERO_OUTSIDE ? acc_t(0) : outside_value<acc_t>();
  constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));
  if constexpr (R % VEC == 0) {
    if (vec) {
      constexpr int QV = R / VEC;  // vectors per token
      for (int u = tid; u < RH * RW * QV; u += THREADS) {
        const int cell = u / QV, q = u - cell * QV;
        const int ly = cell / RW, lx = cell - ly * RW;
        const int gy = y0 + ly, gx = x0 + lx;
        acc_t v[VEC];
        if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
          load16<scalar_t, acc_t, VEC>(map + (static_cast<int64_t>(gy) * W + gx) * R + q * VEC,
                                       v);
        } else {
          for (int j = 0; j < VEC; ++j) v[j] = outside;
        }
        if constexpr (CELL % 4 == 0 && VEC % 4 == 0) {  // 128-bit stores
          for (int j = 0; j < VEC; j += 4)
            dst.store4(cell * CELL + q * VEC + j, {{v[j], v[j + 1], v[j + 2], v[j + 3]}});
        } else {
          for (int j = 0; j < VEC; ++j) dst[cell * CELL + q * VEC + j] = v[j];
        }
      }
      return;
    }
  }
  // A warp's lanes take consecutive channels of consecutive cells where the cells are
  // packed in fours (their words then run on), consecutive cells of one channel where a
  // cell's stride is odd (the lanes then write distinct banks; the loads, a token's
  // channels apart, still come from the same few lines).
  for (int u = tid; u < RH * RW * R; u += THREADS) {
    const int cell = CELL % 2 == 1 ? u % (RH * RW) : u / R;
    const int c = CELL % 2 == 1 ? u / (RH * RW) : u - cell * R;
    const int ly = cell / RW, lx = cell - ly * RW;
    const int gy = y0 + ly, gx = x0 + lx;
    const bool inside = gy >= 0 && gy < H && gx >= 0 && gx < W;
    acc_t v = inside ? acc_t(0) : outside;
    if (c < r && inside) v = static_cast<acc_t>(map[(static_cast<int64_t>(gy) * W + gx) * r + c]);
    dst[cell * CELL + c] = v;
  }
}

// --- The block program --------------------------------------------------------------

// Item encoding: source token | down-row tap << 12 | down-column tap << 14 | the token's
// expert << 16 | its tap counts (8 x rows + columns) << 20: what the per-item phases need
// of the token comes with the item, not from a shared read at a token index each lane
// holds a different one of.
static_assert(kMaxExperts <= 16, "an item holds its expert in 4 bits");
CONVLORA_HD int make_item(int t, int a, int b, int e, int nt) {
  return t | (a << 12) | (b << 14) | (e << 16) | (nt << 20);
}
CONVLORA_HD int item_token(int it) { return it & 0xFFF; }
CONVLORA_HD int item_a(int it) { return (it >> 12) & 3; }
CONVLORA_HD int item_b(int it) { return (it >> 14) & 3; }
CONVLORA_HD int item_expert(int it) { return (it >> 16) & 15; }
CONVLORA_HD int item_nt(int it) { return (it >> 20) & 63; }

// Pre-activation of one item: C[co] = bias[co] + sum_{k, ci} W[co, ci, k] U(tap k)[ci] for
// the conv output (oy, ox) of expert e at scale s, U read from the staged z through the
// up tables (zero outside the s·H x s·W map). With COMPUTE_C writes C to crow[0..R); with
// STORE_U the nine U vectors to urow[k·R + ci] (zero for taps outside the map).
// Without COMPUTE_C, only input channels [cs, cs + RS) (the caller's share of the item).
template <int R, int INTERP, int ZW, int CELL, bool COMPUTE_C, bool STORE_U, int RS = R,
          bool VEC_U = false, typename acc_t>
CONVLORA_HD void conv_item(const Taps<acc_t>* taps, const Tables& T, int e, int s, int oy,
                           int ox, int zy0, int zx0, SArr<acc_t> zs, SArr<acc_t> w, int w_off,
                           SArr<acc_t> bias, SArr<acc_t> crow, int crow_off, SArr<acc_t> urow,
                           int urow_off, int cs = 0) {
  static_assert(RS == R || !COMPUTE_C, "a share of the channels computes no C");
  constexpr int UT = Interp<INTERP>::kUpTaps;
  // channels per pass: bounded registers (8 from R = 32: bicubic taps would spill at 16)
  constexpr int CC0 = R < 16 ? R : (R < 32 ? 16 : 8);
  constexpr int CC = CC0 < RS ? CC0 : RS;
  // input channels per U pass: 4 (a 128-bit load of z), so that U, the CC sums and the
  // loads in flight stay within the forward's 128 registers
  constexpr int CU = CC % 4 == 0 ? 4 : CC;
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
      ry[k][a] = (ty.idx[a] - zy0) * ZW * CELL;  // word offsets of the staged cells
      wy[k][a] = ty.w[a];
      rx[k][a] = (tx.idx[a] - zx0) * CELL;
      wx[k][a] = tx.w[a];
    }
  }
  constexpr int NCO = COMPUTE_C ? R : CC;  // U alone: one pass
  CONVLORA_NO_UNROLL
  for (int co0 = 0; co0 < NCO; co0 += CC) {
    acc_t c[CC];
    CONVLORA_UNROLL
    for (int j = 0; j < CC; ++j) c[j] = COMPUTE_C ? acc_t(bias[e * R + co0 + j]) : acc_t(0);
    CONVLORA_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      CONVLORA_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        const int k = ky * 3 + kx;
        if (!(vy[ky] && vx[kx])) {
          if (STORE_U && co0 == 0)
            for (int ci = cs; ci < cs + RS; ++ci) urow[urow_off + k * R + ci] = acc_t(0);
          continue;
        }
        CONVLORA_NO_UNROLL
        for (int ci0 = cs; ci0 < cs + RS; ci0 += CU) {
          // U(tap k)[ci0 .. ci0 + CU): the up-sampling taps of the staged z
          acc_t u[CU];
          CONVLORA_UNROLL
          for (int i = 0; i < CU; ++i) u[i] = acc_t(0);
          if constexpr (CU == 1) {
            // one channel: separable, the columns' taps first, then the rows'
            CONVLORA_UNROLL
            for (int a = 0; a < UT; ++a) {
              acc_t h = acc_t(0);
              CONVLORA_UNROLL
              for (int b = 0; b < UT; ++b) h += wx[kx][b] * zs[ry[ky][a] + rx[kx][b] + ci0];
              u[0] += wy[ky][a] * h;
            }
          } else {
            CONVLORA_UNROLL
            for (int a = 0; a < UT; ++a) {
              CONVLORA_UNROLL
              for (int b = 0; b < UT; ++b) {
                const acc_t wab = wy[ky][a] * wx[kx][b];
                const int zc = ry[ky][a] + rx[kx][b] + ci0;
                if constexpr (CELL % 4 == 0 && CU % 4 == 0) {  // 128-bit loads (ci0: x4)
                  CONVLORA_UNROLL
                  for (int i = 0; i < CU; i += 4) {
                    const V4<acc_t> zv = zs.load4(zc + i);
                    CONVLORA_UNROLL
                    for (int q = 0; q < 4; ++q) u[i + q] += wab * zv.v[q];
                  }
                } else {
                  CONVLORA_UNROLL
                  for (int i = 0; i < CU; ++i) u[i] += wab * zs[zc + i];
                }
              }
            }
          }
          if (STORE_U && co0 == 0) {
            if constexpr (VEC_U && CU % 4 == 0) {  // 128-bit stores (urow_off, ci0: x4)
              CONVLORA_UNROLL
              for (int i = 0; i < CU; i += 4)
                urow.store4(urow_off + k * R + ci0 + i, {{u[i], u[i + 1], u[i + 2], u[i + 3]}});
            } else {
              CONVLORA_UNROLL
              for (int i = 0; i < CU; ++i) urow[urow_off + k * R + ci0 + i] = u[i];
            }
          }
          if constexpr (COMPUTE_C) {
            // a weight row's CC outputs in 128-bit loads
            static_assert(CC % 4 == 0, "whole 128-bit loads (R, CC and w_off: multiples of 4)");
            CONVLORA_UNROLL
            for (int i = 0; i < CU; ++i) {
              const int wrow = w_off + (k * R + ci0 + i) * R + co0;
              CONVLORA_UNROLL
              for (int j = 0; j < CC; j += 4) {
                const V4<acc_t> wv = w.load4(wrow + j);
                CONVLORA_UNROLL
                for (int q = 0; q < 4; ++q) c[j + q] += wv.v[q] * u[i];
              }
            }
          }
        }
      }
    }
    if (COMPUTE_C) {
      CONVLORA_UNROLL
      for (int j = 0; j < CC; ++j) crow[crow_off + co0 + j] = c[j];
    }
  }
}

// Shared arrays filled and flushed in 128-bit accesses: thread tid takes every THREADS-th
// group of four elements (count a multiple of 4; the global array 16-byte aligned, as the
// prep buffer's rows and the blocks' partials are).
template <int THREADS, typename acc_t>
CONVLORA_HD void copy_in4(const acc_t* src, SArr<acc_t> dst, int count, int tid) {
  for (int g = tid; g < count / 4; g += THREADS) {
    V4<acc_t> v;
#if defined(__CUDA_ARCH__)
    if constexpr (sizeof(acc_t) == 4) {
      const float4 f = reinterpret_cast<const float4*>(src)[g];
      v = V4<acc_t>{{f.x, f.y, f.z, f.w}};
    } else
#endif
    {
      for (int q = 0; q < 4; ++q) v.v[q] = src[4 * g + q];
    }
    dst.store4(4 * g, v);
  }
}

template <int THREADS, typename acc_t>
CONVLORA_HD void zero4(SArr<acc_t> dst, int count, int tid) {
  for (int g = tid; g < count / 4; g += THREADS)
    dst.store4(4 * g, {{acc_t(0), acc_t(0), acc_t(0), acc_t(0)}});
}

template <int THREADS, typename acc_t>
CONVLORA_HD void copy_out4(SArr<acc_t> src, acc_t* dst, int count, int tid) {
  for (int g = tid; g < count / 4; g += THREADS) {
    const V4<acc_t> v = src.load4(4 * g);
#if defined(__CUDA_ARCH__)
    if constexpr (sizeof(acc_t) == 4) {
      reinterpret_cast<float4*>(dst)[g] = make_float4(v.v[0], v.v[1], v.v[2], v.v[3]);
      continue;
    }
#endif
    for (int q = 0; q < 4; ++q) dst[4 * g + q] = v.v[q];
  }
}

// Where this block's tile sits.
struct BlockPos {
  int64_t token0;  // first token of the block's map
  int h0, w0;      // tile origin in the map
};

template <int TH, int TW, typename scalar_t, typename acc_t>
CONVLORA_HD BlockPos block_pos(const TileArgs<scalar_t, acc_t>& A, int64_t block) {
  // 32-bit division (the grid is checked to fit; a 64-bit one is a call on the GPU)
  const int b = static_cast<int>(block), per_map = A.tiles_y * A.tiles_x;
  const int m = b / per_map;
  const int t = b - m * per_map;
  const int ty = t / A.tiles_x;
  BlockPos P;
  P.token0 = static_cast<int64_t>(m) * A.H * A.W;
  P.h0 = ty * TH;
  P.w0 = (t - ty * A.tiles_x) * TW;
  return P;
}

// A global-memory array seen through the shared-array type (what does not fit the budget).
template <typename acc_t>
CONVLORA_HD SArr<acc_t> global_arr(const acc_t* p, int offset, int count, const char* name) {
  (void)count;
  (void)name;
  return CONVLORA_SARR(acc_t, reinterpret_cast<unsigned char*>(const_cast<acc_t*>(p + offset)),
                       0, count, name);
}

// The shared arrays of one block, typed.
template <int R, int INTERP, bool BWD, typename acc_t>
struct Smem {
  using G = Geometry<R, INTERP, BWD>;
  SArr<acc_t> zs, src, cbuf, ubuf, nbr, acc, w, wt, b, dw;
  SArr<int> es, nt, start, key, first, items;

  CONVLORA_HD Smem(unsigned char* base, const Layout& L, int n, const acc_t* wglobal,
                   acc_t* dwglobal, int r)
      : zs(CONVLORA_SARR(acc_t, base, L.zs, G::kZH * G::kZW * G::kZCell, "z")),
        src(CONVLORA_SARR(acc_t, base, L.src, BWD ? G::kSrc * G::kSrcCell : 0, "du")),
        cbuf(CONVLORA_SARR(acc_t, base, L.cbuf, G::kRound * G::kItemRow, "item values")),
        ubuf(CONVLORA_SARR(acc_t, base, L.ubuf, BWD ? G::kRound * G::kURow : 0, "taps")),
        nbr(CONVLORA_SARR(acc_t, base, L.nbr, G::kChannelMajor ? G::kRound * G::kNbrRow : 0,
                          "neighbourhood weights")),
        acc(CONVLORA_SARR(acc_t, base, L.acc, G::kTileH * G::kTileW * G::kAccCell,
                          "tile sums")),
        w(L.w_count ? CONVLORA_SARR(acc_t, base, L.w, L.w_count, "weights")
                    : global_arr(wglobal, 0, n * weight_stride<R>(), "weights (global)")),
        wt(!BWD || G::kChannelMajor ? global_arr(wglobal, 0, 0, "transposed weights (none)")
           : L.w_count ? CONVLORA_SARR(acc_t, base, L.wt, L.w_count, "transposed weights")
                       : global_arr(wglobal, n * (weight_stride<R>() + R),
                                    n * weight_stride<R>(), "transposed weights (global)")),
        b(CONVLORA_SARR(acc_t, base, L.b, n * R, "bias")),
        dw(L.dw_count ? CONVLORA_SARR(acc_t, base, L.dw, L.dw_count, "weight gradients")
                      : CONVLORA_SARR(acc_t, reinterpret_cast<unsigned char*>(dwglobal), 0,
                                      BWD ? n * grad_stride<R>() : 0,
                                      "weight gradients (global)")),
        es(CONVLORA_SARR(int, base, L.es, G::kSrc, "expert")),
        nt(CONVLORA_SARR(int, base, L.nt, G::kSrc, "taps per token")),
        start(CONVLORA_SARR(int, base, L.start, G::kSrc, "item start")),
        key(CONVLORA_SARR(int, base, L.key, G::kSrc, "item order key")),
        first(CONVLORA_SARR(int, base, L.first, G::kBuckets + 1, "bucket start")),
        items(CONVLORA_SARR(int, base, L.items, G::kMaxItems, "items")) {}
};

template <int R, int INTERP, bool BWD>
CONVLORA_HD bool in_tile(int t) {
  using G = Geometry<R, INTERP, BWD>;
  const int ly = t / G::kSrcW - G::kSH, lx = t % G::kSrcW - G::kSH;
  return ly >= 0 && ly < G::kTileH && lx >= 0 && lx < G::kTileW;
}

// Bucket of a source token: its expert, + n for halo tokens; -1 without items.
template <int R, int INTERP, bool BWD>
CONVLORA_HD int token_bucket(int t, int e, int nt, int n) {
  if (nt == 0) return -1;
  return in_tile<R, INTERP, BWD>(t) ? e : n + e;
}

// A source token's place in the block's item order, as phase_list reads it: its item
// count << 16 | its bucket << 8 | its index; 0 for a token without items.
template <int R, int INTERP, bool BWD>
CONVLORA_HD int order_key(int t, int e, int nt, int n) {
  static_assert(Geometry<R, INTERP, BWD>::kSrc <= 256 && 2 * kMaxExperts <= 256, "8-bit fields");
  const int b = token_bucket<R, INTERP, BWD>(t, e, nt, n);
  return b < 0 ? 0 : ((nt >> 3) * (nt & 7)) << 16 | b << 8 | t;
}

// Phase 1: stage z (and du), the expert of every source token, weights and biases;
// zero the tile accumulators.
template <int R, int INTERP, bool BWD, typename scalar_t, typename acc_t>
CONVLORA_HD void phase_load(const TileArgs<scalar_t, acc_t>& A, const BlockPos& P,
                            const Smem<R, INTERP, BWD, acc_t>& S, int tid) {
  using G = Geometry<R, INTERP, BWD>;
  const int sy0 = P.h0 - G::kSH, sx0 = P.w0 - G::kSH;
  stage_region<R, G::kZH, G::kZW, G::kZCell, G::kThreads>(
      A.z + P.token0 * A.r, A.H, A.W, A.r, P.h0 - G::kHalo, P.w0 - G::kHalo, A.vec_z, S.zs, tid);
  if (BWD)
    stage_region<R, G::kSrcH, G::kSrcW, G::kSrcCell, G::kThreads>(
        A.du + P.token0 * A.r, A.H, A.W, A.r, sy0, sx0, A.vec_z, S.src, tid);
  for (int t = tid; t < G::kSrc; t += G::kThreads) {
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
    S.key[t] = order_key<R, INTERP, BWD>(t, e, nt, A.n);
  }
  // weights, Wᵀ (phase_delta's; channel-major reads W), biases: the prep buffer's rows
  // (multiples of 4 floats) in 128-bit copies
  static_assert(grad_stride<R>() % 4 == 0 && weight_stride<R>() % 4 == 0, "128-bit rows");
  constexpr int T = G::kThreads;
  const int nw = A.n * weight_stride<R>();
  if (A.w_smem) {
    copy_in4<T>(A.wbuf, S.w, nw, tid);
    if (BWD && !G::kChannelMajor) copy_in4<T>(A.wbuf + nw + A.n * R, S.wt, nw, tid);
  }
  copy_in4<T>(A.wbuf + nw, S.b, A.n * R, tid);
  zero4<T>(S.acc, G::kTileH * G::kTileW * G::kAccCell, tid);
  if (BWD) zero4<T>(S.dw, A.n * grad_stride<R>(), tid);
}

// Phase 2: the items, sorted by (halo, expert, token, down tap), with no thread walking
// more than the sources' keys (no serial count of a bucket after another). Thread v < kSrc
// is source token v: its items start after every item of a source with a smaller key
// (bucket, token), a sum over the keys (four a 128-bit load, the same for every lane);
// it writes its start and its items there. Thread kSrc + b, b <= 2n, sums the items of the
// buckets before b: first[b], the first item of bucket b (first[2n]: the item count).
template <int R, int INTERP, bool BWD, typename acc_t>
CONVLORA_HD void phase_list(int n, const Smem<R, INTERP, BWD, acc_t>& S, int tid) {
  using G = Geometry<R, INTERP, BWD>;
  static_assert(G::kSrc % 4 == 0, "the keys in 128-bit loads");
  for (int v = tid; v <= G::kSrc + 2 * n; v += G::kThreads) {
    const int key = v < G::kSrc ? S.key[v] : 0;
    const int mine = v < G::kSrc ? key & 0xFFFF : (v - G::kSrc) << 8;
    int off = 0;
    CONVLORA_UNROLL_4
    for (int q = 0; q < G::kSrc; q += 4) {
      const V4<int> k = S.key.load4(q);
      CONVLORA_UNROLL
      for (int i = 0; i < 4; ++i) off += (k.v[i] & 0xFFFF) < mine ? k.v[i] >> 16 : 0;
    }
    if (v >= G::kSrc) {
      S.first[v - G::kSrc] = off;
      continue;
    }
    S.start[v] = off;
    if (key == 0) continue;  // no items
    const int nt = S.nt[v], e = S.es[v];
    for (int a = 0; a < (nt >> 3); ++a)
      for (int b = 0; b < (nt & 7); ++b) S.items[off++] = make_item(v, a, b, e, nt);
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

// Checked build: a neighbourhood offset outside [0, side) breaks the halo the tiles rely on.
CONVLORA_HD void check_offset(int off, int side) {
#if defined(CONVLORA_CHECKED)
  if (off < 0 || off >= side) smem_out_of_range("neighbourhood offset", off, side);
#else
  (void)off;
  (void)side;
#endif
}

// The weights with which the up-sampling taps of conv row (or column) p = o + k - 1,
// k = 0, 1, 2, reach the SIDE rows of a source token's z neighbourhood (token row g):
// out[n] = sum over the taps a with idx[a] - g + halo = n of w[a]; all zero when p is
// outside the s·H map (no conv input there). Branch-free over compile-time n, so the
// result stays in registers.
// (neighbour_weights_of: the same from conv row p's up taps t, valid: p inside the map.)
template <int INTERP, typename acc_t>
CONVLORA_HD void neighbour_weights_of(const Taps<acc_t>& t, bool valid, int g,
                                      acc_t (&out)[Interp<INTERP>::kSide]) {
  constexpr int UT = Interp<INTERP>::kUpTaps, SIDE = Interp<INTERP>::kSide;
  constexpr int HALO = Interp<INTERP>::kHalo;
  CONVLORA_UNROLL
  for (int n = 0; n < SIDE; ++n) out[n] = acc_t(0);
  if (!valid) return;
  CONVLORA_UNROLL
  for (int a = 0; a < UT; ++a) {
    const int off = t.idx[a] - g + HALO;
    check_offset(off, SIDE);
    CONVLORA_UNROLL
    for (int n = 0; n < SIDE; ++n) out[n] += n == off ? t.w[a] : acc_t(0);
  }
}

template <int INTERP, typename acc_t>
CONVLORA_HD void neighbour_weights(const Taps<acc_t>* up, int p, int extent, int g,
                                   acc_t (&out)[Interp<INTERP>::kSide]) {
  const bool valid = p >= 0 && p < extent;
  neighbour_weights_of<INTERP>(up[valid ? p : 0], valid, g, out);
}

// Thread v's item in the round (j) and first channel (cs) in the per-item phases.
template <typename G>
struct ItemShare {
  int j, run, cs;  // item, channel run, its first channel
  CONVLORA_HD explicit ItemShare(int v) {
    constexpr int RS = G::kUTap / G::kItemSplit;  // channels per thread
    run = G::kChannelMajor ? v % G::kItemSplit : v / G::kRound;
    j = G::kChannelMajor ? v / G::kItemSplit : v % G::kRound;
    cs = run * RS;
  }
};

// Phase 4 (per round): thread per item (backward: kItemSplit threads per item, each for
// its run of channels: ItemShare).
//   forward:  C (the pre-activation); GELU'(C) saved to A.pre when given; cbuf = w_o GELU(C)
//   backward: GELU'(C) from A.pre; cbuf = g = w_o du GELU'(C); for tile items ubuf = the nine U
//             vectors (what the weight gradient needs)
template <int R, int INTERP, bool BWD, typename scalar_t, typename acc_t>
CONVLORA_HD void phase_conv(const TileArgs<scalar_t, acc_t>& A, const BlockPos& P, int r0,
                            int nitems, const Smem<R, INTERP, BWD, acc_t>& S, int tid) {
  using G = Geometry<R, INTERP, BWD>;
  const int sy0 = P.h0 - G::kSH, sx0 = P.w0 - G::kSH;
  const int zy0 = P.h0 - G::kHalo, zx0 = P.w0 - G::kHalo;
  const int tile_items = BWD ? S.first[A.n] : nitems;
  constexpr int RS = R / G::kItemSplit;  // channels per thread (R in the forward)
  static_assert(BWD || RS == R, "the forward's rounds fill the block");
  for (int v = tid; v < G::kRound * G::kItemSplit; v += G::kThreads) {
    const ItemShare<G> share(v);
    const int j = share.j, cs = share.cs;
    if (r0 + j >= nitems) continue;
    const int it = S.items[r0 + j];
    const int t = item_token(it);
    const int ly = t / G::kSrcW, lx = t - ly * G::kSrcW;
    const int e = item_expert(it);
    const int gy = sy0 + ly, gx = sx0 + lx;
    const ItemPos<acc_t> ip = item_pos(A, e, gy, gx, item_a(it), item_b(it));
    // the item's slot among its token's saved pre-activations
    const int slot = item_a(it) * (item_nt(it) & 7) + item_b(it);
    acc_t* pre = A.pre == nullptr ? nullptr
        : A.pre + ((P.token0 + static_cast<int64_t>(gy) * A.W + gx) * G::kPreSlots + slot) * A.r;
    const int row = j * G::kItemRow;
    if constexpr (G::kChannelMajor) {  // the item's six neighbourhood weight rows (phase_delta)
      constexpr int SIDE = Interp<INTERP>::kSide;
      const int s = A.T.scale[e];
      for (int q = share.run; q < 6; q += G::kItemSplit) {
        acc_t wv[SIDE];
        if (q < 3)
          neighbour_weights<INTERP>(A.taps + A.T.up_x[e], ip.ox + q - 1, s * A.W, gx, wv);
        else
          neighbour_weights<INTERP>(A.taps + A.T.up_y[e], ip.oy + q - 4, s * A.H, gy, wv);
        CONVLORA_UNROLL
        for (int n = 0; n < SIDE; ++n) S.nbr[j * G::kNbrRow + q * SIDE + n] = wv[n];
      }
    }
    if (!BWD) {
      conv_item<R, INTERP, G::kZW, G::kZCell, true, false>(
          A.taps, A.T, e, A.T.scale[e], ip.oy, ip.ox, zy0, zx0, S.zs, S.w,
          e * weight_stride<R>(), S.b, S.cbuf, row, S.ubuf, 0);
      // GELU'(C) (or C) to the slot when saving (one path of code either way: the slope's
      // exponential is cheap beside the conv), channels past r not stored
      CONVLORA_UNROLL
      for (int co = 0; co < R; ++co) {
        const acc_t c = S.cbuf[row + co];
        acc_t slope;
        S.cbuf[row + co] = ip.w * gelu_and_grad<scalar_t>(c, slope);
        if (pre != nullptr && co < A.r) pre[co] = A.raw_pre ? c : slope;
      }
    } else {
      if (r0 + j < tile_items)
        conv_item<R, INTERP, G::kZW, G::kZCell, false, true, RS, G::kVecU>(
            A.taps, A.T, e, A.T.scale[e], ip.oy, ip.ox, zy0, zx0, S.zs, S.w,
            e * weight_stride<R>(), S.b, S.cbuf, row, S.ubuf, j * G::kURow, cs);
      acc_t dsrc[RS];  // the token's du
      if constexpr (G::kVecSrc) {  // 128-bit loads (kSrcCell, cs: x4)
        CONVLORA_UNROLL
        for (int c = 0; c < RS; c += 4) {
          const V4<acc_t> v = S.src.load4(t * G::kSrcCell + cs + c);
          CONVLORA_UNROLL
          for (int q = 0; q < 4; ++q) dsrc[c + q] = v.v[q];
        }
      } else {
        CONVLORA_UNROLL
        for (int c = 0; c < RS; ++c) dsrc[c] = S.src[t * G::kSrcCell + cs + c];
      }
      acc_t g[RS];
      CONVLORA_UNROLL
      for (int c = 0; c < RS; ++c)
        g[c] = cs + c < A.r ? ip.w * dsrc[c] * pre[cs + c] : acc_t(0);  // pre: GELU'(C)
      if constexpr (RS % 4 == 0) {
        CONVLORA_UNROLL
        for (int c = 0; c < RS; c += 4)
          S.cbuf.store4(row + cs + c, {{g[c], g[c + 1], g[c + 2], g[c + 3]}});
      } else {
        CONVLORA_UNROLL
        for (int c = 0; c < RS; ++c) S.cbuf[row + cs + c] = g[c];
      }
    }
  }
}

// Forward phase 5 (per round): thread per (tile token, channel): add the round's items of
// the token in item order.
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void phase_combine(int r0, const Smem<R, INTERP, false, acc_t>& S, int tid) {
  using G = Geometry<R, INTERP, false>;
  for (int u = tid; u < G::kSrc * R; u += G::kThreads) {
    const int t = u / R, c = u - t * R;
    const int nt = S.nt[t];
    if (nt == 0) continue;
    const int i0 = S.start[t], i1 = i0 + (nt >> 3) * (nt & 7);
    const int lo = i0 > r0 ? i0 : r0, hi = i1 < r0 + G::kRound ? i1 : r0 + G::kRound;
    acc_t sum = S.acc[t * G::kAccCell + c];
    for (int i = lo; i < hi; ++i) sum += S.cbuf[(i - r0) * G::kItemRow + c];
    S.acc[t * G::kAccCell + c] = sum;
  }
}

// Stores n <= 4 consecutive values at p: one 4-element vector store where n == 4 and p is
// aligned to it (8 bytes bf16/fp16, 16 fp32), else one by one.
template <typename scalar_t, typename acc_t>
CONVLORA_HD void store_run4(scalar_t* p, const acc_t (&v)[4], int n) {
  scalar_t vals[4];
  for (int j = 0; j < 4; ++j) vals[j] = static_cast<scalar_t>(v[j]);
  if (n == 4 && reinterpret_cast<uintptr_t>(p) % sizeof(vals) == 0) {
    struct alignas(sizeof(vals)) Raw {
      scalar_t v[4];
    };
#if defined(__CUDA_ARCH__)
    Raw raw;
    memcpy(&raw, vals, sizeof(vals));
    *reinterpret_cast<Raw*>(p) = raw;
#else
    memcpy(p, vals, sizeof(vals));
#endif
    return;
  }
  CONVLORA_UNROLL
  for (int j = 0; j < 4; ++j)  // compile-time indices: vals stays in registers
    if (j < n) p[j] = vals[j];
}

// Last phase: write the tile's rows of u = z + E(z) (forward) or dz = du + the gathered
// contributions (backward); tokens with an out-of-range expert get NaN. Thread per (tile
// token, run of 4 channels): the staged rows are read in 128-bit loads and the run is
// stored as one vector.
template <int R, int INTERP, bool BWD, typename scalar_t, typename acc_t>
CONVLORA_HD void phase_store(const TileArgs<scalar_t, acc_t>& A, const BlockPos& P,
                             const Smem<R, INTERP, BWD, acc_t>& S, int tid) {
  using G = Geometry<R, INTERP, BWD>;
  const int r = A.r, runs = (r + 3) / 4;
  for (int u = tid; u < G::kTileH * G::kTileW * runs; u += G::kThreads) {
    const int cell = u / runs, c0 = (u - cell * runs) * 4;
    const int ty = cell / G::kTileW, tx = cell - ty * G::kTileW;
    const int gy = P.h0 + ty, gx = P.w0 + tx;
    if (gy >= A.H || gx >= A.W) continue;
    const int t = (ty + G::kSH) * G::kSrcW + tx + G::kSH;  // source index
    const int nc = r - c0 < 4 ? r - c0 : 4;
    acc_t v[4];
    const V4<acc_t> a = S.acc.load4(cell * G::kAccCell + c0);
    V4<acc_t> b;
    if constexpr (BWD)
      b = S.src.load4(t * G::kSrcCell + c0);
    else
      b = S.zs.load4(((ty + G::kHalo) * G::kZW + tx + G::kHalo) * G::kZCell + c0);
    CONVLORA_UNROLL
    for (int c = 0; c < 4; ++c) v[c] = b.v[c] + a.v[c];
    if (S.es[t] == kBadExpert) {
      CONVLORA_UNROLL
      for (int c = 0; c < 4; ++c) v[c] = nan_value<acc_t>();
    }
    const int64_t tok = P.token0 + static_cast<int64_t>(gy) * A.W + gx;
    store_run4<scalar_t, acc_t>(A.out + tok * r + c0, v, nc);
    if (!BWD && A.pre != nullptr) {  // the token's unused pre-activation slots: zero
      const int nt = S.nt[t];
      for (int slot = (nt >> 3) * (nt & 7); slot < G::kPreSlots; ++slot)
        for (int c = 0; c < nc; ++c) A.pre[(tok * G::kPreSlots + slot) * r + c0 + c] = acc_t(0);
    }
  }
}

// Backward phase 5 (per round): weight gradients of the round's tile items (the first
// first[n] items; expert-sorted, so expert e's items are the stretch [first[e],
// first[e + 1])):
//   dW[e, co, ci, k] += g[co] U(tap k)[ci],   db[e, co] += g[co]
// Thread u owns input (k, ci) (or, u = 9R, the bias: an input of one) and a chunk of CO
// output channels; it walks each expert's items in order, one U word and the chunk of g
// (128-bit loads where the rows allow) per item, and adds its sums to expert e's
// accumulators.
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void phase_dw(int n, int r0, const Smem<R, INTERP, true, acc_t>& S, int tid) {
  using G = Geometry<R, INTERP, true>;
  constexpr int CO = R < 16 ? R : 16, NIN = 9 * R + 1;
  constexpr int GS = grad_stride<R>();
  const int tile_items = S.first[n];
  const int lo = r0, hi = r0 + G::kRound < tile_items ? r0 + G::kRound : tile_items;
  if (lo >= hi) return;
  for (int u = tid; u < (R / CO) * NIN; u += G::kThreads) {
    const int co0 = (u / NIN) * CO, in = u - (u / NIN) * NIN;
    const bool bias = in == 9 * R;
    const int k = in / R, ci = in - k * R;
    for (int e = 0; e < n; ++e) {
      const int b0 = S.first[e], b1 = S.first[e + 1];
      const int i0 = b0 > lo ? b0 : lo, i1 = b1 < hi ? b1 : hi;
      if (i0 >= i1) continue;
      acc_t acc[CO];
      CONVLORA_UNROLL
      for (int j = 0; j < CO; ++j) acc[j] = acc_t(0);
      for (int i = i0; i < i1; ++i) {
        const acc_t x = bias ? acc_t(1) : acc_t(S.ubuf[(i - r0) * G::kURow + k * G::kUTap + ci]);
        const int grow = (i - r0) * G::kItemRow + co0;
        static_assert(CO % 4 == 0, "g rows in 128-bit loads");
        CONVLORA_UNROLL
        for (int j = 0; j < CO; j += 4) {
          const V4<acc_t> g = S.cbuf.load4(grow + j);
          CONVLORA_UNROLL
          for (int q = 0; q < 4; ++q) acc[j + q] += g.v[q] * x;
        }
      }
      CONVLORA_UNROLL
      for (int j = 0; j < CO; ++j) {
        const int dst = bias ? grad_bias_index<R>(co0 + j) : grad_index<R>(co0 + j, k, ci);
        S.dw[e * GS + dst] += acc[j];
      }
    }
  }
}

// phase_delta's work for one item of a channel-major round (bicubic: its neighbourhood
// weights in shared memory, one channel a pass). Per conv row, dU of the row's
// three taps, one input channel's row of W (outputs contiguous) in 128-bit loads, four
// outputs at a time, so no transposed copy is staged; folded over the neighbourhood's
// columns (col, 3 x side); then each contribution D[ny][nx] = sum_ky wy[ky][ny]
// col[ky][nx] is formed and written at once, so no side x side accumulators are held.
// Only the cells that are tile tokens (the rows [y0, y1) and columns [x0, x1) of the
// source t's neighbourhood; a third of them, on average over the tile's sources) are
// formed and written: the gather reads no other. Rows outside the upsampled map have
// zero weights (neighbour_weights) and no dU.
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void delta_item_shared(const Smem<R, INTERP, true, acc_t>& S, int j, int cs, int t,
                                   int oy, int extent, int row, int w_off) {
  using G = Geometry<R, INTERP, true>;
  constexpr int SIDE = Interp<INTERP>::kSide, HALO = G::kHalo;
  constexpr int RS = R / G::kItemSplit;  // channels per thread
  const int nb = j * G::kNbrRow;
  const int ly = t / G::kSrcW, lx = t - ly * G::kSrcW;
  const int y0 = G::kSH + HALO - ly > 0 ? G::kSH + HALO - ly : 0;
  const int y1 = G::kSH + HALO + G::kTileH - ly < SIDE ? G::kSH + HALO + G::kTileH - ly : SIDE;
  const int x0 = G::kSH + HALO - lx > 0 ? G::kSH + HALO - lx : 0;
  const int x1 = G::kSH + HALO + G::kTileW - lx < SIDE ? G::kSH + HALO + G::kTileW - lx : SIDE;
  acc_t wx[3][SIDE];
  CONVLORA_UNROLL
  for (int kx = 0; kx < 3; ++kx)
    CONVLORA_UNROLL
    for (int n = 0; n < SIDE; ++n) wx[kx][n] = S.nbr[nb + kx * SIDE + n];
  CONVLORA_NO_UNROLL
  for (int ci = cs; ci < cs + RS; ++ci) {
    acc_t col[3][SIDE];
    CONVLORA_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      const int p = oy + ky - 1;
      acc_t du[3] = {acc_t(0), acc_t(0), acc_t(0)};
      if (p >= 0 && p < extent) {
        static_assert(R % 4 == 0 && G::kItemRow % 4 == 0, "128-bit loads (w_off: x4)");
        for (int co0 = 0; co0 < R; co0 += 4) {
          const V4<acc_t> g = S.cbuf.load4(j * G::kItemRow + co0);
          CONVLORA_UNROLL
          for (int kx = 0; kx < 3; ++kx) {
            const V4<acc_t> w = S.w.load4(w_off + ((ky * 3 + kx) * R + ci) * R + co0);
            CONVLORA_UNROLL
            for (int q = 0; q < 4; ++q) du[kx] += w.v[q] * g.v[q];
          }
        }
      }
      CONVLORA_UNROLL
      for (int nx = 0; nx < SIDE; ++nx)
        col[ky][nx] = nx >= x0 && nx < x1
                          ? wx[0][nx] * du[0] + wx[1][nx] * du[1] + wx[2][nx] * du[2]
                          : acc_t(0);
    }
    for (int ny = y0; ny < y1; ++ny) {
      const acc_t w0 = S.nbr[nb + 3 * SIDE + ny], w1 = S.nbr[nb + 4 * SIDE + ny],
                  w2 = S.nbr[nb + 5 * SIDE + ny];
      CONVLORA_UNROLL
      for (int nx = 0; nx < SIDE; ++nx)
        if (nx >= x0 && nx < x1)
          S.ubuf[row + (ny * SIDE + nx) * R + ci] = w0 * col[0][nx] + w1 * col[1][nx] +
                                                    w2 * col[2][nx];
    }
  }
}

// Backward phase 6 (per round, after phase_dw has read U): kItemSplit threads per item,
// each owning a run of RS input channels. The item's dU = W^T g at each of its nine
// upsampled taps goes, through the up-sampling taps, into its contributions D[c] to the z
// values c of its source token's neighbourhood (c = (dy + halo)·side + dx + halo), written
// over the item's ubuf row:
//   dU(k)[ci] = sum_co W[e, k, ci, co] g[co],   D[z tap of k] += wy wx dU(k)
// D is held in registers (side x side x CD channels a pass) and written once: the up taps
// are separable, so each conv row's three dU vectors are first folded over the
// neighbourhood's columns (wx), then added to its rows (wy), with compile-time indices.
// Thread v takes the item and channel run ItemShare gives it (bilinear, a warp's lanes
// hold consecutive items, in rows whose strides put them in distinct banks; bicubic,
// consecutive channels of a few items).
template <int R, int INTERP, typename scalar_t, typename acc_t>
CONVLORA_HD void phase_delta(const TileArgs<scalar_t, acc_t>& A, const BlockPos& P, int r0,
                             int nitems, const Smem<R, INTERP, true, acc_t>& S, int tid) {
  using G = Geometry<R, INTERP, true>;
  constexpr int SIDE = Interp<INTERP>::kSide;
  constexpr int RS = R / G::kItemSplit;  // channels per thread
  // channels per pass: at most 64 accumulators (4 bilinear, 1 bicubic)
  constexpr int CD0 = 64 / G::kNeighbours >= 4 ? 4 : (64 / G::kNeighbours >= 2 ? 2 : 1);
  constexpr int CD = CD0 < RS ? CD0 : RS;
  static_assert(RS % CD == 0, "whole passes");
  const int sy0 = P.h0 - G::kSH, sx0 = P.w0 - G::kSH;
  for (int v = tid; v < G::kRound * G::kItemSplit; v += G::kThreads) {
    const ItemShare<G> share(v);
    const int j = share.j, cs = share.cs;
    if (r0 + j >= nitems) continue;
    const int it = S.items[r0 + j];
    const int t = item_token(it), e = item_expert(it), s = A.T.scale[e];
    const int gy = sy0 + t / G::kSrcW, gx = sx0 + t % G::kSrcW;
    const ItemPos<acc_t> ip = item_pos(A, e, gy, gx, item_a(it), item_b(it));
    const int row = j * G::kURow, w_off = e * weight_stride<R>();
    if constexpr (G::kChannelMajor) {
      delta_item_shared<R, INTERP>(S, j, cs, t, ip.oy, s * A.H, row, w_off);
      continue;
    }
    acc_t wx[3][SIDE];
    CONVLORA_UNROLL
    for (int kx = 0; kx < 3; ++kx)
      neighbour_weights<INTERP>(A.taps + A.T.up_x[e], ip.ox + kx - 1, s * A.W, gx, wx[kx]);
    CONVLORA_NO_UNROLL
    for (int c0 = cs; c0 < cs + RS; c0 += CD) {
      acc_t D[SIDE][SIDE][CD];
      CONVLORA_UNROLL
      for (int ny = 0; ny < SIDE; ++ny)
        CONVLORA_UNROLL
        for (int nx = 0; nx < SIDE; ++nx)
          CONVLORA_UNROLL
          for (int c = 0; c < CD; ++c) D[ny][nx][c] = acc_t(0);
      CONVLORA_UNROLL
      for (int ky = 0; ky < 3; ++ky) {
        const int p = ip.oy + ky - 1;
        if (p < 0 || p >= s * A.H) continue;
        // dU of the row's three taps
        acc_t du[3][CD];
        CONVLORA_UNROLL
        for (int kx = 0; kx < 3; ++kx)
          CONVLORA_UNROLL
          for (int c = 0; c < CD; ++c) du[kx][c] = acc_t(0);
        // g in fours (128-bit loads: kItemRow, R: x4)
        constexpr int GV = 4;
        for (int co0 = 0; co0 < R; co0 += GV) {
          acc_t g[GV];
          const V4<acc_t> gv = S.cbuf.load4(j * G::kItemRow + co0);
          CONVLORA_UNROLL
          for (int q = 0; q < 4; ++q) g[q] = gv.v[q];
          CONVLORA_UNROLL
          for (int q = 0; q < GV; ++q) {
            CONVLORA_UNROLL
            for (int kx = 0; kx < 3; ++kx) {
              const int wrow = w_off + ((ky * 3 + kx) * R + co0 + q) * R + c0;
              if constexpr (CD == 4) {  // a 128-bit load of Wᵀ's row (R, c0, w_off: x4)
                const V4<acc_t> wv = S.wt.load4(wrow);
                CONVLORA_UNROLL
                for (int c = 0; c < 4; ++c) du[kx][c] += wv.v[c] * g[q];
              } else {
                CONVLORA_UNROLL
                for (int c = 0; c < CD; ++c) du[kx][c] += S.wt[wrow + c] * g[q];
              }
            }
          }
        }
        // folded over the neighbourhood's columns, then added to its rows
        acc_t wy[SIDE];
        neighbour_weights<INTERP>(A.taps + A.T.up_y[e], p, s * A.H, gy, wy);
        CONVLORA_UNROLL
        for (int nx = 0; nx < SIDE; ++nx) {
          acc_t col[CD];
          CONVLORA_UNROLL
          for (int c = 0; c < CD; ++c)
            col[c] = wx[0][nx] * du[0][c] + wx[1][nx] * du[1][c] + wx[2][nx] * du[2][c];
          CONVLORA_UNROLL
          for (int ny = 0; ny < SIDE; ++ny)
            CONVLORA_UNROLL
            for (int c = 0; c < CD; ++c) D[ny][nx][c] += wy[ny] * col[c];
        }
      }
      CONVLORA_UNROLL
      for (int ny = 0; ny < SIDE; ++ny)
        CONVLORA_UNROLL
        for (int nx = 0; nx < SIDE; ++nx) {
          const int dst = row + (ny * SIDE + nx) * R + c0;
          if constexpr (G::kVecU && CD == 4) {  // a 128-bit store (row, R, c0: x4)
            S.ubuf.store4(dst, {{D[ny][nx][0], D[ny][nx][1], D[ny][nx][2], D[ny][nx][3]}});
          } else {
            CONVLORA_UNROLL
            for (int c = 0; c < CD; ++c) S.ubuf[dst + c] = D[ny][nx][c];
          }
        }
    }
  }
}

// Backward phase 7 (per round): thread per (tile token, chunk of channels). The token
// pulls, in a fixed order, the contributions of the round's items of every source whose
// neighbourhood holds it: neighbourhood cell by cell, or item by item (kGatherByItem).
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void phase_gather(int r0, int nitems, const Smem<R, INTERP, true, acc_t>& S,
                              int tid) {
  using G = Geometry<R, INTERP, true>;
  constexpr int SIDE = Interp<INTERP>::kSide, HALO = G::kHalo;
  // channels per thread: two threads per token from R = 8 (all 128 busy at 8 x 8 tokens)
  constexpr int CH = R < 8 ? R : (R / 2 < 16 ? R / 2 : 16), NCH = R / CH;
  const int hi_round = r0 + G::kRound < nitems ? r0 + G::kRound : nitems;
  for (int u = tid; u < G::kTileH * G::kTileW * NCH; u += G::kThreads) {
    const int cell = u / NCH, c0 = (u - cell * NCH) * CH;
    const int ty = cell / G::kTileW, tx = cell - ty * G::kTileW;
    acc_t sum[CH];
    CONVLORA_UNROLL
    for (int c = 0; c < CH; ++c) sum[c] = acc_t(0);
    if constexpr (G::kGatherByItem) {
      // the round's items in order, a source's run of them at a time (its items are
      // consecutive: an item's down taps give its place in the run), each adding the cell
      // of the source's neighbourhood that is this token, if it has one
      for (int i = r0; i < hi_round;) {
        const int it = S.items[i];  // one broadcast word
        const int t = item_token(it), nt = item_nt(it);
        const int run_end = i - (item_a(it) * (nt & 7) + item_b(it)) + (nt >> 3) * (nt & 7);
        const int end = run_end < hi_round ? run_end : hi_round;
        const int oy = ty + G::kSH + HALO - t / G::kSrcW;
        const int ox = tx + G::kSH + HALO - t % G::kSrcW;
        if (oy >= 0 && oy < SIDE && ox >= 0 && ox < SIDE) {
          static_assert(G::kURow % 4 == 0 && CH % 4 == 0, "128-bit loads (kURow, R, c0: x4)");
          for (int k = i; k < end; ++k) {
            const int src = (k - r0) * G::kURow + (oy * SIDE + ox) * R + c0;
            CONVLORA_UNROLL
            for (int c = 0; c < CH; c += 4) {
              const V4<acc_t> v = S.ubuf.load4(src + c);
              CONVLORA_UNROLL
              for (int q = 0; q < 4; ++q) sum[c + q] += v.v[q];
            }
          }
        }
        i = end;
      }
    } else {
      // the neighbourhood's cells in order, each adding its source's items in the round
      static_assert(G::kVecU && CH % 4 == 0, "128-bit loads (kURow, R, c0: x4)");
      for (int oy = 0; oy < SIDE; ++oy) {
        for (int ox = 0; ox < SIDE; ++ox) {
          // the source whose neighbourhood cell (oy, ox) is this token
          const int t = (ty + G::kSH + HALO - oy) * G::kSrcW + tx + G::kSH + HALO - ox;
          const int nt = S.nt[t];
          if (nt == 0) continue;
          const int i0 = S.start[t], i1 = i0 + (nt >> 3) * (nt & 7);
          const int lo = i0 > r0 ? i0 : r0, hi = i1 < hi_round ? i1 : hi_round;
          for (int i = lo; i < hi; ++i) {
            const int src = (i - r0) * G::kURow + (oy * SIDE + ox) * R + c0;
            CONVLORA_UNROLL
            for (int c = 0; c < CH; c += 4) {
              const V4<acc_t> v = S.ubuf.load4(src + c);
              CONVLORA_UNROLL
              for (int q = 0; q < 4; ++q) sum[c + q] += v.v[q];
            }
          }
        }
      }
    }
    static_assert(CH % 4 == 0, "tile sums in 128-bit accesses");
    CONVLORA_UNROLL
    for (int c = 0; c < CH; c += 4) {  // 128-bit accesses (kAccCell, c0: x4)
      const int at = cell * G::kAccCell + c0 + c;
      const V4<acc_t> a = S.acc.load4(at);
      S.acc.store4(at, {{a.v[0] + sum[c], a.v[1] + sum[c + 1], a.v[2] + sum[c + 2],
                         a.v[3] + sum[c + 3]}});
    }
  }
}

// Backward last phase: the block's weight-gradient partial to global memory (when the
// accumulators were in shared memory; otherwise they already are).
template <int R, int INTERP, typename acc_t>
CONVLORA_HD void phase_flush_dw(int r, int n, bool dw_smem, acc_t* partial,
                                const Smem<R, INTERP, true, acc_t>& S, int tid) {
  using G = Geometry<R, INTERP, true>;
  if (!dw_smem) return;
  copy_out4<G::kThreads>(S.dw, partial, n * grad_stride<R>(), tid);
}

// Runs one block. Exec::phase(name, f) calls f(tid) for every thread of the block and then
// synchronises (a __syncthreads() on the GPU); Exec::poison(p, bytes) fills a buffer with
// NaN bytes in the checked CPU build and does nothing elsewhere.
template <int R, int INTERP, bool BWD, typename Exec, typename scalar_t, typename acc_t>
CONVLORA_HD void run_block(Exec& ex, const TileArgs<scalar_t, acc_t>& A, const Layout& L,
                           unsigned char* smem, int64_t block) {
  using G = Geometry<R, INTERP, BWD>;
  const BlockPos P = block_pos<G::kTileH, G::kTileW>(A, block);
  acc_t* partial = BWD ? A.dw_partial + block * A.n * grad_stride<R>() : nullptr;
  const Smem<R, INTERP, BWD, acc_t> S(smem, L, A.n, A.wbuf, partial, A.r);
  ex.poison(smem, L.bytes);
  ex.phase("load", [&](int tid) { phase_load<R, INTERP, BWD>(A, P, S, tid); });
  ex.phase("list", [&](int tid) { phase_list<R, INTERP, BWD>(A.n, S, tid); });
  const int nitems = S.first[2 * A.n];
  for (int r0 = 0; r0 < nitems; r0 += G::kRound) {
    ex.poison(S.cbuf.p, G::kRound * G::kItemRow * static_cast<int>(sizeof(acc_t)));
    if (BWD) ex.poison(S.ubuf.p, G::kRound * G::kURow * static_cast<int>(sizeof(acc_t)));
    if (G::kChannelMajor)
      ex.poison(S.nbr.p, G::kRound * G::kNbrRow * static_cast<int>(sizeof(acc_t)));
    ex.phase("conv", [&](int tid) { phase_conv<R, INTERP, BWD>(A, P, r0, nitems, S, tid); });
    if constexpr (!BWD) {
      ex.phase("combine", [&](int tid) { phase_combine<R, INTERP>(r0, S, tid); });
    } else {
      ex.phase("dw", [&](int tid) { phase_dw<R, INTERP>(A.n, r0, S, tid); });
#if defined(CONVLORA_CHECKED_DROP_A_BARRIER)  // tests only: the race check must see this
      ex.phase("delta+gather", [&](int tid) {
        phase_delta<R, INTERP>(A, P, r0, nitems, S, tid);
        phase_gather<R, INTERP>(r0, nitems, S, tid);
      });
#else
      ex.phase("delta", [&](int tid) { phase_delta<R, INTERP>(A, P, r0, nitems, S, tid); });
      ex.phase("gather", [&](int tid) { phase_gather<R, INTERP>(r0, nitems, S, tid); });
#endif
    }
  }
  ex.phase("store", [&](int tid) { phase_store<R, INTERP, BWD>(A, P, S, tid); });
  if constexpr (BWD) {
    ex.phase("flush_dw", [&](int tid) { phase_flush_dw<R, INTERP>(A.r, A.n, A.dw_smem, partial, S, tid); });
  }
}

// The reduce after the backward: weight-gradient output i (expert e, then (co, ci, k) of
// r·r·9 weights and r biases) = the sum over blocks of the matching accumulator of each
// block's partial (n x grad_stride), in two levels whose order only the block count fixes:
// reduce_slices(blocks) contiguous runs of partials, each summed in block order
// (reduce_slice; on the GPU one thread per (output, run)), then the runs' sums in order.
constexpr int kReduceThreads = 256;

CONVLORA_HD int reduce_slices(int64_t blocks) {
  int s = 1;
  while (s < 32 && static_cast<int64_t>(s) * 32 < blocks) s *= 2;
  return s;
}

template <int R, typename acc_t>
CONVLORA_HD acc_t reduce_slice(const acc_t* partial, int64_t blocks, int r, int n, int i,
                               int slice, int slices) {
  const int ne = grad_entries(r), nw = r * r * 9;
  const int e = i / ne, entry = i - e * ne;
  int src = grad_bias_index<R>(entry - nw);
  if (entry < nw) {
    const int co = entry / (9 * r), ci = (entry / 9) % r, k = entry % 9;
    src = grad_index<R>(co, k, ci);
  }
  const int64_t per_block = static_cast<int64_t>(n) * grad_stride<R>();
  const int64_t run = (blocks + slices - 1) / slices, b0 = slice * run;
  const int64_t b1 = b0 + run < blocks ? b0 + run : blocks;
  const acc_t* p = partial + e * grad_stride<R>() + src;
  acc_t sum = acc_t(0);
  for (int64_t b = b0; b < b1; ++b) sum += p[b * per_block];
  return sum;
}

// Output i of the reduce, both levels in one call (the CPU's loop body).
template <int R, typename acc_t>
CONVLORA_HD void reduce_entry(const acc_t* partial, int64_t blocks, int r, int n, int i,
                              acc_t* dw) {
  const int slices = reduce_slices(blocks);
  acc_t sum = reduce_slice<R>(partial, blocks, r, n, i, 0, slices);
  for (int s = 1; s < slices; ++s) sum += reduce_slice<R>(partial, blocks, r, n, i, s, slices);
  dw[i] = sum;
}

}  // namespace tile
}  // namespace convlora
