// The stencil ops of the convlora library: u = z + E_e(z) per token and its backward.
//
//   stencil_prep(z, conv_weight, conv_bias, scales, interpolation, height, width, mma=False)
//               -> prep
//   stencil_fwd(z, expert_index, conv_weight, conv_bias, scales, interpolation, height, width,
//               save_preact, smem_kb=0, prep=None, mma=False, raw_preact=False) -> (u, preact)
//   stencil_bwd(du, z, preact, expert_index, conv_weight, conv_bias, scales, interpolation,
//               height, width, smem_kb=0, prep=None, mma=False)
//               -> (dz, dconv_weight, dconv_bias)
//
// prep: the per-call tables and padded weights (PrepLayout) as a uint8 tensor, a function
// of the weights, the rank, z's dtype and the geometry alone (with mma, and where the
// composed-weight programs run, their weights too). Without it each op runs its own prep
// pass (a launch on CUDA); a forward and its backward given stencil_prep's output share one
// pass. z is read by stencil_prep for its rank, dtype and device only.
//
// z, u, du, dz: (N, r) with N = B·H·W tokens in (b, h, w) order; expert_index: (N,) int32,
// or (B,) int32 for one expert per map (the map programs of stencil_map.h run then);
// conv_weight (n, r, r, 3, 3), conv_bias (n, r); preact: what the backward needs of each
// token's conv pre-activations C, their GELU slopes GELU'(C) (the backward reads nothing
// else of C), (N, 4, r) bilinear or (N, 16, r) bicubic, in float32 (float64 for float64
// inputs), zero in the slots a token does not use, saved by the forward when save_preact
// (else empty); with raw_preact the forward saves C itself instead (what the tests probe:
// C is linear in z, its slope is not), which the backward must not be given; dconv_* in
// that dtype too, every expert present; smem_kb: a tile block's shared-memory budget
// (smem_budget); mma: the per-token forward (or backward) as tensor-core products of each
// token's 3 x 3 z cells by composed weights (stencil_cells.h: the weights, z and the
// backward's deltas rounded to tf32, fp32 sums) where it runs: r <= 8, bilinear, fp32
// accumulation, a CUDA device of compute capability 8.0 or later; elsewhere the
// multiply-add programs run (make_tile_grid). The backward reads the same slopes either
// way. The projections around the stencil are GEMMs done by the caller.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "convlora_math.h"
#include "stencil_cells.h"
#include "stencil_map.h"
#include "stencil_tile.h"

// The op library's namespace: torch.ops.convlora, or another name for a second build
// of the CPU kernels in the same process (the checked build, tests/test_stencil_kernels.py).
#ifndef CONVLORA_NS
#define CONVLORA_NS convlora
#endif
// Expand CONVLORA_NS before torch's macros paste it.
#define CONVLORA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define CONVLORA_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

