// CPU kernels of the stencil ops: the tiled block programs of stencil_tile.h (per-token
// experts) and stencil_map.h (one expert per map), each block's phases run as loops over its
// thread ids, blocks in parallel with at::parallel_for.
// Built with CONVLORA_CHECKED, every shared-memory index is bounds-checked, cross-thread
// accesses within a phase are reported as races, and buffers are poisoned before they are
// written (see stencil_tile.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "stencil.h"

namespace convlora {

namespace {

// Runs a phase for every thread of the block, one after another: the barrier after a
// phase is the end of the loop.
struct CpuExec {
  int threads;  // the block's
  template <typename F>
  void phase(const char* name, F&& f) {
#if defined(CONVLORA_CHECKED)
    tile::Shadow& s = *tile::g_shadow;
    ++s.phase;
    if (s.trace != nullptr) s.trace->begin(name);
    for (int tid = 0; tid < threads; ++tid) {
      s.tid = tid;
      f(tid);
    }
    if (s.trace != nullptr) s.trace->end();
    s.tid = -1;  // what runs between phases is a phase of its own
    ++s.phase;
#else
    (void)name;
    for (int tid = 0; tid < threads; ++tid) f(tid);
#endif
  }
  // A warp phase: f(warp, 0) runs the warp's 32 lanes (tile_mma.h), which name themselves
  // to the checked build's counts (as_thread).
  template <typename F>
  void warps(const char* name, F&& f) {
    phase(name, [&](int tid) {
      if (tid % 32 == 0) f(tid / 32, 0);
    });
  }
  void poison(void* p, int bytes) {
#if defined(CONVLORA_CHECKED)
    std::memset(p, 0xFF, bytes);  // NaN floats, -1 ints
#else
    (void)p;
    (void)bytes;
#endif
  }
};

// The composed weights of a call into fwd (the forward's, with its biases) and bwd (the
// backward's, with its fold tables; fp32, tile::cells_words<8, BWD> floats each; either
// null: not written): per composed matrix its factors, their products, then its words of
// both, as the GPU's prep blocks (64 threads of them here, each all nine cells); then the
// tails.
void cells_cpu(const at::Tensor& cw, const at::Tensor& cb, int r, const tile::Tables& T,
               float* fwd, float* bwd) {
  constexpr int BLK = tile::cell_block<8>();
  const tile::CellTables C = tile::make_cell_tables(T);
  const auto cwf = cw.to(at::kFloat).contiguous(), cbf = cb.to(at::kFloat).contiguous();
  const float* wp = cwf.const_data_ptr<float>();
  const float* bp = cbf.const_data_ptr<float>();
  at::parallel_for(0, C.off[T.n], 4, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const tile::CellBlock B = tile::cell_block_of(C, T.n, static_cast<int>(blk));
      float f[18];
      tile::CellProducts<float> F[9];
      for (int q = 0; q < 6; ++q) tile::cell_factor_row<float>(T, B, q / 3, q % 3, f);
      for (int i = 0; i < 81; ++i) tile::cell_product<float>(f, i, F[0].v);
      for (int t = 0; t < 64; ++t) {
        float w[9];
        tile::cell_pair_weights<8>(wp, r, B.e, t, w);
        tile::cell_block_words<8, float>(w, F[0].v, t, 64,
                                         fwd == nullptr ? nullptr : fwd + blk * BLK,
                                         bwd == nullptr ? nullptr : bwd + blk * BLK);
      }
    }
  });
  const int64_t blocks = tile::cell_words<8>(C, T.n);
  if (fwd != nullptr)
    for (int j = 0; j < tile::cells_tail_words<8, false>(T.n); ++j)
      tile::cells_tail_entry<8, float, float, false>(bp, r, T, C, j, fwd + blocks);
  if (bwd != nullptr)
    for (int j = 0; j < tile::cells_tail_words<8, true>(T.n); ++j)
      tile::cells_tail_entry<8, float, float, true>(bp, r, T, C, j, bwd + blocks);
}

