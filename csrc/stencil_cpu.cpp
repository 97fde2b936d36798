// CPU kernels of the stencil ops: at::parallel_for over tokens, each token running
// the same __host__ __device__ functions (convlora_math.h) the CUDA kernels run.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "stencil.h"

namespace convlora {

namespace {

constexpr int64_t kGrain = 16;  // tokens: each costs thousands of flops

}  // namespace

at::Tensor stencil_fwd_cpu(const at::Tensor& z, const at::Tensor& expert_index,
                           const at::Tensor& conv_weight, const at::Tensor& conv_bias,
                           at::IntArrayRef scales, int64_t interpolation, int64_t height,
                           int64_t width) {
  const auto o = checked_operands(z, expert_index, conv_weight, conv_bias, scales,
                                  interpolation, height, width);
  const auto &zc = o.z, &idx = o.expert_index, &cw = o.conv_weight, &cb = o.conv_bias;
  auto u = at::empty_like(zc);
  const int64_t N = zc.size(0), r = zc.size(1);
  if (N == 0) return u;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "stencil_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<scalar_t>(zc, cw, cb, scales, interpolation, height, width);
    const int* ix = idx.const_data_ptr<int>();
    scalar_t* out = u.mutable_data_ptr<scalar_t>();
    dispatch_rank(r, [&]<int R>() {
      at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
        acc_t e_out[R];
        for (int64_t t = begin; t < end; ++t) {
          const int e = ix[t];
          scalar_t* ut = out + t * r;
          const scalar_t* zt = P.z + t * r;
          if (e < 0 || e >= P.n) {  // never read out of range; make the token visible
            for (int64_t c = 0; c < r; ++c) ut[c] = std::numeric_limits<scalar_t>::quiet_NaN();
            continue;
          }
          token_forward<R>(P, t, e, e_out);
          for (int64_t c = 0; c < r; ++c)
            ut[c] = static_cast<scalar_t>(static_cast<acc_t>(zt[c]) + e_out[c]);
        }
      });
    });
  });
  return u;
}