namespace convlora {

// Floating dtype of the kernels' arithmetic and of the weight gradients: float32, or
// float64 for float64 inputs.
inline at::ScalarType acc_dtype_for(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by the CPU and CUDA kernels; the Python layer has already given
// users named errors, these guard direct calls of torch.ops.convlora.*.
// The checks of the weights and the geometry (stencil_prep's arguments).
inline void check_weight_args(const at::Tensor& z, const at::Tensor& conv_weight,
                              const at::Tensor& conv_bias, at::IntArrayRef scales,
                              int64_t interpolation, int64_t height, int64_t width) {
  TORCH_CHECK(z.dim() == 2, "stencil: z must be (N, r), got ", z.sizes());
  const int64_t r = z.size(1);
  TORCH_CHECK(r >= 1 && r <= kMaxRank, "stencil: rank r must be in [1, ", kMaxRank, "], got ", r);
  TORCH_CHECK(height >= 1 && width >= 1, "stencil: height and width must be >= 1, got ",
              height, ", ", width);
  TORCH_CHECK(conv_weight.dim() == 5, "stencil: conv_weight must be (n, r, r, 3, 3), got ",
              conv_weight.sizes());
  const int64_t n = conv_weight.size(0);
  TORCH_CHECK(n >= 1 && n <= kMaxExperts, "stencil: 1 to ", kMaxExperts, " experts, got ", n);
  TORCH_CHECK(conv_weight.sizes() == at::IntArrayRef({n, r, r, 3, 3}),
              "stencil: conv_weight must be (n, r, r, 3, 3) = (", n, ", ", r, ", ", r,
              ", 3, 3), got ", conv_weight.sizes());
  TORCH_CHECK(conv_bias.sizes() == at::IntArrayRef({n, r}), "stencil: conv_bias must be (", n,
              ", ", r, "), got ", conv_bias.sizes());
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == n, "stencil: one scale per expert (", n,
              "), got ", scales.size());
  for (auto s : scales)
    TORCH_CHECK(s >= 1 && s <= kMaxScale, "stencil: scales must be in [1, ", kMaxScale,
                "], got ", s);
  TORCH_CHECK(interpolation == kBilinear || interpolation == kBicubic,
              "stencil: interpolation must be 0 (bilinear) or 1 (bicubic), got ", interpolation);
  // The kernels read the conv weights in the accumulation dtype: float32 weights with a
  // float16/bfloat16 z (autocast) are as good as weights in z's dtype.
  TORCH_CHECK(conv_bias.scalar_type() == conv_weight.scalar_type() &&
                  (conv_weight.scalar_type() == z.scalar_type() ||
                   conv_weight.scalar_type() == acc_dtype_for(z.scalar_type())),
              "stencil: conv_weight and conv_bias must both have z's dtype ", z.scalar_type(),
              " or ", acc_dtype_for(z.scalar_type()), ", got ", conv_weight.scalar_type(),
              " and ", conv_bias.scalar_type());
  TORCH_CHECK(conv_weight.device() == z.device() && conv_bias.device() == z.device(),
              "stencil: all tensors must be on z's device ", z.device());
}

inline void check_stencil_args(const at::Tensor& z, const at::Tensor& expert_index,
                               const at::Tensor& conv_weight, const at::Tensor& conv_bias,
                               at::IntArrayRef scales, int64_t interpolation, int64_t height,
                               int64_t width) {
  check_weight_args(z, conv_weight, conv_bias, scales, interpolation, height, width);
  TORCH_CHECK(z.size(0) % (height * width) == 0, "stencil: z has ", z.size(0),
              " tokens, not a multiple of height * width = ", height * width);
  const int64_t maps = z.size(0) / (height * width);
  TORCH_CHECK(expert_index.dim() == 1 &&
                  (expert_index.size(0) == z.size(0) || expert_index.size(0) == maps) &&
                  expert_index.scalar_type() == at::kInt && expert_index.device() == z.device(),
              "stencil: expert_index must be int32 of shape (", z.size(0), ") (per token) or (",
              maps, ") (per map) on z's device ", z.device(), ", got ",
              expert_index.scalar_type(), " ", expert_index.sizes(), " on ",
              expert_index.device());
}

// The shared-memory budget of a tile block in bytes for an op's smem_kb argument:
// tile::kSmemBudget for 0, else smem_kb KB. The Python side passes its internal switch
// CONVLORA_STENCIL_SMEM_KB here (for timing the alternatives on a GPU) and checks it first.
inline int smem_budget(int64_t smem_kb) {
  if (smem_kb == 0) return tile::kSmemBudget;
  TORCH_CHECK(smem_kb >= 1 && smem_kb <= 227, "stencil: smem_kb must be 0 (the default budget) "
              "or a number of KB in [1, 227], got ", smem_kb);
  return static_cast<int>(smem_kb) * 1024;
}

// The operands of a stencil op, checked and made contiguous (copied only when they are not).
struct Operands {
  at::Tensor z, expert_index, conv_weight, conv_bias, du, preact;
  int smem_budget;  // bytes (smem_budget)
  at::Tensor prep;  // stencil_prep's output for this call, or undefined: the call runs its own
  bool mma = false;  // the composed-weight forward where it can run (make_tile_grid)
  bool raw_preact = false;  // the forward saves C, not GELU'(C) (tests)
};

// Saved pre-activation slots per token: the most conv outputs one token reads.
inline int64_t preact_slots(int64_t interpolation) { return interpolation == kBicubic ? 16 : 4; }

inline Operands checked_operands(const at::Tensor& z, const at::Tensor& expert_index,
                                 const at::Tensor& conv_weight, const at::Tensor& conv_bias,
                                 at::IntArrayRef scales, int64_t interpolation, int64_t height,
                                 int64_t width, int64_t smem_kb,
                                 const at::Tensor* du = nullptr,
                                 const at::Tensor* preact = nullptr,
                                 const std::optional<at::Tensor>& prep = std::nullopt) {
  check_stencil_args(z, expert_index, conv_weight, conv_bias, scales, interpolation, height,
                     width);
  Operands o{z.contiguous(), expert_index.contiguous(), conv_weight.contiguous(),
             conv_bias.contiguous(), at::Tensor(), at::Tensor(), smem_budget(smem_kb),
             prep.has_value() ? *prep : at::Tensor()};
  if (du) {
    TORCH_CHECK(du->sizes() == z.sizes() && du->scalar_type() == z.scalar_type() &&
                    du->device() == z.device(),
                "stencil_bwd: du must match z (", z.scalar_type(), " ", z.sizes(), " on ",
                z.device(), "), got ", du->scalar_type(), " ", du->sizes(), " on ", du->device());
    o.du = du->contiguous();
  }
  if (preact) {
    const std::vector<int64_t> want{z.size(0), preact_slots(interpolation), z.size(1)};
    const auto acc = acc_dtype_for(z.scalar_type());
    TORCH_CHECK(preact->sizes() == at::IntArrayRef(want) && preact->scalar_type() == acc &&
                    preact->device() == z.device(),
                "stencil_bwd: preact must be the forward's saved GELU slopes, ", acc, " ",
                at::IntArrayRef(want), " on ", z.device(), ", got ", preact->scalar_type(), " ",
                preact->sizes(), " on ", preact->device(),
                " (run stencil_fwd with save_preact=True)");
    o.preact = preact->contiguous();
  }
  return o;
}

// True when the call runs the map programs: expert_index has one entry per map and the rank
// has them (r <= tile::kMapMaxRank). A per-map index at a larger rank is expanded to every
// token of its map here, for the per-token programs.
inline bool map_programs(Operands& o, int64_t height, int64_t width) {
  const int64_t hw = height * width;
  if (o.expert_index.size(0) == o.z.size(0)) return false;
  if (o.z.size(1) <= tile::kMapMaxRank) return true;
  o.expert_index = o.expert_index.repeat_interleave(hw).contiguous();
  return false;
}

// The block programs index blocks in 32 bits (a CUDA grid's x extent is below 2^31).
inline void check_blocks(int64_t blocks) {
  TORCH_CHECK(blocks <= 2147483647, "convlora stencil: ", blocks,
              " blocks of 8 x 8 tokens (or 4 x 4) exceed the 2^31 - 1 a launch can index; "
              "split the batch");
}

// How a call is cut into blocks and what each block keeps in shared memory.
struct TileGrid {
  int64_t blocks;
  int tiles_y, tiles_x;
  tile::Layout layout;
  bool w_smem, dw_smem;
};

// Weights go to shared memory when they fit the budget, then the weight-gradient
// accumulators; what does not fit is read (or accumulated) in global memory. mma: the
// composed-weight programs (stencil_cells.h) where tile::cells_bound in fp32 accumulation
// (layout.mma says whether they run; their blocks' shared memory is fixed: 16 KB forward,
// 59 KB backward, whatever the budget).
template <int R, int INTERP, bool BWD, typename acc_t>
TileGrid make_tile_grid(int64_t maps, int H, int W, int r, int n, int budget, bool mma = false) {
  TileGrid p;
  using G = tile::Geometry<R, INTERP, BWD>;
  p.tiles_y = (H + G::kTileH - 1) / G::kTileH;
  p.tiles_x = (W + G::kTileW - 1) / G::kTileW;
  p.blocks = maps * p.tiles_y * p.tiles_x;
  check_blocks(p.blocks);
  constexpr int RC = tile::cells_bound<R, INTERP>();
  if constexpr (RC != 0 && std::is_same_v<acc_t, float>) {
    if (mma) {
      static_assert(tile::kCellTile == G::kTileH && tile::kCellTile == G::kTileW,
                    "the composed-weight programs' tiles are the multiply-add programs'");
      p.w_smem = false;
      p.dw_smem = false;
      p.layout = BWD ? tile::make_cells_bwd_layout<RC>(n) : tile::make_cells_layout<RC>(n);
      return p;
    }
  }
  const bool choices[3][2] = {{true, true}, {true, false}, {false, false}};
  for (const auto& c : choices) {
    p.w_smem = c[0];
    p.dw_smem = BWD && c[1];
    p.layout = tile::make_layout<R, INTERP, BWD, acc_t>(r, n, p.w_smem, p.dw_smem);
    if (p.layout.bytes <= budget) break;
  }
  return p;
}

// The map programs' cut: kTile x kTile tokens per block, every shared array in shared memory.
struct MapGrid {
  int64_t blocks;
  int tiles_y, tiles_x;
  tile::MapLayout layout;
};

template <int R, int INTERP, bool BWD, typename acc_t>
MapGrid make_map_grid(int64_t maps, int H, int W) {
  using G = tile::MapGeometry<R, INTERP>;
  MapGrid p;
  p.tiles_y = (H + G::kTile - 1) / G::kTile;
  p.tiles_x = (W + G::kTile - 1) / G::kTile;
  p.blocks = maps * p.tiles_y * p.tiles_x;
  check_blocks(p.blocks);
  p.layout = tile::make_map_layout<R, INTERP, BWD, acc_t>();
  return p;
}

// Floats of one map block's dz partial (the tile and its halo, R channels).
template <int R, int INTERP>
constexpr int64_t map_region_size() {
  using G = tile::MapGeometry<R, INTERP>;
  return static_cast<int64_t>(G::kZ) * G::kZ * R;
}

template <int R>
int64_t wbuf_size(int n) {
  return static_cast<int64_t>(n) * (2 * tile::weight_stride<R>() + R);
}

// The prep buffer of a call (bytes): the tap tables (T.entries Taps), then from a 16-byte
// boundary the padded weights (wbuf_size values), both in the accumulation type; with the
// composed weights (prep_has_cells: a call that runs the composed-weight programs), from the
// next 16-byte boundary the forward's (tile::cells_words, with its biases) and then the
// backward's (with its fold tables), fp32, for the programs' rank bound 8 whatever R. The
// prep pass writes it, in one launch; stencil_prep returns it so that a forward and its
// backward share one.
struct PrepLayout {
  int64_t taps_bytes, wbuf_offset, cells_offset, cells_fwd, cells_bwd, bytes;
};

// Whether the prep of a call with the ops' mma argument holds the composed weights: where
// the composed-weight programs run (bilinear, r <= 8, fp32 accumulation; make_tile_grid),
// the device aside (they are written for an older one too, and not read).
template <int R, typename acc_t>
bool prep_has_cells(const tile::Tables& T, bool mma) {
  return mma && std::is_same_v<acc_t, float> && R <= 8 && T.interp == kBilinear;
}

template <int R, typename acc_t>
PrepLayout prep_layout(const tile::Tables& T, bool cells = false) {
  const auto up16 = [](int64_t b) { return (b + 15) / 16 * 16; };
  PrepLayout L{};
  L.taps_bytes = static_cast<int64_t>(T.entries) * static_cast<int64_t>(sizeof(Taps<acc_t>));
  L.wbuf_offset = up16(L.taps_bytes);
  L.bytes = L.wbuf_offset + wbuf_size<R>(T.n) * static_cast<int64_t>(sizeof(acc_t));
  L.cells_offset = L.bytes;
  if (cells) {
    const tile::CellTables C = tile::make_cell_tables(T);
    L.cells_offset = up16(L.bytes);
    L.cells_fwd = tile::cells_words<8, false>(C, T.n);
    L.cells_bwd = tile::cells_words<8, true>(C, T.n);
    L.bytes = L.cells_offset + (L.cells_fwd + L.cells_bwd) * static_cast<int64_t>(sizeof(float));
  }
  return L;
}

// A prep buffer for the prep pass to fill (cells: with the composed weights).
template <int R, typename acc_t>
at::Tensor new_prep(const tile::Tables& T, const at::Tensor& z, bool cells = false) {
  return at::empty({prep_layout<R, acc_t>(T, cells).bytes}, z.options().dtype(at::kByte));
}

// The layout of a prep buffer a caller passed, checked to be one for this rank, these
// experts and this geometry, with or without the composed weights (stencil_prep's output).
template <int R, typename acc_t>
PrepLayout given_prep_layout(const at::Tensor& prep, const tile::Tables& T,
                             const at::Tensor& z) {
  const auto plain = prep_layout<R, acc_t>(T);
  const bool can = prep_has_cells<R, acc_t>(T, true);
  const auto full = can ? prep_layout<R, acc_t>(T, true) : plain;
  TORCH_CHECK(prep.dim() == 1 && prep.scalar_type() == at::kByte &&
                  (prep.numel() == plain.bytes || prep.numel() == full.bytes) &&
                  prep.device() == z.device() && prep.is_contiguous(),
              "stencil: prep must be stencil_prep's output for this call's rank, experts and "
              "geometry (", plain.bytes, can ? " or, with mma, " : "",
              can ? std::to_string(full.bytes) : std::string(), " uint8 on ", z.device(),
              "), got ", prep.scalar_type(), " ", prep.sizes(), " on ", prep.device());
  return prep.numel() == plain.bytes ? plain : full;
}

// Views of a prep buffer (stencil_prep's output when a caller passed it): its tap tables,
// its padded weights (acc_t) and its composed weights (fp32, the forward's then the
// backward's; undefined when it has none), with its layout.
struct PrepViews {
  at::Tensor taps, wbuf, cells;
  PrepLayout layout;
};

template <int R, typename acc_t>
PrepViews prep_views(const at::Tensor& prep, const tile::Tables& T, const at::Tensor& z) {
  const auto L = given_prep_layout<R, acc_t>(prep, T, z);
  const int64_t wbytes = wbuf_size<R>(T.n) * static_cast<int64_t>(sizeof(acc_t));
  PrepViews v{prep.narrow(0, 0, L.taps_bytes),
              prep.narrow(0, L.wbuf_offset, wbytes).view(c10::CppTypeToScalarType<acc_t>::value),
              at::Tensor(), L};
  if (L.cells_fwd + L.cells_bwd > 0)
    v.cells = prep.narrow(0, L.cells_offset, L.bytes - L.cells_offset).view(at::kFloat);
  return v;
}

inline tile::Tables tables_for(int64_t height, int64_t width, int64_t interpolation,
                               at::IntArrayRef scales) {
  int sc[kMaxExperts];
  for (size_t i = 0; i < scales.size(); ++i) sc[i] = static_cast<int>(scales[i]);
  return tile::make_tables(static_cast<int>(height), static_cast<int>(width),
                           static_cast<int>(scales.size()), static_cast<int>(interpolation), sc);
}

// True when z's (and du's) rows can be staged with 16-byte loads.
template <int R, typename scalar_t>
bool rows_vectorizable(int64_t r, const void* z, const void* du) {
  const auto aligned = [](const void* p) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
  };
  return r == R && (R * sizeof(scalar_t)) % 16 == 0 && aligned(z) && aligned(du);
}