// The prep pass on the host: tap tables and padded weights (and the composed weights, where
// its layout has them) written into the prep buffer `prep` (new_prep).
template <int R, typename acc_t>
void prep_cpu(const at::Tensor& cw, const at::Tensor& cb, int r, const tile::Tables& T,
              const at::Tensor& prep, const at::Tensor& z) {
  const int n = T.n;
  const PrepViews V = prep_views<R, acc_t>(prep, T, z);
  const at::Tensor& wbuf = V.wbuf;
  const PrepLayout& L = V.layout;
  auto* tp = reinterpret_cast<Taps<acc_t>*>(V.taps.mutable_data_ptr());
  for (int i = 0; i < T.entries; ++i) tile::table_entry<acc_t>(T, i, tp);
  // the alignment gaps: zero, so a buffer is its inputs'
  auto* bytes = static_cast<unsigned char*>(prep.mutable_data_ptr());
  std::memset(bytes + L.taps_bytes, 0, L.wbuf_offset - L.taps_bytes);
  const int64_t wend = L.wbuf_offset + wbuf.numel() * static_cast<int64_t>(sizeof(acc_t));
  std::memset(bytes + wend, 0, L.cells_offset - wend);
  const auto cwa = cw.to(wbuf.scalar_type()).contiguous();
  const auto cba = cb.to(wbuf.scalar_type()).contiguous();
  acc_t* wp = wbuf.mutable_data_ptr<acc_t>();
  for (int64_t i = 0; i < wbuf.numel(); ++i)
    tile::weight_entry<R, acc_t>(cwa.const_data_ptr<acc_t>(), cba.const_data_ptr<acc_t>(), r, n,
                                 static_cast<int>(i), wp);
  if (V.cells.defined()) {
    float* cells = V.cells.mutable_data_ptr<float>();
    cells_cpu(cw, cb, r, T, cells, cells + L.cells_fwd);
  }
}

// The prep buffer of a call: o.prep when the caller gave stencil_prep's output, else one the
// prep pass fills here (cells: with the composed weights).
template <int R, typename acc_t>
at::Tensor call_prep(const Operands& o, const tile::Tables& T, bool cells) {
  if (o.prep.defined()) return o.prep;
  at::Tensor prep = new_prep<R, acc_t>(T, o.z, cells);
  prep_cpu<R, acc_t>(o.conv_weight, o.conv_bias, static_cast<int>(o.z.size(1)), T, prep, o.z);
  return prep;
}

// Runs f(ex, smem, block) for every block of one call, blocks in parallel, each worker
// with its own shared memory (16-byte aligned) and, in the checked build, its race shadow
// and, when the cost model asks (smem_trace), its count of shared accesses.
template <typename F>
void for_each_block(int64_t blocks, int threads, int bytes, F&& f) {
#if defined(CONVLORA_CHECKED)
  const bool trace = tile::trace_request().on;
  if (trace) tile::trace_request().begin_call(blocks, bytes);
#endif
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> storage((bytes + sizeof(double) - 1) / sizeof(double) + 2);
    auto* smem = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<uintptr_t>(storage.data()) + 15) & ~static_cast<uintptr_t>(15));
    CpuExec ex{threads};
#if defined(CONVLORA_CHECKED)
    tile::Shadow shadow;
    shadow.attach(smem, bytes);
    tile::Trace counts(threads);
    if (trace) shadow.trace = &counts;
    tile::g_shadow = &shadow;
#endif
    for (int64_t blk = b0; blk < b1; ++blk) f(ex, smem, blk);
#if defined(CONVLORA_CHECKED)
    tile::g_shadow = nullptr;
    if (trace) tile::trace_request().add(counts);
#endif
  });
}

// Runs every block of one call (per-token programs).
template <int R, int INTERP, bool BWD, typename scalar_t, typename acc_t>
void run_blocks(const tile::TileArgs<scalar_t, acc_t>& A, const TileGrid& grid) {
  for_each_block(grid.blocks, tile::Geometry<R, INTERP, BWD>::kThreads, grid.layout.bytes,
                 [&](CpuExec& ex, unsigned char* smem, int64_t blk) {
    tile::run_block<R, INTERP, BWD>(ex, A, grid.layout, smem, blk);
  });
}

