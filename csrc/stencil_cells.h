// The per-token forward at r <= 8, bilinear, as tensor-core products of the z cells
// around each token by composed weights (the stencil ops' mma argument; docs/design.md,
// "The forward as composed weights").
//
// Bilinear up-sampling reaches z within one row and column of a token, at any scale, so a
// token's conv pre-activations are linear in the 3 x 3 z cells around it. For conv output
// (p, q) of token (i, j), expert e at scale s:
//     C = bias + sum_{ky, kx} W[ky, kx] U(p + ky - 1, q + kx - 1)
//       = bias + sum over the cells (cy, cx) of M(cy, cx) z(i + cy - 1, j + cx - 1),
//     M(cy, cx) = sum_{ky, kx} wy[ky][cy] wx[kx][cx] W[ky, kx]      (R x R each)
// where wy[ky][cy] is the weight with which conv row p + ky - 1 takes z row i + cy - 1 (its
// up taps; zero outside the s·H map), likewise wx. Seen from the token's row, those weights
// depend on the scale, on which of the token's down taps p is (its phase) and on whether the
// row is the map's first or last (clamped taps, the conv's zero padding), not otherwise on
// the row (row_class). So per expert there are classes x classes x phases x phases matrices M
// of 9 R x R: the stencil's prep pass writes them all with its tap tables and padded
// weights, in the same launch (a block of threads per matrix: its 18 factors wy, wx once,
// the taps they need computed, not read; their 81 products; then its words in tf32 in the
// MMA's fragment order, cell_block_words), the backward's transposed blocks and fold tables
// after them; 415 KB at SAM's global shape with 8 experts, each.
//
// The block program: one block per 8 x 8 tile, eight warps (four of them a warp per 16
// tokens in the mma phase).
//   load  stage z of the tile and its one-token ring (zero outside the map: those cells meet
//         zero weights), each token's key (phase count, expert, row class, column class),
//         the biases
//   list  the tile's tokens sorted by key (each token counts the smaller keys)
//   mma   warp per 16 consecutive sorted tokens: A is the tokens' 3 x 3 cells (K = 9 R = 72,
//         one k-step a cell), read once; per key in the group (a warp-uniform loop over the
//         distinct keys, in increasing order), per phase pair j, D = A M_j in 9 MMAs
//         (m16n8k8, tf32, fp32 sums), kept on the rows of that key; C to shared memory
//   out   thread per (token, pair of channels): C = the products + bias, GELU'(C) saved
//         (the backward's slots), u = z + the sum of w_down GELU(C) over the phases written.
// No U, no item list, no per-item rounds: per 16 tokens about 40 shared loads for A and
// the keys, 5 global loads and 9 MMAs per phase pair of each key, and the GELUs.
#pragma once

#include "stencil_tile.h"
#include "tile_mma.h"