// The arguments of a tile kernel: the checked operands (o.du defined for the backward),
// the tables, the grid, the prep buffers and the outputs.
template <int R, typename scalar_t, typename acc_t, typename Grid>
tile::TileArgs<scalar_t, acc_t> make_tile_args(const Operands& o, const tile::Tables& T,
                                               const Grid& grid, const at::Tensor& taps,
                                               const at::Tensor& wbuf, at::Tensor& out,
                                               acc_t* dw_partial, acc_t* pre) {
  tile::TileArgs<scalar_t, acc_t> A{};
  A.z = o.z.const_data_ptr<scalar_t>();
  A.expert_index = o.expert_index.const_data_ptr<int>();
  A.du = o.du.defined() ? o.du.const_data_ptr<scalar_t>() : nullptr;
  A.out = out.mutable_data_ptr<scalar_t>();
  A.wbuf = wbuf.const_data_ptr<acc_t>();
  A.taps = reinterpret_cast<const Taps<acc_t>*>(taps.const_data_ptr());
  A.dw_partial = dw_partial;
  A.pre = pre;
  A.raw_pre = o.raw_preact;
  A.T = T;
  A.maps = o.z.size(0) / (static_cast<int64_t>(T.H) * T.W);
  A.H = T.H;
  A.W = T.W;
  A.r = static_cast<int>(o.z.size(1));
  A.by_r = tile::SmallDiv(A.r);
  A.n = T.n;
  A.tiles_y = grid.tiles_y;
  A.tiles_x = grid.tiles_x;
  if constexpr (std::is_same_v<Grid, TileGrid>) {
    A.w_smem = grid.w_smem;
    A.dw_smem = grid.dw_smem;
  }
  A.vec_z = rows_vectorizable<R, scalar_t>(A.r, A.z, A.du);
  return A;
}


