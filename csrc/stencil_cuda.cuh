// CUDA kernels of the stencil ops and their host launchers, instantiated once per dtype
// (stencil_cuda_{f32,f16,bf16}.cu) so the build compiles them in parallel.
//
// Launches per call (docs/design.md, "The tiled stencil"):
//   forward:  prep (tap tables, padded fp32 weights) -> stencil_tile_kernel; with mma at
//             r <= 8, bilinear (stencil_cells.h) prep (the composed weights too, the
//             backward's with them) -> stencil_cells_kernel (the backward likewise, then
//             reduce_dw_kernel)
//   backward: prep -> stencil_tile_kernel (dz and per-block weight-gradient partials)
//             -> reduce_dw_kernel (partials summed over blocks in a fixed order, two
//                levels: runs of partials, then the runs)
//   one expert per map (r <= 8): prep -> stencil_map_kernel, and for the backward
//             -> fold_reduce_kernel (dz from the blocks' halo partials, and the reduce,
//                in one launch)
// The prep is skipped when the caller passes stencil_prep's output (o.prep): a forward and
// its backward then share one. The tile kernel is tile::run_block, the same block program
// the CPU backend runs, with __syncthreads() between its phases. No atomics: the backward is deterministic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

#include "stencil.h"
#include "stencil_cuda_launch.h"