namespace convlora {
namespace tile {

template <int R>
CONVLORA_HD constexpr bool cells_rank() { return R == 8; }
// The rank bound of the composed-weight programs that run a call of rank bound R (bilinear):
// 8 for every rank up to 8 (below 8 the channels from r on are zero in every composed
// weight, bias and delta; the prep buffer's tap tables, the one part of it they read, do not
// depend on the rank), 0 where they do not run.
template <int R, int INTERP>
CONVLORA_HD constexpr int cells_bound() {
  return INTERP == kBilinear && R <= 8 ? 8 : 0;
}

constexpr int kCellThreads = 256;  // eight warps: four for the MMAs (16 tokens each), all for
                                   // the out phase (a thread per token and channel pair)
constexpr int kCellMmaWarps = 4;
constexpr int kCellTile = 8;       // tokens per side
constexpr int kCellZ = kCellTile + 2;  // staged cells per side: the tile and its ring
// A staged cell: R + 4 words (4 x an odd number at R = 8): the 8 tokens (g) of a warp's A
// load read channels t (or t + 4) of cells d apart, 12 d mod 32 words apart, so neighbouring
// tokens' four words fall in distinct banks (unless d is a multiple of 8); the out phase's
// pairs of channels likewise; and staging stores 128 bits at a time.
template <int R>
CONVLORA_HD constexpr int cell_stride() { return R + 4; }
// A sorted token's C values in shared memory between the mma and out phases: four phase
// pairs of R channels, then R words of padding, so that the 8 tokens a warp's lanes write
// (or read) a pair of channels of fall 8 words apart: all 32 banks, twice.
template <int R>
CONVLORA_HD constexpr int cell_c_row() { return 5 * R; }
// One composed matrix (one key, one phase pair) in fragment order: 9 k-steps of 8 x R.
template <int R>
CONVLORA_HD constexpr int cell_block() { return 9 * 8 * R; }

// Sort keys: key << 6 | token. A token's key is (its expert has two phases) << 8 | expert
// << 4 | row class << 2 | column class (< 512), or one of these. The phase bit first: the
// tokens of one-phase experts come first, so that most warps hold tokens of one kind and no
// lane of theirs waits for another's four phases in the out phase.
constexpr int kCellBad = 0x200;   // expert index out of range: NaN output
constexpr int kCellNone = 0x201;  // outside the map
constexpr int kCellLast = 0x1FF;  // the largest key with work
CONVLORA_HD int cell_expert(int key) { return (key >> 4) & 15; }

// Floats of a call's composed weights (n experts): the forward's blocks (then its biases,
// cell_bias_words); the backward's are the same blocks transposed, then the fold tables
// (cell_fold).
template <int R>
CONVLORA_HD int64_t cell_words(const CellTables& C, int n) {
  return static_cast<int64_t>(C.off[n]) * cell_block<R>();
}
// The forward's biases after its blocks: expert e's channel c at e R + c (zero from r on).
template <int R>
CONVLORA_HD int64_t cell_bias_words(int n) { return static_cast<int64_t>(n) * R; }
constexpr int kFoldWords = 2 * 3 * 2 * 9;  // per expert: axis, class, phase, 3 x 3
// The backward's fold table of expert e, axis (0 rows, 1 columns), class c and phase a: 9
// words, [k][nb] the weight with which conv row (or column) p + k - 1 (p: the token's
// down tap a) takes z row (column) nb - 1 of the token's 3 x 3.
CONVLORA_HD int cell_fold(int e, int axis, int c, int a) {
  return (((e * 2 + axis) * 3 + c) * 2 + a) * 9;
}

// Composed block blk of a call: its expert e, row and column classes cy, cx, and row and
// column phases a, b (blocks C.off[e] + ((cy·ns_x + cx)·ph + a)·ph + b).
struct CellBlock {
  int e, cy, cx, a, b;
};
// The quotients as shifts and a multiply, not divisions by runtime values: the composed
// weights are bilinear's (cells_bound), one or two phases a token, one to three classes
// per axis, at most 9 class pairs.
CONVLORA_HD CellBlock cell_block_of(const CellTables& C, int n, int blk) {
  CellBlock B{};
  while (B.e + 1 < n && blk >= C.off[B.e + 1]) ++B.e;
  const int sh = C.ph[B.e] - 1;  // phases: 1 or 2
  int rest = blk - C.off[B.e];
  B.b = rest & sh;
  rest >>= sh;
  B.a = rest & sh;
  rest >>= sh;
  // rest / ns_x: (rest · 11) >> 5 is rest / 3 for rest < 9
  B.cy = C.ns_x == 3 ? (rest * 11) >> 5 : rest >> (C.ns_x - 1);
  B.cx = rest - B.cy * C.ns_x;
  return B;
}

// The weights with which conv row (axis 0; column: 1) p + k - 1 takes z rows (columns) -1,
// 0, 1 of a token's 3 x 3 (nb; neighbour_weights, bilinear), p the down tap a (0 or 1) of
// a token of class c of expert e. The taps are computed as the tables hold them
// (padded_taps of down_taps, up_taps: table_value's entries down_y (x) + e n + row and
// up_y (x)[e] + p, with the interpolation a constant), not read: the prep pass writes the
// tables in the same launch.
template <typename acc_t>
CONVLORA_HD void cell_axis_row(const Tables& T, int e, int axis, int c, int a, int k,
                               acc_t (&nb)[3]) {
  const int n = axis ? T.W : T.H, s = T.scale[e];
  const int row = class_row(c, n);
  const Taps<acc_t> down = padded_taps(down_taps<acc_t>(row, n, s, kBilinear));
  const int p = (a ? down.idx[1] : down.idx[0]) + k - 1;  // a < 2: no runtime index
  const bool valid = p >= 0 && p < s * n;
  neighbour_weights_of<kBilinear>(padded_taps(up_taps<acc_t>(valid ? p : 0, n, s, kBilinear)),
                                  valid, row, nb);
}

// Row k of a composed block's factors along an axis: f[9 axis + 3 k + nb] (cell_axis_row of
// the block's class and phase on that axis). Six calls (axis, k) fill a block's 18.
template <typename acc_t>
CONVLORA_HD void cell_factor_row(const Tables& T, const CellBlock& B, int axis, int k,
                                 acc_t* f) {
  acc_t nb[3];
  cell_axis_row<acc_t>(T, B.e, axis, axis ? B.cx : B.cy, axis ? B.b : B.a, k, nb);
  CONVLORA_UNROLL
  for (int q = 0; q < 3; ++q) f[9 * axis + 3 * k + q] = nb[q];
}

// A composed block's products (cell_product): a cell's nine, then three words of padding
// (a row of 48 bytes: three 128-bit loads).
constexpr int kCellProductRow = 12;
template <typename acc_t>
struct alignas(16) CellProducts {
  acc_t v[kCellProductRow];
};

// Entry i < 81 of a composed block's products (f: its factors, cell_factor_row): tap
// (ky, kx) = (i % 9 / 3, i % 3) of cell i / 9 (the cell (cell / 3, cell % 3) of the token's
// 3 x 3), wy[ky][cell row] wx[kx][cell column], at F[kCellProductRow cell + 3 ky + kx].
template <typename acc_t>
CONVLORA_HD void cell_product(const acc_t* f, int i, acc_t* F) {
  const int cell = i / 9, tap = i % 9;
  F[kCellProductRow * cell + tap] = f[3 * (tap / 3) + cell / 3] * f[9 + 3 * (tap % 3) + cell % 3];
}

// The weights W[co][ci][ky][kx] of expert e's channel pair p (input ci = p % 8, output
// co = p / 8) in acc_t (zero for channels from r on).
template <int R, typename acc_t, typename w_t>
CONVLORA_HD void cell_pair_weights(const w_t* conv_w, int r, int e, int p, acc_t (&w)[9]) {
  const int ci = p % 8, co = p / 8;
  const bool in = ci < r && co < r;
  const w_t* wp = conv_w + ((static_cast<int64_t>(e) * r + (in ? co : 0)) * r + (in ? ci : 0)) * 9;
  CONVLORA_UNROLL
  for (int k = 0; k < 9; ++k) w[k] = in ? static_cast<acc_t>(wp[k]) : acc_t(0);
}

// The words of a composed block (F: its products) that thread tid of `threads` (a multiple
// of 64) writes, w: its channel pair's weights (cell_pair_weights of p = tid % 64): cells
// tid / 64, + threads / 64, ..., each into the forward's block at fwd and the backward's
// at bwd (either null: not written). A block's 576 words: k-steps 0..7 in pairs, lane l's
// four words at 128 m + 4 l (b0, b1 of k-step 2 m, then of 2 m + 1), k-step 8 at
// 512 + 2 l; lane l = 4 g + t holds B[k][n] for k = t, t + 4 and n = g. The forward's
// B[ci][co] (input channel ci, output co) of cell k-step is M(cell)[ci][co] = the sum over
// the taps, in order in acc_t, of F[cell][tap] W[co][ci][tap], rounded to tf32; the
// backward's B[co][ci] is the same value (dz of a cell = M^T delta).
template <int R, typename acc_t>
CONVLORA_HD void cell_block_words(const acc_t (&w)[9], const acc_t* F, int tid, int threads,
                                  acc_t* fwd, acc_t* bwd) {
  static_assert(cells_rank<R>(), "a k-step of 8 input channels is one cell");
  const int p = tid % 64, ci = p % 8, co = p / 8;
  const int lane_f = 4 * co + ci % 4, which_f = ci / 4;  // B[ci][co]: k = ci, n = co
  const int lane_b = 4 * ci + co % 4, which_b = co / 4;  // B[co][ci]: k = co, n = ci
  const auto* rows = reinterpret_cast<const CellProducts<acc_t>*>(F);
  for (int ks = tid / 64; ks < 9; ks += threads / 64) {
    const CellProducts<acc_t> row = rows[ks];  // 128-bit loads
    acc_t v = acc_t(0);
    CONVLORA_UNROLL
    for (int k = 0; k < 9; ++k) v += row.v[k] * w[k];
    v = tf32_round(v);
    const int base = ks < 8 ? 128 * (ks / 2) + 2 * (ks % 2) : 512, lanes = ks < 8 ? 4 : 2;
    if (fwd != nullptr) fwd[base + lanes * lane_f + which_f] = v;
    if (bwd != nullptr) bwd[base + lanes * lane_b + which_b] = v;
  }
}

// Words after a pass's blocks: the forward's biases (cell_bias_words), the backward's fold
// tables (kFoldWords an expert).
template <int R, bool BWD>
CONVLORA_HD int cells_tail_words(int n) {
  return BWD ? n * kFoldWords : static_cast<int>(cell_bias_words<R>(n));
}
// Entry j of a pass's tail (tail: its first word). The forward's biases in fp32 as the
// multiply-add programs' (not rounded to tf32); the backward's fold table of expert e, axis,
// class c and phase a (cell_fold; zero for classes and phases the call does not have), in
// acc_t.
template <int R, typename acc_t, typename w_t, bool BWD>
CONVLORA_HD void cells_tail_entry(const w_t* conv_b, int r, const Tables& T,
                                  const CellTables& C, int j, acc_t* tail) {
  if constexpr (!BWD) {
    const int e = j / R, c = j % R;
    tail[j] = c < r ? static_cast<acc_t>(conv_b[e * r + c]) : acc_t(0);
  } else {
    const int e = j / kFoldWords, f = j - e * kFoldWords;
    const int axis = f / 54, c = (f / 18) % 3, a = (f / 9) % 2, k = (f % 9) / 3, cell = f % 3;
    acc_t v = acc_t(0);
    if (c < (axis ? C.ns_x : C.ns_y) && a < C.ph[e]) {
      acc_t w[3];
      cell_axis_row<acc_t>(T, e, axis, c, a, k, w);
      v = w[cell];
    }
    tail[j] = v;
  }
}

// Byte offsets of the block's shared arrays (in Layout's fields: zs, key, items (the sorted
// tokens), b, cbuf (the sorted tokens' C)).
template <int R>
CONVLORA_HD Layout make_cells_layout(int n) {
  constexpr int tokens = kCellTile * kCellTile * 4;  // bytes of an int per tile token
  Layout L{};
  L.zs = 0;
  L.key = align16(kCellZ * kCellZ * cell_stride<R>() * 4);
  L.items = L.key + align16(tokens);
  L.b = L.items + align16(tokens);
  L.cbuf = L.b + align16(n * R * 4);
  L.bytes = L.cbuf + align16(kCellTile * kCellTile * cell_c_row<R>() * 4);
  L.mma = true;
  return L;
}

template <typename acc_t>
struct CellSmem {
  SArr<acc_t> zs, b, c;
  SArr<int> key, order;
  CONVLORA_HD CellSmem(unsigned char* base, const Layout& L, int n, int R)
      : zs(CONVLORA_SARR(acc_t, base, L.zs, kCellZ * kCellZ * (R + 4), "z")),
        b(CONVLORA_SARR(acc_t, base, L.b, n * R, "bias")),
        c(CONVLORA_SARR(acc_t, base, L.cbuf, kCellTile * kCellTile * 5 * R, "pre-activations")),
        key(CONVLORA_SARR(int, base, L.key, kCellTile * kCellTile, "token key")),
        order(CONVLORA_SARR(int, base, L.items, kCellTile * kCellTile, "sorted tokens")) {}
};

// Phase 1: z of the tile and its ring (zero outside the map), each tile token's sort key,
// the biases.
// bias: the composed weights' biases (cell_bias_words)
template <int R, typename scalar_t, typename acc_t>
CONVLORA_HD void cells_load(const TileArgs<scalar_t, acc_t>& A, const BlockPos& P,
                            const CellSmem<acc_t>& S, const acc_t* bias, int tid) {
  stage_region<R, kCellZ, kCellZ, cell_stride<R>(), kCellThreads, true>(
      A.z + P.token0 * A.r, A.H, A.W, A.r, P.h0 - 1, P.w0 - 1, A.vec_z, S.zs, tid);
  for (int t = tid; t < kCellTile * kCellTile; t += kCellThreads) {
    const int gy = P.h0 + t / kCellTile, gx = P.w0 + t % kCellTile;
    int key = kCellNone;
    if (gy < A.H && gx < A.W) {
      const int e = A.expert_index[P.token0 + static_cast<int64_t>(gy) * A.W + gx];
      key = e < 0 || e >= A.n ? kCellBad
                              : int(A.taps[A.T.down_y + e * A.H + gy].n == 2) << 8 | e << 4 |
                                    row_class(gy, A.H) << 2 | row_class(gx, A.W);
    }
    S.key[t] = key << 6 | t;
  }
  copy_in4<kCellThreads>(bias, S.b, A.n * R, tid);
}

// Phase 2: token v goes to place (the number of smaller sort keys: they are distinct).
CONVLORA_HD void cells_list(const CellSmem<float>& S, int tid) {
  constexpr int N = kCellTile * kCellTile;
  if (tid >= N) return;
  const int mine = S.key[tid];
  int place = 0;
  CONVLORA_UNROLL_4
  for (int u = 0; u < N; u += 4) {
    const V4<int> k = S.key.load4(u);
    CONVLORA_UNROLL
    for (int q = 0; q < 4; ++q) place += k.v[q] < mine ? 1 : 0;
  }
  S.order[place] = tid;
}

// The least key with work above `done` among a warp's rows (lane (g, t): rows g, g + 8),
// in every lane: each lane proposes its own, the warp takes the least (redux.sync);
// kCellNone when none is left.
CONVLORA_HD int next_group_key(const int (&key)[kLanes][2], int done) {
  int cand[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    cand[l] = kCellNone;
    CONVLORA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int k = key[l][h];
      if (k <= kCellLast && k > done && k < cand[l]) cand[l] = k;
    }
  }
  return warp_min(cand);
}

// The composed weights of a key (its phase pairs' blocks, cell_block_words' order) in a call's
// buffer (the backward's: the same blocks transposed), read through the read-only path.
template <int R>
CONVLORA_HD SArr<float> key_cells(const float* cells, const CellTables& CT, int key) {
  constexpr int BLK = cell_block<R>();
  const int e = cell_expert(key), cy = (key >> 2) & 3, cx = key & 3;
  const int nj = CT.ph[e] * CT.ph[e];
  return CONVLORA_GLOBAL_VIEW(
      float, cells + static_cast<int64_t>(CT.off[e] + (cy * CT.ns_x + cx) * nj) * BLK,
      nj * BLK, "composed weights (global)");
}

// f(cur, j, mb) for each key with work among a warp's rows, smallest first, and each of its
// phase pairs j (mb: the key's composed weights); warp-uniform.
template <int R, typename F>
CONVLORA_HD void for_each_key_pair(const int (&key)[kLanes][2], const float* cells,
                                   const CellTables& CT, F&& f) {
  for (int cur = next_group_key(key, -1); cur <= kCellLast; cur = next_group_key(key, cur)) {
    const int nj = CT.ph[cell_expert(cur)] * CT.ph[cell_expert(cur)];
    const SArr<float> mb = key_cells<R>(cells, CT, cur);
    CONVLORA_UNROLL
    for (int j = 0; j < 4; ++j) {
      if (j >= nj) break;
      f(cur, j, mb);
    }
  }
}

// The lanes' B fragments of k-steps 2m and 2m + 1 of a composed-weight block from `at` =
// its offset plus 128 m (cell_block_words' order: lane l's four words at at + 4 l), one
// 128-bit load a lane (warp phase: lanes lane0 .. + kLanes of warp `warp`).
CONVLORA_HD void load_b_pair(const SArr<float>& mb, int at, int warp, int lane0,
                             float (&b0)[kLanes][2], float (&b1)[kLanes][2]) {
  for (int l = 0; l < kLanes; ++l) {
    as_thread(32 * warp + lane0 + l);
    const V4<float> v = mb.ldg4(at + 4 * (lane0 + l));
    b0[l][0] = v.v[0];
    b0[l][1] = v.v[1];
    b1[l][0] = v.v[2];
    b1[l][1] = v.v[3];
  }
}

// The lanes' B fragment of k-step 8 of the composed-weight block at `at` (lane l's two
// words at at + 512 + 2 l), one 64-bit load a lane.
CONVLORA_HD void load_b_last(const SArr<float>& mb, int at, int warp, int lane0,
                             float (&b)[kLanes][2]) {
  for (int l = 0; l < kLanes; ++l) {
    as_thread(32 * warp + lane0 + l);
    mb.ldg2(at + 512 + 2 * (lane0 + l), b[l]);
  }
}

// Stores v[0 .. min(n, 2)) at p (nothing for n <= 0: channels past r): one 2-element store
// where both go and p is aligned to it.
template <typename T>
CONVLORA_HD void store_pair(T* p, const float (&v)[2], int n) {
  if (n <= 0) return;
  if (n >= 2 && reinterpret_cast<uintptr_t>(p) % (2 * sizeof(T)) == 0) {
    struct alignas(2 * sizeof(T)) Pair {
      T v[2];
    };
    const Pair pair{{static_cast<T>(v[0]), static_cast<T>(v[1])}};
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<Pair*>(p) = pair;
#else
    memcpy(p, &pair, sizeof(pair));
#endif
    return;
  }
  p[0] = static_cast<T>(v[0]);
  if (n >= 2) p[1] = static_cast<T>(v[1]);
}

// Phase 3 (a warp phase: lanes lane0 .. + kLanes of warp `warp`, tile_mma.h; warps 0 to 3):
// the warp's 16 sorted tokens (rows g, g + 8 of lane (g, t)) and their products with the
// composed weights of each key among them (C without the bias), into S.c: lane (g, t)
// writes channels 2t, 2t + 1 of its rows' phase pairs.
template <int R, typename scalar_t>
CONVLORA_HD void cells_mma(const TileArgs<scalar_t, float>& A, const float* cells,
                           const CellTables& CT, const CellSmem<float>& S, int warp,
                           int lane0) {
  constexpr int ZC = cell_stride<R>(), BLK = cell_block<R>(), CR = cell_c_row<R>();
  constexpr int NJ = 4;  // phase pairs: at most 2 x 2 (bilinear)
  if (warp >= kCellMmaWarps) return;  // the same in every lane
  int tok[kLanes][2], key[kLanes][2];
  float c[kLanes][NJ][4];     // C without the bias, per phase pair
  float a[9][kLanes][4];      // A: the lanes' fragments of each k-step (cell)
  for (int l = 0; l < kLanes; ++l) {
    const int lane = lane0 + l;
    as_thread(32 * warp + lane);
    const int g = lane >> 2, t = lane & 3;
    CONVLORA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int sk = S.key[S.order[16 * warp + g + 8 * h]];
      tok[l][h] = sk & 63;
      key[l][h] = sk >> 6;
      const int ty = tok[l][h] / kCellTile, tx = tok[l][h] % kCellTile;
      CONVLORA_UNROLL
      for (int ks = 0; ks < 9; ++ks) {
        // cell (ks / 3, ks % 3) of the token's 3 x 3: staged cell (ty + ks / 3, tx + ks % 3)
        const int w0 = ((ty + ks / 3) * kCellZ + tx + ks % 3) * ZC;
        float lo = S.zs[w0 + t], hi = S.zs[w0 + t + 4];
        if constexpr (std::is_same_v<scalar_t, float>) {  // 16-bit values are tf32 already
          lo = tf32_round(lo);
          hi = tf32_round(hi);
        }
        a[ks][l][h] = lo;       // a0 / a1: col t (input channel t) of row g / g + 8
        a[ks][l][2 + h] = hi;   // a2 / a3: col t + 4
      }
    }
    CONVLORA_UNROLL
    for (int j = 0; j < NJ; ++j)
      CONVLORA_UNROLL
      for (int q = 0; q < 4; ++q) c[l][j][q] = 0.f;
  }
  for_each_key_pair<R>(key, cells, CT, [&](int cur, int j, const SArr<float>& mb) {
      float d[kLanes][4], d1[kLanes][4];
      for (int l = 0; l < kLanes; ++l)
        CONVLORA_UNROLL
        for (int q = 0; q < 4; ++q) d[l][q] = d1[l][q] = 0.f;
      CONVLORA_UNROLL
      for (int m = 0; m < 4; ++m) {  // k-steps 2m (into d) and 2m + 1 (into d1)
        float b0[kLanes][2], b1[kLanes][2];
        load_b_pair(mb, j * BLK + 128 * m, warp, lane0, b0, b1);
        mma_tf32(a[2 * m], b0, d);
        mma_tf32(a[2 * m + 1], b1, d1);
      }
      float b8[kLanes][2];
      load_b_last(mb, j * BLK, warp, lane0, b8);
      mma_tf32(a[8], b8, d);
      for (int l = 0; l < kLanes; ++l)
        CONVLORA_UNROLL
        for (int q = 0; q < 4; ++q)
          c[l][j][q] += key[l][q >> 1] == cur ? d[l][q] + d1[l][q] : 0.f;
  });
  // the lanes' C: sorted place 16 warp + g + 8 h, its phase pairs, channels 2t, 2t + 1
  for (int l = 0; l < kLanes; ++l) {
    const int lane = lane0 + l;
    as_thread(32 * warp + lane);
    const int g = lane >> 2, t = lane & 3;
    CONVLORA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int k = key[l][h];
      if (k > kCellLast) continue;  // no work
      const int nj = k >> 8 ? 4 : 1, row = (16 * warp + g + 8 * h) * CR + 2 * t;
      CONVLORA_UNROLL
      for (int j = 0; j < NJ; ++j) {
        if (j >= nj) break;
        const float v[2] = {c[l][j][2 * h], c[l][j][2 * h + 1]};
        S.c.store2(row + j * R, v);
      }
    }
  }
}