// The weight-gradient reduce of a backward: dw (n, r·r·9 + r) from the blocks' partials.
template <int R, typename acc_t>
void reduce_dw(const at::Tensor& partial, int64_t blocks, int r, int n, at::Tensor& dw) {
  const acc_t* pp = partial.const_data_ptr<acc_t>();
  acc_t* dwp = dw.mutable_data_ptr<acc_t>();
  at::parallel_for(0, dw.numel(), 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      tile::reduce_entry<R>(pp, blocks, r, n, static_cast<int>(i), dwp);
  });
}

// The composed-weight programs (stencil_cells.h) at their rank bound RC for a call of any
// rank up to RC: their blocks, reading the composed weights of the call's prep buffer
// (prep_cells: the forward's, then the backward's), or where it has none (a caller's prep
// made without mma) ones written here; for the backward the blocks' partials (RC's
// stride), reduced into dw. A: the call's arguments (any rank bound's).
template <int RC, bool BWD, typename scalar_t>
void run_cells_call(tile::TileArgs<scalar_t, float> A, const Operands& o, const TileGrid& grid,
                    const at::Tensor& prep_cells, at::Tensor* dw) {
  const auto f32 = o.z.options().dtype(at::kFloat);
  const at::Tensor partial = cells_args<RC, BWD>(A, o, grid.blocks);
  const tile::CellTables C = tile::make_cell_tables(A.T);
  at::Tensor cells = prep_cells;
  if (cells.defined()) {
    if (BWD) cells = cells.narrow(0, tile::cells_words<RC, false>(C, A.n),
                                  tile::cells_words<RC, true>(C, A.n));
  } else {
    cells = at::empty({tile::cells_words<RC, BWD>(C, A.n)}, f32);
    float* out = cells.mutable_data_ptr<float>();
    cells_cpu(o.conv_weight, o.conv_bias, A.r, A.T, BWD ? nullptr : out, BWD ? out : nullptr);
  }
  const float* cp = cells.const_data_ptr<float>();
  for_each_block(grid.blocks, tile::kCellThreads, grid.layout.bytes,
                 [&](CpuExec& ex, unsigned char* smem, int64_t blk) {
    tile::run_cells<RC, BWD>(ex, A, grid.layout, cp, C, smem, blk);
  });
  if (BWD) reduce_dw<RC, float>(partial, grid.blocks, A.r, A.n, *dw);
}

// Runs every block of one call (map programs).
template <int R, int INTERP, bool BWD, typename scalar_t, typename acc_t>
void run_map_blocks(const tile::TileArgs<scalar_t, acc_t>& A, const MapGrid& grid) {
  for_each_block(grid.blocks, tile::kThreads, grid.layout.bytes,
                 [&](CpuExec& ex, unsigned char* smem, int64_t blk) {
    tile::run_map_block<R, INTERP, BWD>(ex, A, grid.layout, smem, blk);
  });
}

// The checked build instantiates float, double and bfloat16 only (it is built by a test;
// the cost model counts the bfloat16 programs, what the GPU runs).
#if defined(CONVLORA_CHECKED)
#define CONVLORA_DISPATCH_CPU(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t, name, __VA_ARGS__)
#else
#define CONVLORA_DISPATCH_CPU(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, name, __VA_ARGS__)
#endif

}  // namespace

at::Tensor stencil_prep_cpu(const at::Tensor& z, const at::Tensor& conv_weight,
                            const at::Tensor& conv_bias, at::IntArrayRef scales,
                            int64_t interpolation, int64_t height, int64_t width, bool mma) {
  check_weight_args(z, conv_weight, conv_bias, scales, interpolation, height, width);
  const int64_t r = z.size(1);
  const auto T = tables_for(height, width, interpolation, scales);
  at::Tensor prep;
  CONVLORA_DISPATCH_CPU(z.scalar_type(), "stencil_prep_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_rank(r, [&]<int R>() {
      prep = new_prep<R, acc_t>(T, z, prep_has_cells<R, acc_t>(T, mma));
      prep_cpu<R, acc_t>(conv_weight.contiguous(), conv_bias.contiguous(), static_cast<int>(r),
                         T, prep, z);
    });
  });
  return prep;
}

