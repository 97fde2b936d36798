// The per-token forward at r in (4, 8], bilinear, as tensor-core products of the z cells
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
// of 9 R x R: a prep launch writes them all (cell_entry, in tf32, in the MMA's fragment
// order), from the tap tables; 415 KB at SAM's global shape with 8 experts.
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
//   out   thread per (token, pair of channels): C + bias saved as the pre-activations (the
//         backward's slots), u = z + the sum of w_down GELU(C) over the phases written.
// No U, no item list, no per-item rounds: per 16 tokens about 40 shared loads for A and
// the keys, 5 global loads and 9 MMAs per phase pair of each key, and the GELUs.
#pragma once

#include "stencil_tile.h"
#include "tile_mma.h"

namespace convlora {
namespace tile {

template <int R>
CONVLORA_HD constexpr bool cells_rank() { return R == 8; }
// The programs that run it: the forward at those ranks, bilinear.
template <int R, int INTERP, bool BWD>
CONVLORA_HD constexpr bool cells_program() {
  return !BWD && INTERP == kBilinear && cells_rank<R>();
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

// Floats of a call's composed weights (n experts).
template <int R>
CONVLORA_HD int64_t cell_words(const CellTables& C, int n) {
  return static_cast<int64_t>(C.off[n]) * cell_block<R>();
}

// Prep entry i of the composed weights: block (expert e; row class cy, column class cx, row
// phase a, column phase b) = C.off[e] + ((cy·ns_x + cx)·ph + a)·ph + b, then its 576 words:
// k-steps 0..7 in pairs, lane l's four words at 128 m + 4 l (b0, b1 of k-step 2 m, then of
// 2 m + 1), k-step 8 at 512 + 2 l; lane l = 4 g + t holds B[k][n] for k = t, t + 4 and
// n = g, which are input channels t and t + 4 and output channel g of cell k-step (the
// cell (k-step / 3, k-step % 3) of the token's 3 x 3). Summed over (ky, kx) in order in
// acc_t, then rounded to tf32. taps: the call's tables (table_entry), already written.
template <int R, typename acc_t, typename w_t>
CONVLORA_HD void cell_entry(const w_t* conv_w, int r, const Tables& T, const CellTables& C,
                            const Taps<acc_t>* taps, int64_t i, acc_t* out) {
  static_assert(cells_rank<R>(), "a k-step of 8 input channels is one cell");
  constexpr int BLK = cell_block<R>();
  const int blk = static_cast<int>(i / BLK), w = static_cast<int>(i - int64_t(blk) * BLK);
  int e = 0;
  while (e + 1 < T.n && blk >= C.off[e + 1]) ++e;
  const int ph = C.ph[e];
  int rest = blk - C.off[e];
  const int b = rest % ph;
  rest /= ph;
  const int a = rest % ph;
  rest /= ph;
  const int cx = rest % C.ns_x, cy = rest / C.ns_x;
  int ks, which, lane;
  if (w < 512) {
    lane = (w % 128) / 4;
    ks = 2 * (w / 128) + ((w % 4) >> 1);
    which = w & 1;
  } else {
    lane = (w - 512) / 2;
    ks = 8;
    which = w & 1;
  }
  const int ci = (lane & 3) + 4 * which, co = lane >> 2;
  acc_t v = acc_t(0);
  if (ci < r && co < r) {
    const int s = T.scale[e];
    const int iy = class_row(cy, T.H), ix = class_row(cx, T.W);
    const int p = taps[T.down_y + e * T.H + iy].idx[a];
    const int q = taps[T.down_x + e * T.W + ix].idx[b];
    const int ny = ks / 3, nx = ks % 3;  // the cell, in the token's 3 x 3
    acc_t wy[3], wx[3];
    CONVLORA_UNROLL
    for (int k = 0; k < 3; ++k) {
      acc_t nb[3];
      neighbour_weights<kBilinear>(taps + T.up_y[e], p + k - 1, s * T.H, iy, nb);
      wy[k] = nb[ny];
      neighbour_weights<kBilinear>(taps + T.up_x[e], q + k - 1, s * T.W, ix, nb);
      wx[k] = nb[nx];
    }
    const w_t* wp = conv_w + (static_cast<int64_t>(e) * r + co) * r * 9 + ci * 9;
    CONVLORA_UNROLL
    for (int ky = 0; ky < 3; ++ky)
      CONVLORA_UNROLL
      for (int kx = 0; kx < 3; ++kx)
        v += wy[ky] * wx[kx] * static_cast<acc_t>(wp[ky * 3 + kx]);
  }
  out[i] = tf32_round(v);
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
template <int R, typename scalar_t, typename acc_t>
CONVLORA_HD void cells_load(const TileArgs<scalar_t, acc_t>& A, const BlockPos& P,
                            const CellSmem<acc_t>& S, int tid) {
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
  copy_in4<kCellThreads>(A.wbuf + A.n * weight_stride<R>(), S.b, A.n * R, tid);
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

// Four (or two) consecutive floats of the composed weights from index i (16- or 8-byte
// aligned): through the read-only path on the GPU; the checked CPU build counts them.
CONVLORA_HD void load_cells4(const SArr<float>& m, int i, float (&v)[4]) {
#if defined(__CUDA_ARCH__)
  const float4 f = __ldg(reinterpret_cast<const float4*>(m.p + i));
  v[0] = f.x;
  v[1] = f.y;
  v[2] = f.z;
  v[3] = f.w;
#else
  const V4<float> f = m.load4(i);
  for (int q = 0; q < 4; ++q) v[q] = f.v[q];
#endif
}
CONVLORA_HD void load_cells2(const SArr<float>& m, int i, float (&v)[2]) {
#if defined(__CUDA_ARCH__)
  const float2 f = __ldg(reinterpret_cast<const float2*>(m.p + i));
  v[0] = f.x;
  v[1] = f.y;
#else
  m.load2(i, v);
#endif
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
  float a[kLanes][9][4];      // A: the lane's fragment of each k-step (cell)
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
        a[l][ks][h] = lo;       // a0 / a1: col t (input channel t) of row g / g + 8
        a[l][ks][2 + h] = hi;   // a2 / a3: col t + 4
      }
    }
    CONVLORA_UNROLL
    for (int j = 0; j < NJ; ++j)
      CONVLORA_UNROLL
      for (int q = 0; q < 4; ++q) c[l][j][q] = 0.f;
  }
  // the keys of the group, smallest first: every lane proposes its smallest key above the
  // last one done, the warp takes the least
  int done = -1;
  for (;;) {
    int cand[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      cand[l] = kCellNone;
      CONVLORA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int k = key[l][h];
        if (k <= kCellLast && k > done && k < cand[l]) cand[l] = k;
      }
    }
    const int cur = warp_min(cand);
    if (cur > kCellLast) break;
    done = cur;
    const int e = cell_expert(cur), cy = (cur >> 2) & 3, cx = cur & 3;
    const int nj = CT.ph[e] * CT.ph[e];
    const SArr<float> mb = CONVLORA_GLOBAL_VIEW(  // this key's composed weights
        float, cells + static_cast<int64_t>(CT.off[e] + (cy * CT.ns_x + cx) * nj) * BLK,
        nj * BLK, "composed weights (global)");
    CONVLORA_UNROLL
    for (int j = 0; j < NJ; ++j) {
      if (j >= nj) break;  // the same in every lane
      float d[kLanes][4], d1[kLanes][4];
      for (int l = 0; l < kLanes; ++l)
        CONVLORA_UNROLL
        for (int q = 0; q < 4; ++q) d[l][q] = d1[l][q] = 0.f;
      CONVLORA_UNROLL
      for (int m = 0; m < 4; ++m) {  // k-steps 2m (into d) and 2m + 1 (into d1)
        float a0[kLanes][4], a1[kLanes][4], b0[kLanes][2], b1[kLanes][2];
        for (int l = 0; l < kLanes; ++l) {
          float v[4];
          as_thread(32 * warp + lane0 + l);
          load_cells4(mb, j * BLK + 128 * m + 4 * (lane0 + l), v);
          b0[l][0] = v[0];
          b0[l][1] = v[1];
          b1[l][0] = v[2];
          b1[l][1] = v[3];
          CONVLORA_UNROLL
          for (int q = 0; q < 4; ++q) {
            a0[l][q] = a[l][2 * m][q];
            a1[l][q] = a[l][2 * m + 1][q];
          }
        }
        mma_tf32(a0, b0, d);
        mma_tf32(a1, b1, d1);
      }
      {
        float a8[kLanes][4], b8[kLanes][2];
        for (int l = 0; l < kLanes; ++l) {
          as_thread(32 * warp + lane0 + l);
          load_cells2(mb, j * BLK + 512 + 2 * (lane0 + l), b8[l]);
          CONVLORA_UNROLL
          for (int q = 0; q < 4; ++q) a8[l][q] = a[l][8][q];
        }
        mma_tf32(a8, b8, d);
      }
      for (int l = 0; l < kLanes; ++l)
        CONVLORA_UNROLL
        for (int q = 0; q < 4; ++q)
          c[l][j][q] += key[l][q >> 1] == cur ? d[l][q] + d1[l][q] : 0.f;
    }
  }
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
// phase's products + bias, saved as the pre-activations, and u = z + the sum over the
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
    if (pre != nullptr) store_pair(pre + j * A.r + 2 * t, cv, A.r - 2 * t);
    CONVLORA_UNROLL
    for (int q = 0; q < 2; ++q) y[q] += wd * gelu_erf(cv[q]);
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
// cells, CT: the composed weights (cell_entry) and where they are.
template <int R, typename Exec, typename scalar_t>
CONVLORA_HD void run_cells_block(Exec& ex, const TileArgs<scalar_t, float>& A, const Layout& L,
                                 const float* cells, const CellTables& CT, unsigned char* smem,
                                 int64_t block) {
  static_assert(cells_rank<R>(), "the composed-weight forward's ranks");
  const BlockPos P = block_pos<kCellTile, kCellTile>(A, block);
  const CellSmem<float> S(smem, L, A.n, R);
  ex.poison(smem, L.bytes);
  ex.phase("load", [&](int tid) { cells_load<R>(A, P, S, tid); });
  ex.phase("list", [&](int tid) { cells_list(S, tid); });
  ex.warps("mma", [&](int warp, int lane0) { cells_mma<R>(A, cells, CT, S, warp, lane0); });
  ex.phase("out", [&](int tid) { cells_out<R>(A, P, S, tid); });
}

}  // namespace tile
}  // namespace convlora