// Phase 4: thread per (sorted token, pair of output channels 2t, 2t + 1): C = the mma
// phase's products + bias, GELU'(C) saved for the backward, and u = z + the sum over the
// phases of w_down GELU(C) written. A warp holds 8 sorted tokens: one-phase tokens come
// first, so most warps take one phase or four, not both.
template <int R, typename scalar_t>
CONVLORA_HD void cells_out(const TileArgs<scalar_t, float>& A, const BlockPos& P,
                           const CellSmem<float>& S, int tid) {
  constexpr int ZC = cell_stride<R>(), CR = cell_c_row<R>(), NJ = 4;
  static_assert(kCellThreads == kCellTile * kCellTile * R / 2, "a thread per channel pair");
  const int place = tid / (R / 2), t = tid % (R / 2);
  const int sk = S.key[S.order[place]];
  const int k = sk >> 6;
  if (k == kCellNone) return;
  const int ty = (sk & 63) / kCellTile, tx = (sk & 63) % kCellTile;
  const int gy = P.h0 + ty, gx = P.w0 + tx;
  const int64_t tk = P.token0 + static_cast<int64_t>(gy) * A.W + gx;
  float* pre = A.pre == nullptr ? nullptr : A.pre + tk * 4 * A.r;
  const int zc = ((ty + 1) * kCellZ + tx + 1) * ZC;
  // bilinear down-sampling: one tap (weight 1) at odd scales, two (0.5 each) at even
  const int nj = k == kCellBad ? 0 : k >> 8 ? 4 : 1;
  const float wd = nj == 4 ? 0.25f : 1.f;
  float bias[2] = {0.f, 0.f};
  if (nj > 0) S.b.load2(cell_expert(k) * R + 2 * t, bias);
  float y[2] = {0.f, 0.f};
  CONVLORA_UNROLL
  for (int j = 0; j < NJ; ++j) {
    if (j >= nj) break;
    float cv[2];
    S.c.load2(place * CR + j * R + 2 * t, cv);
    cv[0] += bias[0];
    cv[1] += bias[1];
    float saved[2];  // GELU'(C) (or C) for the slot; computed saved or not: one path
    CONVLORA_UNROLL
    for (int q = 0; q < 2; ++q) {
      float slope;
      y[q] += wd * gelu_and_grad<scalar_t>(cv[q], slope);
      saved[q] = A.raw_pre ? cv[q] : slope;
    }
    if (pre != nullptr) store_pair(pre + j * A.r + 2 * t, saved, A.r - 2 * t);
  }
  if (pre != nullptr) {  // the slots of phases the token does not have: zero
    const float zero[2] = {0.f, 0.f};
    for (int j = nj; j < NJ; ++j) store_pair(pre + j * A.r + 2 * t, zero, A.r - 2 * t);
  }
  float u[2];
  S.zs.load2(zc + 2 * t, u);
  CONVLORA_UNROLL
  for (int q = 0; q < 2; ++q) u[q] = k == kCellBad ? nan_value<float>() : u[q] + y[q];
  store_pair(A.out + tk * A.r + 2 * t, u, A.r - 2 * t);
}