std::tuple<at::Tensor, at::Tensor> stencil_fwd_cpu(
    const at::Tensor& z, const at::Tensor& expert_index, const at::Tensor& conv_weight,
    const at::Tensor& conv_bias, at::IntArrayRef scales, int64_t interpolation, int64_t height,
    int64_t width, bool save_preact, int64_t smem_kb, const std::optional<at::Tensor>& prep,
    bool mma, bool raw_preact) {
  auto o = checked_operands(z, expert_index, conv_weight, conv_bias, scales, interpolation,
                            height, width, smem_kb, nullptr, nullptr, prep);
  o.raw_preact = raw_preact;
  const auto& zc = o.z;
  auto u = at::empty_like(zc);
  auto pre = new_preact(zc, interpolation, save_preact);
  const int64_t N = zc.size(0), r = zc.size(1);
  if (N == 0) return {u, pre};
  const bool per_map = map_programs(o, height, width);
  const int64_t maps = N / (height * width);
  const auto T = tables_for(height, width, interpolation, scales);
  CONVLORA_DISPATCH_CPU(zc.scalar_type(), "stencil_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_rank(r, [&]<int R>() {
      dispatch_interpolation(interpolation, [&]<int INTERP>() {
        const at::Tensor pbuf =
            call_prep<R, acc_t>(o, T, !per_map && prep_has_cells<R, acc_t>(T, mma));
        const PrepViews views = prep_views<R, acc_t>(pbuf, T, zc);
        const at::Tensor &taps = views.taps, &wbuf = views.wbuf;
        acc_t* pre_p = save_preact ? pre.mutable_data_ptr<acc_t>() : nullptr;
        if constexpr (R <= tile::kMapMaxRank) {
          if (per_map) {
            const auto grid = make_map_grid<R, INTERP, false, acc_t>(maps, T.H, T.W);
            auto A = make_tile_args<R, scalar_t, acc_t>(o, T, grid, taps, wbuf, u, nullptr,
                                                        pre_p);
            run_map_blocks<R, INTERP, false>(A, grid);
            return;
          }
        }
        const auto grid = make_tile_grid<R, INTERP, false, acc_t>(maps, T.H, T.W,
                                                                static_cast<int>(r), T.n,
                                                                o.smem_budget, mma);
        auto A = make_tile_args<R, scalar_t, acc_t>(o, T, grid, taps, wbuf, u, nullptr, pre_p);
        constexpr int RC = tile::cells_bound<R, INTERP>();
        if constexpr (RC != 0 && std::is_same_v<acc_t, float>) {
          if (grid.layout.mma) {
            run_cells_call<RC, false>(A, o, grid, views.cells, nullptr);
            return;
          }
        }
        run_blocks<R, INTERP, false>(A, grid);
      });
    });
  });
  return {u, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stencil_bwd_cpu(
    const at::Tensor& du, const at::Tensor& z, const at::Tensor& preact,
    const at::Tensor& expert_index, const at::Tensor& conv_weight, const at::Tensor& conv_bias,
    at::IntArrayRef scales, int64_t interpolation, int64_t height, int64_t width,
    int64_t smem_kb, const std::optional<at::Tensor>& prep, bool mma) {
  auto o = checked_operands(z, expert_index, conv_weight, conv_bias, scales, interpolation,
                            height, width, smem_kb, &du, &preact, prep);
  const auto& zc = o.z;
  const int64_t N = zc.size(0), r = zc.size(1), n = o.conv_weight.size(0);
  auto dz = at::empty_like(zc);
  const auto acc_opts = zc.options().dtype(acc_dtype_for(zc.scalar_type()));
  auto dw = at::empty({n, dw_entries(r)}, acc_opts);
  if (N == 0) {
    dw.zero_();
    auto [w, b] = split_dw(dw, n, r);
    return {dz, w, b};
  }
  const bool per_map = map_programs(o, height, width);
  const int64_t maps = N / (height * width);
  const auto T = tables_for(height, width, interpolation, scales);
  CONVLORA_DISPATCH_CPU(zc.scalar_type(), "stencil_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_rank(r, [&]<int R>() {
      dispatch_interpolation(interpolation, [&]<int INTERP>() {
        const at::Tensor pbuf =
            call_prep<R, acc_t>(o, T, !per_map && prep_has_cells<R, acc_t>(T, mma));
        const PrepViews views = prep_views<R, acc_t>(pbuf, T, zc);
        const at::Tensor &taps = views.taps, &wbuf = views.wbuf;
        acc_t* pre_p = const_cast<acc_t*>(o.preact.const_data_ptr<acc_t>());
        if constexpr (R <= tile::kMapMaxRank) {
          if (per_map) {
            const auto grid = make_map_grid<R, INTERP, true, acc_t>(maps, T.H, T.W);
            at::Tensor partial = at::empty({grid.blocks, n * tile::grad_stride<R>()}, acc_opts);
            at::Tensor region = at::empty({grid.blocks, map_region_size<R, INTERP>()}, acc_opts);
            auto A = make_tile_args<R, scalar_t, acc_t>(
                o, T, grid, taps, wbuf, dz, partial.mutable_data_ptr<acc_t>(), pre_p);
            A.region = region.mutable_data_ptr<acc_t>();
            run_map_blocks<R, INTERP, true>(A, grid);
            at::parallel_for(0, N * r, 4096, [&](int64_t i0, int64_t i1) {
              for (int64_t i = i0; i < i1; ++i) tile::fold_entry<R, INTERP>(A, i);
            });
            reduce_dw<R, acc_t>(partial, grid.blocks, A.r, A.n, dw);
            return;
          }
        }
        const auto grid = make_tile_grid<R, INTERP, true, acc_t>(maps, T.H, T.W,
                                                               static_cast<int>(r), T.n,
                                                               o.smem_budget, mma);
        constexpr int RC = tile::cells_bound<R, INTERP>();
        if constexpr (RC != 0 && std::is_same_v<acc_t, float>) {
          if (grid.layout.mma) {
            auto A = make_tile_args<R, scalar_t, acc_t>(o, T, grid, taps, wbuf, dz, nullptr,
                                                        pre_p);
            run_cells_call<RC, true>(A, o, grid, views.cells, &dw);
            return;
          }
        }
        at::Tensor partial = at::empty({grid.blocks, n * tile::grad_stride<R>()}, acc_opts);
        auto A = make_tile_args<R, scalar_t, acc_t>(o, T, grid, taps, wbuf, dz,
                                                    partial.mutable_data_ptr<acc_t>(), pre_p);
        run_blocks<R, INTERP, true>(A, grid);
        reduce_dw<R, acc_t>(partial, grid.blocks, A.r, A.n, dw);
      });
    });
  });
  auto [w, b] = split_dw(dw, n, r);
  return {dz, w, b};
}