// The composed-weight programs' arguments (rank bound RC) from a call's A (any rank
// bound's): z's rows staged as RC's, and for the backward the blocks' weight-gradient
// partials at RC's stride (returned, A.dw_partial set).
template <int RC, bool BWD, typename scalar_t>
at::Tensor cells_args(tile::TileArgs<scalar_t, float>& A, const Operands& o, int64_t blocks) {
  A.vec_z = rows_vectorizable<RC, scalar_t>(A.r, A.z, A.du);
  at::Tensor partial;
  if (BWD) {
    partial = at::empty({blocks, A.n * tile::grad_stride<RC>()}, o.z.options().dtype(at::kFloat));
    A.dw_partial = partial.mutable_data_ptr<float>();
  }
  return partial;
}

// Entries of one expert's weight-gradient vector: r·r·9 conv weights, then r biases.
inline int64_t dw_entries(int64_t r) { return r * r * 9 + r; }

// Splits the flat (n, r·r·9 + r) gradient into the conv_weight and conv_bias shapes.
inline std::tuple<at::Tensor, at::Tensor> split_dw(const at::Tensor& flat, int64_t n, int64_t r) {
  auto w = flat.narrow(1, 0, r * r * 9).reshape({n, r, r, 3, 3}).contiguous();
  auto b = flat.narrow(1, r * r * 9, r).contiguous();
  return {w, b};
}