// Runs one block of the composed-weight forward (Exec: as run_block's).
// cells, CT: the composed weights (cell_block_words) and where they are.
template <int R, typename Exec, typename scalar_t>
CONVLORA_HD void run_cells_block(Exec& ex, const TileArgs<scalar_t, float>& A, const Layout& L,
                                 const float* cells, const CellTables& CT, unsigned char* smem,
                                 int64_t block) {
  static_assert(cells_rank<R>(), "the composed-weight forward's ranks");
  const BlockPos P = block_pos<kCellTile, kCellTile>(A, block);
  const CellSmem<float> S(smem, L, A.n, R);
  ex.poison(smem, L.bytes);
  const float* bias = cells + cell_words<R>(CT, A.n);
  ex.phase("load", [&](int tid) { cells_load<R>(A, P, S, bias, tid); });
  ex.phase("list", [&](int tid) { cells_list(S, tid); });
  ex.warps("mma", [&](int warp, int lane0) { cells_mma<R>(A, cells, CT, S, warp, lane0); });
  ex.phase("out", [&](int tid) { cells_out<R>(A, P, S, tid); });
}


// --- The backward as composed weights ---------------------------------------------------
//
// With delta_j = w_down g GELU'(C_j) (g: du of the token; j its phase pairs), the same
// composition gives both gradients:
//   dz(cell) += M_j(cell)^T delta_j                     (every token of the tile and ring)
//   dM_j(cell) = sum over a key's tile tokens of delta_j z(cell)^T, and
//   dW[ky, kx] += sum_j sum_cells wy[ky][cy] wx[kx][cx] dM_j(cell)   (the fold, per key)
//   db += sum_j delta_j
// The block: the same 8 x 8 tile, eight warps; the tile's tokens and its one-token ring
// (100, whose dz terms reach the tile) sorted by (ring, key): the tile's first, so an
// expert's tile tokens are one run of sorted places and its keys runs within it.
//   load   z of the tile and ring (zero outside the map), the tokens' sort keys
//   list   the sort; each token's place
//   delta  thread per (sorted token, pair of channels): delta_j of its phases (tf32)
//   mma    warps 0-6, 16 sorted tokens each: per key, per phase pair, per cell, an MMA of
//          delta_j by the transposed composed weights: dz terms of the token's 9 cells to
//          shared memory. Then warp w takes experts w, w + 8: per key of its tile tokens,
//          per row of cells, dM by MMAs (rows: phase pair and output channel; k: 8 tokens;
//          columns: input channels, a cell each), folded at once into the lane's weight
//          gradients (lane (g, t): output channel g, input channels 2t, 2t + 1, every
//          tap); the bias from the deltas (a butterfly over the lanes of a channel); both
//          written to the block's partial.
//   out    thread per (tile token, pair of channels): dz = g + its 9 terms, in cell order.
// The partials go through reduce_dw as the multiply-add backward's do.