CONVLORA_LIBRARY_IMPL(CONVLORA_NS, CPU, m) {
  m.impl("stencil_prep", &stencil_prep_cpu);
  m.impl("stencil_fwd", &stencil_fwd_cpu);
  m.impl("stencil_bwd", &stencil_bwd_cpu);
}

#if defined(CONVLORA_CHECKED)
// The checked build's shared-memory counts, for benchmarks/cost_model.py (smem_trace.h):
// smem_trace(true) clears them and counts the block programs of the stencil calls that
// follow; smem_traffic() reports them (smem_sites() by site); smem_wavefronts(words) is one warp access's count.
void smem_trace(bool on) { tile::trace_request().start(on); }
std::string smem_traffic() { return tile::trace_report(); }
std::string smem_sites() { return tile::trace_sites(); }
int64_t smem_wavefronts(std::vector<int64_t> words) { return tile::wavefronts_of(words); }

TORCH_LIBRARY_FRAGMENT(CONVLORA_NS, m) {
  m.def("smem_trace(bool on) -> ()", &smem_trace);
  m.def("smem_traffic() -> str", &smem_traffic);
  m.def("smem_sites() -> str", &smem_sites);
  m.def("smem_wavefronts(int[] words) -> int", &smem_wavefronts);
}
#endif

}  // namespace convlora