namespace convlora {
namespace cuda_kernels {

constexpr int kPrepThreads = 256;
// The threads of a composed-matrix block of the prep that write its words: warps 1 to 4
// (warp 0 computes the factors meanwhile), two threads a channel pair.
constexpr int kCellWordThread0 = 32;
constexpr int kCellWordThreads = 128;

// Runs a phase on the block's threads, then the barrier.
struct GpuExec {
  template <typename F>
  __device__ __forceinline__ void phase(const char*, F&& f) {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
  template <typename F>
  __device__ __forceinline__ void warps(const char*, F&& f) {
    f(static_cast<int>(threadIdx.x) >> 5, static_cast<int>(threadIdx.x) & 31);
    __syncthreads();
  }
  __device__ __forceinline__ void poison(void*, int) {}
};

// At R <= 8 four blocks of 128 threads (two of 256) per SM: at most 128 registers per
// thread.
template <int R, int INTERP, bool BWD>
constexpr int min_blocks_per_sm() {
  return (R <= 8 ? 4 : 2) * 128 / tile::Geometry<R, INTERP, BWD>::kThreads;
}

template <int R, int INTERP, bool BWD, typename scalar_t>
__global__ void __launch_bounds__(tile::Geometry<R, INTERP, BWD>::kThreads,
                                  min_blocks_per_sm<R, INTERP, BWD>())
    stencil_tile_kernel(const tile::TileArgs<scalar_t, float> A, const tile::Layout L) {
  extern __shared__ __align__(16) unsigned char smem[];
  GpuExec ex;
  tile::run_block<R, INTERP, BWD>(ex, A, L, smem, static_cast<int64_t>(blockIdx.x));
}

// The composed-weight programs (stencil_cells.h): blocks of eight warps, reading the composed
// weights the prep wrote (the backward's reduce after).
template <int R, bool BWD, typename scalar_t>
__global__ void __launch_bounds__(tile::kCellThreads, 2)
    stencil_cells_kernel(const tile::TileArgs<scalar_t, float> A, const tile::Layout L,
                         const float* __restrict__ cells, const tile::CellTables C) {
  extern __shared__ __align__(16) unsigned char smem[];
  GpuExec ex;
  tile::run_cells<R, BWD>(ex, A, L, cells, C, smem, static_cast<int64_t>(blockIdx.x));
}

// One expert per map (stencil_map.h): the map block program, then for the backward the fold.
// Shared memory holds it to about two blocks per SM; saying so keeps ptxas from trading a
// spill for an occupancy the block cannot reach.
template <int R, int INTERP, bool BWD, typename scalar_t>
__global__ void __launch_bounds__(tile::kThreads, 2)
    stencil_map_kernel(const tile::TileArgs<scalar_t, float> A, const tile::MapLayout L) {
  extern __shared__ __align__(16) unsigned char smem[];
  GpuExec ex;
  tile::run_map_block<R, INTERP, BWD>(ex, A, L, smem, static_cast<int64_t>(blockIdx.x));
}

// The per-call prep: blocks [0, scalar_blocks) a thread per table entry, then per padded
// weight, then per word of the composed weights' tails (the forward's biases, the
// backward's fold tables: cells_tail_entry); then a block per composed matrix, which writes
// it into both passes' (nf, nb: the words of each pass, zero without it: not written): six
// threads of warp 0 compute its 18 factors into shared memory while warps 1 to 4 read
// their channel pairs' weights (cell_pair_weights), 81 threads the products, then warps 1
// to 4 the words (cell_block_words: each a channel pair, every other cell, each value into
// the forward's block and, transposed, the backward's). The weights are
// read as stored (w_t: float, or the inputs' 16-bit type) and widened here. The composed
// weights compute the taps they need, so they do not wait for the tables. Thread 0 also
// zeroes the gaps before the weights and before the composed weights (prep_layout; base:
// the buffer, or null for composed weights alone), so a prep buffer is a function of its
// inputs, byte for byte.
template <int R, typename w_t>
__global__ void __launch_bounds__(kPrepThreads)
    prep_kernel(const w_t* __restrict__ conv_w, const w_t* __restrict__ conv_b, int r,
                const tile::Tables T, const tile::CellTables C, unsigned char* __restrict__ base,
                const PrepLayout L, int ntaps, int64_t nw, float* __restrict__ cells,
                int64_t nf, int64_t nb, int scalar_blocks) {
  constexpr int BLK = tile::cell_block<8>();
  static_assert(kCellWordThread0 == 32 && kCellWordThread0 + kCellWordThreads <= kPrepThreads &&
                    kPrepThreads >= 81,
                "a composed matrix's block: the factors in warp 0, the words after it");
  const int nblk = C.off[T.n];
  if (static_cast<int>(blockIdx.x) >= scalar_blocks) {  // a composed matrix: block-uniform
    const int blk = static_cast<int>(blockIdx.x) - scalar_blocks;
    __shared__ float f[18];
    __shared__ tile::CellProducts<float> F[9];
    const tile::CellBlock B = tile::cell_block_of(C, T.n, blk);
    const int wt = static_cast<int>(threadIdx.x) - kCellWordThread0;  // words: [0, 128)
    const bool words = wt >= 0 && wt < kCellWordThreads;
    float w[9];  // its channel pair's weights, read while warp 0 computes the factors
    if (words) tile::cell_pair_weights<8>(conv_w, r, B.e, wt % 64, w);
    if (threadIdx.x < 6) tile::cell_factor_row<float>(T, B, threadIdx.x / 3, threadIdx.x % 3, f);
    __syncthreads();
    if (threadIdx.x < 81) tile::cell_product<float>(f, threadIdx.x, F[0].v);
    __syncthreads();
    if (!words) return;
    const int64_t at = static_cast<int64_t>(blk) * BLK;
    tile::cell_block_words<8, float>(w, F[0].v, wt, kCellWordThreads,
                                     nf == 0 ? nullptr : cells + at,
                                     nb == 0 ? nullptr : cells + nf + at);
    return;
  }
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i == 0 && base != nullptr) {
    const int64_t wend = L.wbuf_offset + nw * static_cast<int64_t>(sizeof(float));
    for (int64_t b = L.taps_bytes; b < L.wbuf_offset; ++b) base[b] = 0;
    for (int64_t b = wend; b < L.cells_offset; ++b) base[b] = 0;
  }
  const int64_t tf = nf == 0 ? 0 : tile::cells_tail_words<8, false>(T.n);
  const int64_t tb = nb == 0 ? 0 : tile::cells_tail_words<8, true>(T.n);
  const int64_t j = i - ntaps - nw;
  if (i < ntaps) {
    tile::table_entry<float>(T, static_cast<int>(i), reinterpret_cast<Taps<float>*>(base));
  } else if (j < 0) {
    tile::weight_entry<R, float, w_t>(conv_w, conv_b, r, T.n, static_cast<int>(i - ntaps),
                                      reinterpret_cast<float*>(base + L.wbuf_offset));
  } else if (j < tf) {
    tile::cells_tail_entry<8, float, w_t, false>(conv_b, r, T, C, static_cast<int>(j),
                                                 cells + static_cast<int64_t>(nblk) * BLK);
  } else if (j - tf < tb) {
    tile::cells_tail_entry<8, float, w_t, true>(conv_b, r, T, C, static_cast<int>(j - tf),
                                                cells + nf + static_cast<int64_t>(nblk) * BLK);
  }
}

// Block `block` of the reduce (every thread of the block calls it: it has a barrier).
template <int R>
__device__ __forceinline__ void reduce_block(const float* __restrict__ partial, int64_t blocks,
                                             int r, int n, int slices, float* __restrict__ dw,
                                             int block) {
  __shared__ float sums[tile::kReduceThreads];
  const int per = tile::kReduceThreads / slices;
  const int local = static_cast<int>(threadIdx.x) % per;
  const int slice = static_cast<int>(threadIdx.x) / per;
  const int i = block * per + local;
  const int total = n * tile::grad_entries(r);
  sums[threadIdx.x] = i < total ? tile::reduce_slice<R>(partial, blocks, r, n, i, slice, slices)
                                : 0.f;
  __syncthreads();
  if (slice == 0 && i < total) {
    float sum = sums[local];
    for (int s = 1; s < slices; ++s) sum += sums[s * per + local];
    dw[i] = sum;
  }
}

template <int R>
__global__ void __launch_bounds__(tile::kReduceThreads)
    reduce_dw_kernel(const float* __restrict__ partial, int64_t blocks, int r, int n,
                     int slices, float* __restrict__ dw) {
  reduce_block<R>(partial, blocks, r, n, slices, dw, static_cast<int>(blockIdx.x));
}

// The map backward's two passes after its blocks in one launch (they read what the blocks
// wrote and nothing of each other): blocks [0, reduce_blocks) the reduce of the weight-
// gradient partials, the rest a thread per fold entry (dz from the halo partials).
template <int R, int INTERP, typename scalar_t>
__global__ void __launch_bounds__(tile::kReduceThreads)
    fold_reduce_kernel(const tile::TileArgs<scalar_t, float> A, int64_t fold_total,
                       int64_t blocks, int slices, int reduce_blocks, float* __restrict__ dw) {
  static_assert(tile::kReduceThreads == kPrepThreads, "one block size for both passes");
  if (static_cast<int>(blockIdx.x) < reduce_blocks) {  // the same in every thread of a block
    reduce_block<R>(A.dw_partial, blocks, A.r, A.n, slices, dw, static_cast<int>(blockIdx.x));
    return;
  }
  const int64_t i = static_cast<int64_t>(blockIdx.x - reduce_blocks) * blockDim.x + threadIdx.x;
  if (i < fold_total) tile::fold_entry<R, INTERP>(A, i);
}

// The reduce's grid: blocks of kReduceThreads / slices outputs each.
inline int reduce_grid(const at::Tensor& dw, int slices) {
  const int per = tile::kReduceThreads / slices;
  return static_cast<int>((dw.numel() + per - 1) / per);
}

template <int R>
void launch_reduce(const at::Tensor& partial, int64_t blocks, int r, int n, at::Tensor& dw,
                   cudaStream_t stream) {
  const int slices = tile::reduce_slices(blocks);
  reduce_dw_kernel<R><<<static_cast<unsigned>(reduce_grid(dw, slices)), tile::kReduceThreads,
                        0, stream>>>(
      partial.const_data_ptr<float>(), blocks, r, n, slices, dw.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline unsigned grid_for(int64_t work, int threads) {
  return static_cast<unsigned>((work + threads - 1) / threads);
}

// Lets `kernel` take `bytes` of dynamic shared memory on the current device: one
// cudaFuncSetAttribute per (kernel, device) and larger size, not one per launch.
inline void allow_shared_bytes(const void* kernel, int bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> allowed;  // (kernel, device) -> bytes
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  int& have = allowed[{kernel, device}];
  if (have >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      bytes));
  have = bytes;
}

template <typename Kernel, typename Layout, typename scalar_t>
void launch_blocks(Kernel kernel, const tile::TileArgs<scalar_t, float>& A, const Layout& L,
                   int64_t blocks, int threads, cudaStream_t stream) {
  allow_shared_bytes(reinterpret_cast<const void*>(kernel), L.bytes);
  kernel<<<static_cast<unsigned>(blocks), threads, L.bytes, stream>>>(A, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches prep_kernel over ntaps tables, nw padded weights and nf + nb composed weights
// (a block per composed matrix), reading the weights in their dtype (float, or z's:
// check_stencil_args allows no other).
template <int R, typename scalar_t>
void run_prep_kernel(const Operands& o, const tile::Tables& T, unsigned char* base,
                     const PrepLayout& L, int ntaps, int64_t nw, float* cells, int64_t nf,
                     int64_t nb, cudaStream_t stream) {
  const tile::CellTables C = tile::make_cell_tables(T);
  const int64_t tails = (nf == 0 ? 0 : tile::cells_tail_words<8, false>(T.n)) +
                        (nb == 0 ? 0 : tile::cells_tail_words<8, true>(T.n));
  const unsigned scalar_blocks = grid_for(ntaps + nw + tails, kPrepThreads);
  const unsigned matrices = nf + nb == 0 ? 0u : static_cast<unsigned>(C.off[T.n]);
  const auto run = [&](auto* tag) {
    using w_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    prep_kernel<R, w_t><<<scalar_blocks + matrices, kPrepThreads, 0, stream>>>(
        o.conv_weight.const_data_ptr<w_t>(), o.conv_bias.const_data_ptr<w_t>(),
        static_cast<int>(o.z.size(1)), T, C, base, L, ntaps, nw, cells, nf, nb,
        static_cast<int>(scalar_blocks));
  };
  if (o.conv_weight.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    run(static_cast<scalar_t*>(nullptr));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The prep pass of a call into the prep buffer `prep` (new_prep): one launch, the composed
// weights too where its layout has them.
template <int R, typename scalar_t>
void launch_prep(const Operands& o, const tile::Tables& T, const at::Tensor& prep,
                 cudaStream_t stream) {
  const auto L = given_prep_layout<R, float>(prep, T, o.z);
  auto* base = static_cast<unsigned char*>(prep.mutable_data_ptr());
  run_prep_kernel<R, scalar_t>(o, T, base, L, T.entries, wbuf_size<R>(T.n),
                               reinterpret_cast<float*>(base + L.cells_offset), L.cells_fwd,
                               L.cells_bwd, stream);
}

// The map programs of one call: the map kernel, then for the backward the fold (dz) and
// the reduce (weight gradients) in one launch.
template <bool BWD, typename scalar_t, int R, int INTERP>
void run_map_call(tile::TileArgs<scalar_t, float> A, const Operands& o, const tile::Tables& T,
                  const at::Tensor& taps, const at::Tensor& wbuf, at::Tensor& out, float* pre,
                  at::Tensor* dw, cudaStream_t stream) {
  const int64_t N = o.z.size(0), maps = N / (static_cast<int64_t>(T.H) * T.W);
  const int64_t n = o.conv_weight.size(0);
  const auto grid = make_map_grid<R, INTERP, BWD, float>(maps, T.H, T.W);
  const auto f32 = o.z.options().dtype(at::kFloat);
  at::Tensor partial, region;
  if (BWD) {
    partial = at::empty({grid.blocks, n * tile::grad_stride<R>()}, f32);
    region = at::empty({grid.blocks, map_region_size<R, INTERP>()}, f32);
  }
  A = make_tile_args<R, scalar_t, float>(o, T, grid, taps, wbuf, out,
                                         BWD ? partial.mutable_data_ptr<float>() : nullptr, pre);
  if (BWD) A.region = region.mutable_data_ptr<float>();
  launch_blocks(stencil_map_kernel<R, INTERP, BWD, scalar_t>, A, grid.layout, grid.blocks,
                tile::kThreads, stream);
  if (BWD) {
    const int64_t total = N * A.r;
    const int slices = tile::reduce_slices(grid.blocks);
    const int reduce_blocks = reduce_grid(*dw, slices);
    fold_reduce_kernel<R, INTERP, scalar_t>
        <<<static_cast<unsigned>(reduce_blocks + grid_for(total, kPrepThreads)), kPrepThreads, 0,
           stream>>>(A, total, grid.blocks, slices, reduce_blocks, dw->mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The composed-weight programs (stencil_cells.h) at their rank bound RC for a call of any
// rank up to RC: their blocks, reading the composed weights of the call's prep buffer
// (prep_cells: the forward's, then the backward's), or where it has none (a caller's prep
// made without mma) ones a prep launch writes here; for the backward the blocks' partials
// (RC's stride) and the reduce. A: the call's arguments (any rank bound's).
template <int RC, bool BWD, typename scalar_t>
void run_cells_call(tile::TileArgs<scalar_t, float> A, const Operands& o, const TileGrid& grid,
                    const at::Tensor& prep_cells, at::Tensor* dw, cudaStream_t stream) {
  const auto f32 = o.z.options().dtype(at::kFloat);
  const at::Tensor partial = cells_args<RC, BWD>(A, o, grid.blocks);
  const tile::CellTables C = tile::make_cell_tables(A.T);
  const int64_t fwd_words = tile::cells_words<RC, false>(C, A.n);
  const int64_t words = tile::cells_words<RC, BWD>(C, A.n);
  at::Tensor cells;
  if (prep_cells.defined()) {
    cells = prep_cells.narrow(0, BWD ? fwd_words : 0, words);
  } else {
    cells = at::empty({words}, f32);
    run_prep_kernel<RC, scalar_t>(o, A.T, nullptr, PrepLayout{}, 0, 0,
                                  cells.mutable_data_ptr<float>(), BWD ? 0 : words,
                                  BWD ? words : 0, stream);
  }
  const auto kernel = stencil_cells_kernel<RC, BWD, scalar_t>;
  allow_shared_bytes(reinterpret_cast<const void*>(kernel), grid.layout.bytes);
  kernel<<<static_cast<unsigned>(grid.blocks), tile::kCellThreads, grid.layout.bytes, stream>>>(
      A, grid.layout, cells.const_data_ptr<float>(), C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (BWD) launch_reduce<RC>(partial, grid.blocks, A.r, A.n, *dw, stream);
}

// Prep, then the tile kernel (and for the backward the reduce) of one call.
template <bool BWD, typename scalar_t, int R, int INTERP>
void run_call(const Operands& o, bool per_map, at::IntArrayRef scales, int64_t interpolation,
              int64_t height, int64_t width, at::Tensor& out, const at::Tensor& preact,
              at::Tensor* dw) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto& z = o.z;
  const int64_t N = z.size(0), r = z.size(1), n = o.conv_weight.size(0);
  const auto T = tables_for(height, width, interpolation, scales);
  const auto f32 = z.options().dtype(at::kFloat);
  // stencil_prep's output when the caller gave it (no prep pass here), else a prep of its own
  // (with the composed weights where they run)
  at::Tensor pbuf = o.prep;
  if (!pbuf.defined()) {
    pbuf = new_prep<R, float>(T, z, !per_map && prep_has_cells<R, float>(T, o.mma));
    launch_prep<R, scalar_t>(o, T, pbuf, stream);
  }
  const PrepViews views = prep_views<R, float>(pbuf, T, z);
  const at::Tensor &taps = views.taps, &wbuf = views.wbuf;
  float* pre = !preact.defined() || preact.numel() == 0
                   ? nullptr : const_cast<float*>(preact.const_data_ptr<float>());
  if constexpr (R <= tile::kMapMaxRank) {
    if (per_map) {
      run_map_call<BWD, scalar_t, R, INTERP>(tile::TileArgs<scalar_t, float>{}, o, T, taps,
                                             wbuf, out, pre, dw, stream);
      return;
    }
  }
  const int64_t maps = N / (height * width);
  const auto grid = make_tile_grid<R, INTERP, BWD, float>(maps, T.H, T.W, static_cast<int>(r),
                                                        T.n, o.smem_budget, o.mma);
  constexpr int RC = tile::cells_bound<R, INTERP>();
  if constexpr (RC != 0) {
    if (grid.layout.mma) {
      auto A = make_tile_args<R, scalar_t, float>(o, T, grid, taps, wbuf, out, nullptr, pre);
      run_cells_call<RC, BWD>(A, o, grid, views.cells, dw, stream);
      return;
    }
  }
  at::Tensor partial;
  if (BWD) partial = at::empty({grid.blocks, n * tile::grad_stride<R>()}, f32);
  auto A = make_tile_args<R, scalar_t, float>(o, T, grid, taps, wbuf, out,
                                              BWD ? partial.mutable_data_ptr<float>() : nullptr,
                                              pre);
  launch_blocks(stencil_tile_kernel<R, INTERP, BWD, scalar_t>, A, grid.layout, grid.blocks,
                tile::Geometry<R, INTERP, BWD>::kThreads, stream);
  if (BWD) {
    launch_reduce<R>(partial, grid.blocks, A.r, A.n, *dw, stream);
  }
}

}  // namespace cuda_kernels

template <typename scalar_t>
at::Tensor stencil_cuda_prep(const Operands& o, at::IntArrayRef scales, int64_t interpolation,
                             int64_t height, int64_t width) {
  const auto T = tables_for(height, width, interpolation, scales);
  at::Tensor prep;
  dispatch_rank(o.z.size(1), [&]<int R>() {
    prep = new_prep<R, float>(T, o.z, prep_has_cells<R, float>(T, o.mma));
    cuda_kernels::launch_prep<R, scalar_t>(o, T, prep, at::cuda::getCurrentCUDAStream());
  });
  return prep;
}

template <typename scalar_t>
void stencil_cuda_call(const Operands& o, bool per_map, at::IntArrayRef scales,
                       int64_t interpolation, int64_t height, int64_t width, at::Tensor& out,
                       const at::Tensor& preact, at::Tensor* dw) {
  dispatch_rank(o.z.size(1), [&]<int R>() {
    dispatch_interpolation(interpolation, [&]<int INTERP>() {
      if (dw) {
        cuda_kernels::run_call<true, scalar_t, R, INTERP>(o, per_map, scales, interpolation,
                                                        height, width, out, preact, dw);
      } else {
        cuda_kernels::run_call<false, scalar_t, R, INTERP>(o, per_map, scales, interpolation,
                                                         height, width, out, preact, dw);
      }
    });
  });
}

}  // namespace convlora