constexpr int kCellRegion = kCellZ * kCellZ;  // the tile and its ring
constexpr int kCellSlots = 16 * 7;             // sorted places: seven warps of 16
static_assert(kCellRegion <= kCellSlots && kCellRegion % 4 == 0, "the region in 7 warps");
// Sort keys of the backward: ((ring << 10 | key) << 7) | region index.
CONVLORA_HD int cellb_key(int sk) { return (sk >> 7) & 0x3FF; }
CONVLORA_HD int cellb_token(int sk) { return sk & 127; }
CONVLORA_HD bool cellb_ring(int sk) { return (sk >> 17) != 0; }
constexpr int kCellDummy = ((1 << 10 | kCellNone) << 7) | 127;  // places past the region

// A sorted token's deltas: per output channel its four phase pairs (one 128-bit load: the
// MMAs' A takes two or four of them a channel), then 8 words of padding (40 a token: the
// quarter warp of a 128-bit load in the weight gradients' k-steps, 4 consecutive places x 2
// channels, reads 8 distinct bank quads).
template <int R>
CONVLORA_HD constexpr int cell_delta_row() { return 4 * R + 8; }
template <int R>
CONVLORA_HD constexpr int cell_delta(int place, int co) { return place * cell_delta_row<R>() + 4 * co; }
// A sorted token's dz terms: its 9 cells of R channels, then 4 words of padding.
template <int R>
CONVLORA_HD constexpr int cell_term_row() { return 9 * R + 4; }

// Layout's fields: zs, key (the region's sort keys by region index), nt (the same grouped:
// the tile's 64 in tile order, then the ring's 36), items (the sorted keys), start (each
// region token's place), cbuf (delta), ubuf (dz terms).
template <int R>
CONVLORA_HD Layout make_cells_bwd_layout(int n) {
  (void)n;
  constexpr int ints = kCellSlots * 4 + 64;  // bytes of an int per place, rounded up
  Layout L{};
  L.zs = 0;
  L.key = align16(kCellRegion * cell_stride<R>() * 4);
  L.nt = L.key + align16(ints);
  L.items = L.nt + align16(ints);
  L.start = L.items + align16(ints);
  L.cbuf = L.start + align16(ints);
  L.ubuf = L.cbuf + align16(kCellSlots * cell_delta_row<R>() * 4);
  L.bytes = L.ubuf + align16(kCellSlots * cell_term_row<R>() * 4);
  L.mma = true;
  return L;
}

struct CellBwdSmem {
  SArr<float> zs, delta, term;
  SArr<int> key, group, sorted, place;
  CONVLORA_HD CellBwdSmem(unsigned char* base, const Layout& L, int R)
      : zs(CONVLORA_SARR(float, base, L.zs, kCellRegion * (R + 4), "z")),
        delta(CONVLORA_SARR(float, base, L.cbuf, kCellSlots * (4 * R + 8), "delta")),
        term(CONVLORA_SARR(float, base, L.ubuf, kCellSlots * (9 * R + 4), "dz terms")),
        key(CONVLORA_SARR(int, base, L.key, kCellRegion, "token key")),
        group(CONVLORA_SARR(int, base, L.nt, kCellRegion, "token key (grouped)")),
        sorted(CONVLORA_SARR(int, base, L.items, kCellSlots, "sorted keys")),
        place(CONVLORA_SARR(int, base, L.start, kCellRegion, "token place")) {}
};

// v[0 .. min(n, 2)) from p as floats, the rest zero: two predicated loads (no branch on
// the alignment: one path of code).
template <typename T>
CONVLORA_HD void load_pair(const T* p, float (&v)[2], int n) {
  CONVLORA_UNROLL
  for (int q = 0; q < 2; ++q) v[q] = q < n ? static_cast<float>(p[q]) : 0.f;
}

