// Op schemas of the convlora library and their CPU kernels.
//
// Importing convlora_kernels._C loads this library; the ops then live under
// torch.ops.convlora. Fake (meta) kernels and autograd are registered from Python
// (convlora_kernels/backends/extension.py, gating.py and _testing.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "stencil.h"

namespace convlora {

// gelu_probe: exact GELU through the shared host/device math, the smallest op that
// proves the build, the registration and the host/device sharing on each device.
at::Tensor gelu_probe_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "gelu_probe_cpu: expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "gelu_probe: expected float32 or float64, got ", x.scalar_type());
  auto xc = x.contiguous();
  auto y = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "gelu_probe_cpu", [&] {
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = gelu_erf(in[i]);
    });
  });
  return y;
}

// stencil_grid: how the tiled stencil kernels cut a call with rank r and n experts under a
// shared-memory budget of smem_kb KB (0: the default), for reports and the resource test:
// [shared-memory bytes per block, weights staged in shared memory (0/1), weight-gradient
// accumulators in shared memory (0/1), threads per block, tile height, tile width, items
// per round (tokens per block for the composed-weight programs), the composed-weight
// programs (0/1; mma asks for them where they run)].
std::vector<int64_t> stencil_grid(int64_t r, int64_t n, int64_t interpolation, bool backward,
                                  int64_t smem_kb, bool mma) {
  TORCH_CHECK(r >= 1 && r <= kMaxRank && n >= 1 && n <= kMaxExperts,
              "stencil_grid: r must be in [1, ", kMaxRank, "] and n in [1, ", kMaxExperts,
              "], got r = ", r, ", n = ", n);
  const int budget = smem_budget(smem_kb);
  std::vector<int64_t> out;
  dispatch_rank(r, [&]<int R>() {
    const auto go = [&]<int INTERP, bool BWD>() {  // BWD: a compile-time direction
      const auto p = make_tile_grid<R, INTERP, BWD, float>(1, 1, 1, static_cast<int>(r),
                                                         static_cast<int>(n), budget, mma);
      using G = tile::Geometry<R, INTERP, BWD>;
      const bool cells = p.layout.mma;
      out = {p.layout.bytes, p.w_smem, p.dw_smem, cells ? tile::kCellThreads : G::kThreads,
             cells ? tile::kCellTile : G::kTileH, cells ? tile::kCellTile : G::kTileW,
             cells ? tile::kCellTile * tile::kCellTile : G::kRound, cells};
    };
    dispatch_interpolation(interpolation, [&]<int INTERP>() {
      backward ? go.template operator()<INTERP, true>() : go.template operator()<INTERP, false>();
    });
  });
  return out;
}

// stencil_prep_bytes: the size of stencil_prep's output for a call of rank r with n experts
// (float64: z is float64, else float32 tables; mma: stencil_prep's), for fake tensors of
// that shape.
int64_t stencil_prep_bytes(int64_t r, int64_t n, int64_t interpolation, int64_t height,
                           int64_t width, at::IntArrayRef scales, bool float64, bool mma) {
  TORCH_CHECK(r >= 1 && r <= kMaxRank && n >= 1 && n <= kMaxExperts &&
                  static_cast<int64_t>(scales.size()) == n && height >= 1 && width >= 1 &&
                  (interpolation == kBilinear || interpolation == kBicubic),
              "stencil_prep_bytes: r in [1, ", kMaxRank, "], n in [1, ", kMaxExperts,
              "] with one scale each, height and width >= 1, interpolation 0 or 1; got r = ", r,
              ", n = ", n, ", ", scales.size(), " scales, ", height, " x ", width,
              ", interpolation ", interpolation);
  for (auto s : scales)
    TORCH_CHECK(s >= 1 && s <= kMaxScale, "stencil_prep_bytes: scales must be in [1, ",
                kMaxScale, "], got ", s);
  const auto T = tables_for(height, width, interpolation, scales);
  int64_t bytes = 0;
  dispatch_rank(r, [&]<int R>() {
    bytes = float64 ? prep_layout<R, double>(T).bytes
                    : prep_layout<R, float>(T, prep_has_cells<R, float>(T, mma)).bytes;
  });
  return bytes;
}

// gelu_slope_probe: the stencils' GELU and its slope (gelu_and_grad) as a call on float32
// inputs computes them (sixteen_bit false: the exact form) or one on float16 or bfloat16
// inputs (true: gelu_as_and_grad), float32 in, (GELU(x), GELU'(x)) out: what the tests hold
// against float64, on each device.
std::tuple<at::Tensor, at::Tensor> gelu_slope_probe_cpu(const at::Tensor& x, bool sixteen_bit) {
  TORCH_CHECK(x.device().is_cpu(), "gelu_slope_probe_cpu: expected a CPU tensor, got ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "gelu_slope_probe: expected float32, got ",
              x.scalar_type());
  auto xc = x.contiguous();
  auto y = at::empty_like(xc), slope = at::empty_like(xc);
  const float* in = xc.const_data_ptr<float>();
  float* out = y.mutable_data_ptr<float>();
  float* d = slope.mutable_data_ptr<float>();
  at::parallel_for(0, xc.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      out[i] = sixteen_bit ? gelu_and_grad<at::BFloat16>(in[i], d[i])
                           : gelu_and_grad<float>(in[i], d[i]);
  });
  return {y, slope};
}

CONVLORA_LIBRARY(CONVLORA_NS, m) {
  m.def("stencil_grid(int r, int n, int interpolation, bool backward, int smem_kb=0, "
        "bool mma=False) -> int[]",
        &stencil_grid);
  m.def("gelu_probe(Tensor x) -> Tensor");
  m.def("gelu_slope_probe(Tensor x, bool sixteen_bit) -> (Tensor, Tensor)");
  // See stencil.h for shapes. interpolation: 0 bilinear, 1 bicubic. smem_kb: the
  // shared-memory budget of a tile block in KB, 0 for the default (smem_budget). mma: the
  // composed-weight programs where they can run (make_tile_grid).
  m.def("stencil_prep_bytes(int r, int n, int interpolation, int height, int width, "
        "int[] scales, bool float64, bool mma=False) -> int",
        &stencil_prep_bytes);
  // mma: the prep of calls that run the composed-weight programs (the stencil ops' mma
  // argument, per-token routing), with their composed weights (PrepLayout)
  m.def(
      "stencil_prep(Tensor z, Tensor conv_weight, Tensor conv_bias, int[] scales, "
      "int interpolation, int height, int width, bool mma=False) -> Tensor");
  m.def(
      "stencil_fwd(Tensor z, Tensor expert_index, Tensor conv_weight, Tensor conv_bias, "
      "int[] scales, int interpolation, int height, int width, bool save_preact, "
      "int smem_kb=0, Tensor? prep=None, bool mma=False, bool raw_preact=False) "
      "-> (Tensor, Tensor)");
  m.def(
      "stencil_bwd(Tensor du, Tensor z, Tensor preact, Tensor expert_index, "
      "Tensor conv_weight, Tensor conv_bias, int[] scales, int interpolation, int height, "
      "int width, int smem_kb=0, Tensor? prep=None, bool mma=False) -> (Tensor, Tensor, Tensor)");
}

CONVLORA_LIBRARY_IMPL(CONVLORA_NS, CPU, m) {
  m.impl("gelu_probe", &gelu_probe_cpu);
  m.impl("gelu_slope_probe", &gelu_slope_probe_cpu);
}

}  // namespace convlora

// A Python module with no functions: importing it loads the library above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