// The preact output of stencil_fwd: saved pre-activations, or an empty tensor.
inline at::Tensor new_preact(const at::Tensor& z, int64_t interpolation, bool save) {
  const auto opts = z.options().dtype(acc_dtype_for(z.scalar_type()));
  return save ? at::empty({z.size(0), preact_slots(interpolation), z.size(1)}, opts)
              : at::empty({0}, opts);
}

at::Tensor stencil_prep_cpu(const at::Tensor& z, const at::Tensor& conv_weight,
                            const at::Tensor& conv_bias, at::IntArrayRef scales,
                            int64_t interpolation, int64_t height, int64_t width, bool mma);
std::tuple<at::Tensor, at::Tensor> stencil_fwd_cpu(
    const at::Tensor& z, const at::Tensor& expert_index, const at::Tensor& conv_weight,
    const at::Tensor& conv_bias, at::IntArrayRef scales, int64_t interpolation, int64_t height,
    int64_t width, bool save_preact, int64_t smem_kb, const std::optional<at::Tensor>& prep,
    bool mma, bool raw_preact);
std::tuple<at::Tensor, at::Tensor, at::Tensor> stencil_bwd_cpu(
    const at::Tensor& du, const at::Tensor& z, const at::Tensor& preact,
    const at::Tensor& expert_index,
    const at::Tensor& conv_weight, const at::Tensor& conv_bias, at::IntArrayRef scales,
    int64_t interpolation, int64_t height, int64_t width, int64_t smem_kb,
    const std::optional<at::Tensor>& prep, bool mma);

}  // namespace convlora
