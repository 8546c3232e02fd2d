// The int4 weight product (int4_gemm.h) as a PyTorch extension of its own, built by
// engine/kernels/int4.py for the same variant as the main kernel module (AVX-512 VNNI or AVX2);
// these few lines could move into cpu.cpp.
//
//   linear_int4(x, codes, scales, n): x [M, K] float (any M) times packed int4 weights
//                                     (engine/linear.py `pack_int4`) -> float32 [M, n].
//   quantize_int4(w, group, clips, refits): the quantizer of engine/linear.py `quantize_int4`
//                                     (int4_quantize.h), at load-time speed.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "int4_gemm.h"
#include "int4_quantize.h"
#include "int4_view.h"

namespace {

using er::int4::GroupedRows;
using er::int4::PackedInt4;
using er::int4::packed_view;

torch::Tensor linear_int4(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t n) {
  const PackedInt4 w = packed_view("linear_int4", codes, scales, n);
  TORCH_CHECK(x.dim() == 2, "linear_int4: x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1), groups = w.groups();
  TORCH_CHECK(K <= w.Kp && K > w.Kp - w.G, "linear_int4: x has ", K,
              " features, the weights were packed for ", w.Kp, " (padded to groups of ", w.G, ")");
  auto xf = x.to(torch::kFloat).contiguous();
  auto q = torch::empty({M, w.Kp}, x.options().dtype(torch::kChar));
  auto scale = torch::empty({M}, x.options().dtype(torch::kFloat));
  auto sums = torch::empty({M, groups}, x.options().dtype(torch::kFloat));
  auto y = torch::empty({M, n}, x.options().dtype(torch::kFloat));
  if (M == 0) return y;
  const float* xp = xf.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float *sp = scale.data_ptr<float>(), *gp = sums.data_ptr<float>();
  // rows quantize in parallel chunks: a prefill's thousand rows are worth splitting
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      er::int4::quantize_row(xp + m * K, K, w.Kp, w.G, qp + m * w.Kp, sp + m, gp + m * groups);
  });
  const GroupedRows rows{qp, w.Kp, sp, gp, groups};
  er::int4::gemm_int4<false>(w, rows, M, y.data_ptr<float>(), n);
  return y;
}

// w [N, K] float -> (codes uint8 [N, Kp], scales, offsets float16 [N, Kp / G]): the quantizer
// of engine/linear.py `quantize_int4` (int4_quantize.h).
std::vector<torch::Tensor> quantize_int4(torch::Tensor w, int64_t group, torch::Tensor clips,
                                         int64_t refits) {
  TORCH_CHECK(w.dim() == 2 && w.numel() > 0, "quantize_int4: w must be a non-empty [N, K]");
  TORCH_CHECK(group > 0 && group % 8 == 0, "quantize_int4: group must be a multiple of 8");
  TORCH_CHECK(clips.dim() == 1 && clips.scalar_type() == torch::kFloat && clips.is_contiguous(),
              "quantize_int4: clips must be float32 [C]");
  auto wf = w.to(torch::kFloat).contiguous();
  const int64_t N = w.size(0), K = w.size(1), groups = (K + group - 1) / group;
  auto codes = torch::empty({N, groups * group}, w.options().dtype(torch::kByte));
  auto scales = torch::empty({N, groups}, w.options().dtype(torch::kHalf));
  auto offsets = torch::empty({N, groups}, w.options().dtype(torch::kHalf));
  er::int4::quantize_weights(wf.data_ptr<float>(), N, K, group, clips.data_ptr<float>(),
                             clips.size(0), refits, codes.data_ptr<uint8_t>(),
                             reinterpret_cast<uint16_t*>(scales.data_ptr()),
                             reinterpret_cast<uint16_t*>(offsets.data_ptr()));
  return {codes, scales, offsets};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_int4", &linear_int4, py::call_guard<py::gil_scoped_release>(),
        "y = x w^T, packed int4 weights (a scale and an offset per 16 features and G inputs), "
        "activations int8 per row");
  m.def("amx_enable", &er::amx_enable, py::arg("min_rows"),
        "this module's int4 products of min_rows rows or more on AMX tiles (0: never): '' when "
        "set, else why the tiles cannot run here");
  m.def("quantize_int4", &quantize_int4, py::call_guard<py::gil_scoped_release>(),
        "w -> (codes, scales, offsets): 4-bit codes, a float16 scale and offset per group");
}