// Phase 1: z of the tile and ring (zero outside the map), the region's sort keys.
template <int R, typename scalar_t>
CONVLORA_HD void cellb_load(const TileArgs<scalar_t, float>& A, const BlockPos& P,
                            const CellBwdSmem& S, int tid) {
  stage_region<R, kCellZ, kCellZ, cell_stride<R>(), kCellThreads, true>(
      A.z + P.token0 * A.r, A.H, A.W, A.r, P.h0 - 1, P.w0 - 1, A.vec_z, S.zs, tid);
  for (int t = tid; t < kCellRegion; t += kCellThreads) {
    const int ry = t / kCellZ, rx = t % kCellZ;
    const int gy = P.h0 - 1 + ry, gx = P.w0 - 1 + rx;
    const int ring = ry == 0 || ry == kCellZ - 1 || rx == 0 || rx == kCellZ - 1;
    int key = kCellNone;
    if (gy >= 0 && gy < A.H && gx >= 0 && gx < A.W) {
      const int e = A.expert_index[P.token0 + static_cast<int64_t>(gy) * A.W + gx];
      key = e < 0 || e >= A.n ? kCellBad
                              : int(A.taps[A.T.down_y + e * A.H + gy].n == 2) << 8 | e << 4 |
                                    row_class(gy, A.H) << 2 | row_class(gx, A.W);
    }
    const int sk = (ring << 10 | key) << 7 | t;
    S.key[t] = sk;
    // grouped: tile token (ry - 1, rx - 1) at its tile index; the ring's after, in order
    const int ring_index = ry == 0 ? rx
                           : ry == kCellZ - 1 ? kCellZ + rx
                                              : 2 * kCellZ + 2 * (ry - 1) + (rx != 0);
    S.group[ring ? kCellTile * kCellTile + ring_index : (ry - 1) * kCellTile + rx - 1] = sk;
  }
}

// Phase 2: grouped token v goes to place (the number of smaller sort keys): a tile token's
// are the tile's (every ring key is larger), a ring token's the 64 tile tokens and the
// ring's. The places past the region hold kCellDummy; place[t] is -1 for a token with no
// work (outside the map, or an expert out of range).
CONVLORA_HD void cellb_list(const CellBwdSmem& S, int tid) {
  constexpr int TILE = kCellTile * kCellTile;
  static_assert(TILE % 4 == 0 && kCellRegion % 4 == 0, "the groups in 128-bit loads");
  if (tid >= kCellSlots) return;
  if (tid >= kCellRegion) {
    S.sorted[tid] = kCellDummy;
    return;
  }
  const int mine = S.group[tid];
  const int u0 = tid < TILE ? 0 : TILE, u1 = tid < TILE ? TILE : kCellRegion;
  int place = u0;
  CONVLORA_UNROLL_4
  for (int u = u0; u < u1; u += 4) {
    const V4<int> k = S.group.load4(u);
    CONVLORA_UNROLL
    for (int q = 0; q < 4; ++q) place += k.v[q] < mine ? 1 : 0;
  }
  S.sorted[place] = mine;
  S.place[cellb_token(mine)] = cellb_key(mine) <= kCellLast ? place : -1;  // -1: no terms
}

// Phase 3: thread per (sorted place, channels 2t, 2t + 1): delta_j = w_down g GELU'(C_j)
// (the forward's saved slopes), rounded to tf32, for the token's phase pairs; zero for the
// others, for tokens with no work and for channels past r.
template <int R, typename scalar_t>
CONVLORA_HD void cellb_delta(const TileArgs<scalar_t, float>& A, const BlockPos& P,
                             const CellBwdSmem& S, int tid) {
  constexpr int NJ = 4, PAIRS = R / 2;
  for (int u = tid; u < kCellSlots * PAIRS; u += kCellThreads) {
    const int slot = u / PAIRS, t = u % PAIRS;
    const int sk = S.sorted[slot], key = cellb_key(sk);
    float d[NJ][2];
    CONVLORA_UNROLL
    for (int j = 0; j < NJ; ++j) d[j][0] = d[j][1] = 0.f;
    if (key <= kCellLast) {
      const int tr = cellb_token(sk);
      const int gy = P.h0 - 1 + tr / kCellZ, gx = P.w0 - 1 + tr % kCellZ;
      const int64_t tk = P.token0 + static_cast<int64_t>(gy) * A.W + gx;
      const int nj = key >> 8 ? 4 : 1;
      const float wd = nj == 4 ? 0.25f : 1.f;
      float g[2];
      load_pair(A.du + tk * A.r + 2 * t, g, A.r - 2 * t);
      const float* pre = A.pre + tk * 4 * A.r;
      CONVLORA_UNROLL
      for (int j = 0; j < NJ; ++j) {
        if (j >= nj) break;
        float c[2];
        load_pair(pre + j * A.r + 2 * t, c, A.r - 2 * t);
        CONVLORA_UNROLL
        for (int q = 0; q < 2; ++q) d[j][q] = tf32_round(wd * g[q] * c[q]);  // c: GELU'(C)
      }
    }
    CONVLORA_UNROLL
    for (int q = 0; q < 2; ++q)
      S.delta.store4(cell_delta<R>(slot, 2 * t + q), {{d[0][q], d[1][q], d[2][q], d[3][q]}});
  }
}

// Phase 4a (warps 0 to 6): the warp's 16 sorted tokens' dz terms. Per key among them and
// phase pair j, A = delta_j (rows: tokens, k: output channels; the rows of other keys
// zero), per cell D += A M_j(cell)^T; the 9 cells' D to the tokens' term rows.
template <int R, typename scalar_t>
CONVLORA_HD void cellb_terms(const float* cells, const CellTables& CT, const CellBwdSmem& S,
                             int warp, int lane0) {
  constexpr int TR = cell_term_row<R>(), BLK = cell_block<R>();
  constexpr int NJ = 4;
  if (warp * 16 >= kCellSlots) return;  // the same in every lane
  int key[kLanes][2];
  float a[kLanes][NJ][4];   // delta_j: the lane's A fragment per phase pair
  float acc[9][kLanes][4];  // D per cell
  for (int l = 0; l < kLanes; ++l) {
    const int lane = lane0 + l;
    as_thread(32 * warp + lane);
    const int g = lane >> 2, t = lane & 3;
    CONVLORA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int slot = 16 * warp + g + 8 * h;
      key[l][h] = cellb_key(S.sorted[slot]);
      const V4<float> lo = S.delta.load4(cell_delta<R>(slot, t));      // row g (+ 8), k = t
      const V4<float> hi = S.delta.load4(cell_delta<R>(slot, t + 4));  // k = t + 4
      CONVLORA_UNROLL
      for (int j = 0; j < NJ; ++j) {
        a[l][j][h] = lo.v[j];
        a[l][j][2 + h] = hi.v[j];
      }
    }
    CONVLORA_UNROLL
    for (int c = 0; c < 9; ++c)
      CONVLORA_UNROLL
      for (int q = 0; q < 4; ++q) acc[c][l][q] = 0.f;
  }
  // (mb: the key's transposed composed weights)
  for_each_key_pair<R>(key, cells, CT, [&](int cur, int j, const SArr<float>& mb) {
      float am[kLanes][4];
      for (int l = 0; l < kLanes; ++l)
        CONVLORA_UNROLL
        for (int q = 0; q < 4; ++q) am[l][q] = key[l][q & 1] == cur ? a[l][j][q] : 0.f;
      CONVLORA_UNROLL
      for (int m = 0; m < 4; ++m) {  // cells 2m and 2m + 1
        float b0[kLanes][2], b1[kLanes][2];
        load_b_pair(mb, j * BLK + 128 * m, warp, lane0, b0, b1);
        mma_tf32(am, b0, acc[2 * m]);
        mma_tf32(am, b1, acc[2 * m + 1]);
      }
      float b8[kLanes][2];
      load_b_last(mb, j * BLK, warp, lane0, b8);
      mma_tf32(am, b8, acc[8]);
  });
  for (int l = 0; l < kLanes; ++l) {
    const int lane = lane0 + l;
    as_thread(32 * warp + lane);
    const int g = lane >> 2, t = lane & 3;
    CONVLORA_UNROLL
    for (int h = 0; h < 2; ++h) {
      if (key[l][h] > kCellLast) continue;  // no work: no terms
      const int row = (16 * warp + g + 8 * h) * TR + 2 * t;
      CONVLORA_UNROLL
      for (int c = 0; c < 9; ++c) {
        const float v[2] = {acc[c][l][2 * h], acc[c][l][2 * h + 1]};
        S.term.store2(row + c * R, v);
      }
    }
  }
}