namespace {

// The backward on the CPU. gpu_schedule = false: one pass per token computes its dz
// contributions and adds its weight-gradient terms to its chunk's partial.
// gpu_schedule = true: the CUDA kernels' schedule, step for step (stencil_cuda.cuh):
// per-token g and contributions, then weight gradients entry by entry from g
// (token_dw_entry) summed per split in token order, then over splits. Tests compare
// the two, so CI executes every function the CUDA kernels call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> stencil_bwd_cpu_impl(
    const at::Tensor& du, const at::Tensor& z, const at::Tensor& expert_index,
    const at::Tensor& conv_weight, const at::Tensor& conv_bias, at::IntArrayRef scales,
    int64_t interpolation, int64_t height, int64_t width, bool gpu_schedule) {
  const auto o = checked_operands(z, expert_index, conv_weight, conv_bias, scales,
                                  interpolation, height, width, &du);
  const auto &zc = o.z, &duc = o.du, &idx = o.expert_index, &cw = o.conv_weight,
             &cb = o.conv_bias;
  const int64_t N = zc.size(0), r = zc.size(1), n = cw.size(0);
  const auto acc_type = zc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dz = at::empty_like(zc);
  auto dw = at::zeros({n, dw_entries(r)}, zc.options().dtype(acc_type));
  if (N == 0) {
    auto [w, b] = split_dw(dw, n, r);
    return {dz, w, b};
  }
  const int mode = static_cast<int>(interpolation);
  const int side = stencil_side(mode);
  const int64_t slots = static_cast<int64_t>(side) * side;
  const int64_t max_outputs = max_conv_outputs(mode);
  const int64_t ne = dw_entries(r);
  // Token chunks. Weight gradients: one partial per chunk, summed in chunk order, so the
  // result depends only on the thread count, never on scheduling.
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>((N + 63) / 64, 4 * static_cast<int64_t>(at::get_num_threads())));
  const int64_t chunk_len = (N + chunks - 1) / chunks;
  const int64_t splits = gpu_schedule ? dw_splits(N) : chunks;
  const int64_t split_len = (N + splits - 1) / splits;
  auto partial = at::zeros({splits, n, ne}, dw.options());
  auto contrib = at::empty({N, slots, r}, dw.options());
  auto g_buf = gpu_schedule ? at::empty({N, max_outputs, r}, dw.options()) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "stencil_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<scalar_t>(zc, cw, cb, scales, interpolation, height, width);
    const int* ix = idx.const_data_ptr<int>();
    const scalar_t* dup = duc.const_data_ptr<scalar_t>();
    acc_t* ctb = contrib.mutable_data_ptr<acc_t>();
    acc_t* part = partial.mutable_data_ptr<acc_t>();
    acc_t* gb = gpu_schedule ? g_buf.mutable_data_ptr<acc_t>() : nullptr;
    dispatch_rank(r, [&]<int R>() {
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        acc_t du_t[R];
        for (int64_t chunk = c0; chunk < c1; ++chunk) {
          const int64_t t_end = std::min(N, (chunk + 1) * chunk_len);
          for (int64_t t = chunk * chunk_len; t < t_end; ++t) {
            acc_t* ct = ctb + t * slots * r;
            std::fill(ct, ct + slots * r, acc_t(0));
            const int e = ix[t];
            if (e < 0 || e >= P.n) {  // poison the token's own dz, touch nothing else
              const int center = (side / 2) * side + side / 2;
              for (int64_t c = 0; c < r; ++c)
                ct[center * r + c] = std::numeric_limits<acc_t>::quiet_NaN();
              continue;
            }
            for (int c = 0; c < R; ++c)
              du_t[c] = c < r ? static_cast<acc_t>(dup[t * r + c]) : acc_t(0);
            if (gpu_schedule) {
              token_backward<R, false>(P, t, e, du_t, gb + t * max_outputs * r, ct,
                                       static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));
            } else {
              acc_t* pw = part + (chunk * n + e) * ne;
              token_backward<R, true>(P, t, e, du_t, static_cast<acc_t*>(nullptr), ct, pw,
                                      pw + r * r * 9);
            }
          }
        }
      });
    });
    scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t c = 0; c < r; ++c)
          dzp[t * r + c] = static_cast<scalar_t>(
              static_cast<acc_t>(dup[t * r + c]) +
              gather_dz(ctb, t, static_cast<int>(c), P.H, P.W, P.r, P.mode));
    });
    if (gpu_schedule) {  // dw_partial_kernel: each (split, expert, entry) in token order
      at::parallel_for(0, splits, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t t1 = std::min(N, (s + 1) * split_len);
          for (int64_t e = 0; e < n; ++e)
            for (int64_t entry = 0; entry < ne; ++entry) {
              acc_t acc = acc_t(0);
              for (int64_t t = s * split_len; t < t1; ++t)
                if (ix[t] == e)
                  acc += token_dw_entry(P, t, static_cast<int>(e), gb + t * max_outputs * r,
                                        static_cast<int>(entry));
              part[(s * n + e) * ne + entry] = acc;
            }
        }
      });
    }
    acc_t* dwp = dw.mutable_data_ptr<acc_t>();
    for (int64_t s = 0; s < splits; ++s)
      for (int64_t i = 0; i < n * ne; ++i) dwp[i] += part[s * n * ne + i];
  });
  auto [w, b] = split_dw(dw, n, r);
  return {dz, w, b};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> stencil_bwd_cpu(
    const at::Tensor& du, const at::Tensor& z, const at::Tensor& expert_index,
    const at::Tensor& conv_weight, const at::Tensor& conv_bias, at::IntArrayRef scales,
    int64_t interpolation, int64_t height, int64_t width) {
  return stencil_bwd_cpu_impl(du, z, expert_index, conv_weight, conv_bias, scales,
                              interpolation, height, width, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stencil_bwd_gpu_schedule_cpu(
    const at::Tensor& du, const at::Tensor& z, const at::Tensor& expert_index,
    const at::Tensor& conv_weight, const at::Tensor& conv_bias, at::IntArrayRef scales,
    int64_t interpolation, int64_t height, int64_t width) {
  return stencil_bwd_cpu_impl(du, z, expert_index, conv_weight, conv_bias, scales,
                              interpolation, height, width, true);
}

TORCH_LIBRARY_IMPL(convlora, CPU, m) {
  m.impl("stencil_fwd", &stencil_fwd_cpu);
  m.impl("stencil_bwd", &stencil_bwd_cpu);
  m.impl("stencil_bwd_gpu_schedule", &stencil_bwd_gpu_schedule_cpu);
}

}  // namespace convlora