// Phase 4b (every warp): the weight gradients of experts warp, warp + 8, ... over the
// tile's tokens, into the block's partial (grad_index order, every entry written).
template <int R, typename scalar_t>
CONVLORA_HD void cellb_dw(const TileArgs<scalar_t, float>& A, const float* cells,
                          const CellTables& CT, const CellBwdSmem& S, float* partial, int warp,
                          int lane0) {
  constexpr int ZC = cell_stride<R>(), GS = grad_stride<R>();
  constexpr int TILE = kCellTile * kCellTile;
  const float* fold = cells + cell_words<R>(CT, A.n);
  const SArr<float> fw = CONVLORA_GLOBAL_VIEW(float, fold, A.n * kFoldWords,
                                              "fold tables (global)");
  for (int e = warp; e < A.n; e += kCellThreads / 32) {
    int k2[kLanes][2];
    int lo[kLanes], hi[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const int lane = lane0 + l;
      as_thread(32 * warp + lane);
      lo[l] = TILE;
      hi[l] = TILE;
      CONVLORA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int s = lane + 32 * h, sk = S.sorted[s], k = cellb_key(sk);
        const bool mine = !cellb_ring(sk) && k <= kCellLast && cell_expert(k) == e;
        k2[l][h] = mine ? k : kCellNone;
        if (mine && s < lo[l]) lo[l] = s;
        if (mine && TILE - 1 - s < hi[l]) hi[l] = TILE - 1 - s;
      }
    }
    const int s0 = warp_min(lo), s1 = TILE - warp_min(hi);  // the expert's places [s0, s1)
    float dw[kLanes][9][2], db[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      db[l] = 0.f;
      CONVLORA_UNROLL
      for (int k = 0; k < 9; ++k) dw[l][k][0] = dw[l][k][1] = 0.f;
    }
    for (int p = s0; p < s1;) {  // a key's run of places [p, end)
      int cur;
      {
        as_thread(32 * warp + lane0);  // one broadcast load of the warp
        cur = cellb_key(S.sorted[p]);
      }
      int nxt[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        nxt[l] = s1;
        CONVLORA_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int s = lane0 + l + 32 * h;
          if (s > p && s < nxt[l] && k2[l][h] != cur) nxt[l] = s;
        }
      }
      const int end = warp_min(nxt);
      const int cy = (cur >> 2) & 3, cx = cur & 3, ph = CT.ph[e], nj = ph * ph;
      // the key's row fold weights per row phase a (wy_a[ky][ny] at ny + 3 ky: one address
      // a row of cells, the taps at fixed offsets from it)
      const SArr<float> wy_of[2] = {
          CONVLORA_GLOBAL_VIEW(float, fold + cell_fold(e, 0, cy, 0), 9, "fold tables (global)"),
          CONVLORA_GLOBAL_VIEW(float, fold + cell_fold(e, 0, cy, ph - 1), 9,
                               "fold tables (global)")};
      float wx[kLanes][2][9];  // the key's column fold weights, for every row of cells
      for (int l = 0; l < kLanes; ++l) {
        as_thread(32 * warp + lane0 + l);
        CONVLORA_UNROLL
        for (int b = 0; b < 2; ++b)
          CONVLORA_UNROLL
          for (int k = 0; k < 9; ++k)
            wx[l][b][k] = b < ph ? fw.ldg(cell_fold(e, 1, cx, b) + k) : 0.f;
      }
      CONVLORA_NO_UNROLL
      for (int ny = 0; ny < 3; ++ny) {
        float dm[kLanes][2][3][4];
        for (int l = 0; l < kLanes; ++l)
          CONVLORA_UNROLL
          for (int mt = 0; mt < 2; ++mt)
            CONVLORA_UNROLL
            for (int q = 0; q < 4; ++q)
              CONVLORA_UNROLL
              for (int nx = 0; nx < 3; ++nx) dm[l][mt][nx][q] = 0.f;
        int c0 = p;  // 8 tokens a k-step; a key has one at least (end > p)
        do {
          float am[kLanes][2][4], b[kLanes][3][2];
          for (int l = 0; l < kLanes; ++l) {
            const int lane = lane0 + l;
            as_thread(32 * warp + lane);
            const int g = lane >> 2, t = lane & 3;
            CONVLORA_UNROLL
            for (int h = 0; h < 2; ++h) {  // tokens c0 + t (h 0) and c0 + t + 4 (h 1)
              const int s = c0 + t + 4 * h;
              const bool in = s < end;
              // rows g: phase pair 2 mt, g + 8: 2 mt + 1 (output channel g; zero past nj)
              V4<float> dv{{0.f, 0.f, 0.f, 0.f}};
              if (in) dv = S.delta.load4(cell_delta<R>(s, g));
              CONVLORA_UNROLL
              for (int mt = 0; mt < 2; ++mt) {
                am[l][mt][2 * h] = dv.v[2 * mt];
                am[l][mt][2 * h + 1] = dv.v[2 * mt + 1];
              }
              // the bias: output channel g's deltas of every phase pair (zero past nj), once
              if (ny == 0) db[l] += (dv.v[0] + dv.v[1]) + (dv.v[2] + dv.v[3]);
              // the token's cell (ny, 0): its region index tr less a row and a column
              int base = 0;
              if (in) base = (cellb_token(S.sorted[s]) + (ny - 1) * kCellZ - 1) * ZC + g;
              CONVLORA_UNROLL
              for (int nx = 0; nx < 3; ++nx) b[l][nx][h] = in ? S.zs[base + nx * ZC] : 0.f;
            }
            if constexpr (std::is_same_v<scalar_t, float>) {  // 16-bit z is tf32 already
              CONVLORA_UNROLL
              for (int nx = 0; nx < 3; ++nx)
                CONVLORA_UNROLL
                for (int h = 0; h < 2; ++h) b[l][nx][h] = tf32_round(b[l][nx][h]);
            }
          }
          CONVLORA_UNROLL
          for (int mt = 0; mt < 2; ++mt) {
            if (2 * mt >= nj) break;  // the same in every lane
            float a0[kLanes][4];
            for (int l = 0; l < kLanes; ++l)
              CONVLORA_UNROLL
              for (int q = 0; q < 4; ++q) a0[l][q] = am[l][mt][q];
            CONVLORA_UNROLL
            for (int nx = 0; nx < 3; ++nx) {
              float bb[kLanes][2], d[kLanes][4];
              for (int l = 0; l < kLanes; ++l) {
                bb[l][0] = b[l][nx][0];
                bb[l][1] = b[l][nx][1];
                CONVLORA_UNROLL
                for (int q = 0; q < 4; ++q) d[l][q] = dm[l][mt][nx][q];
              }
              mma_tf32(a0, bb, d);
              for (int l = 0; l < kLanes; ++l)
                CONVLORA_UNROLL
                for (int q = 0; q < 4; ++q) dm[l][mt][nx][q] = d[l][q];
            }
          }
          c0 += 8;
        } while (c0 < end);
        // the fold, phase pair j = (row phase a, column phase b) = 2 a + b (m-tile a, row
        // half b; with one phase j = 0): per row phase a,
        //   sx[kx] = sum_b sum_nx wx_b[kx][nx] dM_j(ny, nx),  dW[ky][kx] += wy_a[ky][ny] sx[kx]
        for (int l = 0; l < kLanes; ++l) {
          as_thread(32 * warp + lane0 + l);
          CONVLORA_UNROLL
          for (int a = 0; a < 2; ++a) {
            if (a >= ph) break;
            float sx[3][2];
            CONVLORA_UNROLL
            for (int kx = 0; kx < 3; ++kx) sx[kx][0] = sx[kx][1] = 0.f;
            CONVLORA_UNROLL
            for (int b = 0; b < 2; ++b) {
              if (b >= ph) break;
              CONVLORA_UNROLL
              for (int kx = 0; kx < 3; ++kx)
                CONVLORA_UNROLL
                for (int nx = 0; nx < 3; ++nx) {
                  const float w = wx[l][b][3 * kx + nx];
                  sx[kx][0] += w * dm[l][a][nx][2 * b];
                  sx[kx][1] += w * dm[l][a][nx][2 * b + 1];
                }
            }
            CONVLORA_UNROLL
            for (int ky = 0; ky < 3; ++ky) {
              const float wy = wy_of[a].ldg(ny + 3 * ky);
              CONVLORA_UNROLL
              for (int kx = 0; kx < 3; ++kx) {
                dw[l][3 * ky + kx][0] += wy * sx[kx][0];
                dw[l][3 * ky + kx][1] += wy * sx[kx][1];
              }
            }
          }
        }
      }
      p = end;
    }
    // the bias: lane (g, t) summed output channel g of the tokens its k-steps loaded (each
    // key's places p + t, p + t + 4, ...); the four lanes of g add theirs (a butterfly)
    warp_xor_add(db, 1);
    warp_xor_add(db, 2);
    const SArr<float> out = CONVLORA_GLOBAL_VIEW(float, partial + e * GS, GS,
                                                 "weight-gradient partial (global)");
    for (int l = 0; l < kLanes; ++l) {
      const int lane = lane0 + l, g = lane >> 2, t = lane & 3;
      as_thread(32 * warp + lane);
      const int at = grad_index<R>(g, 0, 2 * t);  // tap k at at + k R
      CONVLORA_UNROLL
      for (int k = 0; k < 9; ++k) out.stcg2(at + k * R, dw[l][k]);
      if (t == 0) out[grad_bias_index<R>(g)] = db[l];
    }
  }
}

// Phase 5: thread per (tile token, channels 2t, 2t + 1): dz = g + the terms of the 9
// tokens whose cells it is, in cell order; NaN for an expert out of range.
template <int R, typename scalar_t>
CONVLORA_HD void cellb_out(const TileArgs<scalar_t, float>& A, const BlockPos& P,
                           const CellBwdSmem& S, int tid) {
  constexpr int TR = cell_term_row<R>(), PAIRS = R / 2;
  static_assert(kCellThreads == kCellTile * kCellTile * PAIRS, "a thread per channel pair");
  const int tt = tid / PAIRS, t = tid % PAIRS;
  const int ty = tt / kCellTile, tx = tt % kCellTile;
  const int key = cellb_key(S.key[(ty + 1) * kCellZ + tx + 1]);
  if (key == kCellNone) return;
  const int64_t tk = P.token0 + static_cast<int64_t>(P.h0 + ty) * A.W + P.w0 + tx;
  float v[2];
  load_pair(A.du + tk * A.r + 2 * t, v, A.r - 2 * t);
  CONVLORA_UNROLL
  for (int c = 0; c < 9; ++c) {
    const int place = S.place[(ty + 2 - c / 3) * kCellZ + tx + 2 - c % 3];
    if (place < 0) continue;  // a token with no work: no terms
    float w[2];
    S.term.load2(place * TR + c * R + 2 * t, w);
    v[0] += w[0];
    v[1] += w[1];
  }
  if (key == kCellBad) v[0] = v[1] = nan_value<float>();
  store_pair(A.out + tk * A.r + 2 * t, v, A.r - 2 * t);
}

// Runs one block of the composed-weight backward (Exec: as run_block's). cells, CT: the
// backward's composed weights (transposed, then the fold tables) and where they are.
template <int R, typename Exec, typename scalar_t>
CONVLORA_HD void run_cells_bwd_block(Exec& ex, const TileArgs<scalar_t, float>& A,
                                     const Layout& L, const float* cells, const CellTables& CT,
                                     unsigned char* smem, int64_t block) {
  static_assert(cells_rank<R>(), "the composed-weight backward's ranks");
  const BlockPos P = block_pos<kCellTile, kCellTile>(A, block);
  const CellBwdSmem S(smem, L, R);
  float* partial = A.dw_partial + block * A.n * grad_stride<R>();
  ex.poison(smem, L.bytes);
  ex.phase("load", [&](int tid) { cellb_load<R>(A, P, S, tid); });
  ex.phase("list", [&](int tid) { cellb_list(S, tid); });
  ex.phase("delta", [&](int tid) { cellb_delta<R>(A, P, S, tid); });
  ex.warps("mma", [&](int warp, int lane0) {
    cellb_terms<R, scalar_t>(cells, CT, S, warp, lane0);
    cellb_dw<R>(A, cells, CT, S, partial, warp, lane0);
  });
  ex.phase("out", [&](int tid) { cellb_out<R>(A, P, S, tid); });
}

// The composed-weight programs by direction: the prep's size (the blocks, then the tail:
// cells_tail_entry), the block.
template <int R, bool BWD>
CONVLORA_HD int64_t cells_words(const CellTables& C, int n) {
  return cell_words<R>(C, n) + cells_tail_words<R, BWD>(n);
}
template <int R, bool BWD, typename Exec, typename scalar_t>
CONVLORA_HD void run_cells(Exec& ex, const TileArgs<scalar_t, float>& A, const Layout& L,
                           const float* cells, const CellTables& CT, unsigned char* smem,
                           int64_t block) {
  if constexpr (BWD)
    run_cells_bwd_block<R>(ex, A, L, cells, CT, smem, block);
  else
    run_cells_block<R>(ex, A, L, cells, CT, smem, block);
}

}  // namespace tile
}  // namespace convlora
