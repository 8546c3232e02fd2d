// The codec's CPU kernels (the tensor-facing checks and bindings; the raw-pointer loops are in
// the headers beside it):
//
//   lstm_layer(pre, w, h0, c0, hs, cs): one LSTM layer over the frames of a call, float16
//                        recurrent weights (lstm_f16.h);
//   elu(x):              EnCodec's ELU, one vectorised pass (codec_simd.h).
//
// Built at first use by engine/codec/native.py with -mavx2 -mfma -mf16c; called only on CPUs
// that have those. Self-contained (no engine/kernels header) so that it can be folded into the
// engine's kernel build later.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

#include "lstm_f16.h"

namespace {

// pre [n, B, 4H] float32 contiguous: input projection plus biases of each frame;
// w [4H, H] float16, unit-major (row 4j + q = gate q of unit j); h0, c0 [B, H] float32;
// hs, cs [n, B, H] float32, written: the state after each frame (dim 0 may be strided).
void lstm_layer(const torch::Tensor& pre, const torch::Tensor& w, const torch::Tensor& h0,
                const torch::Tensor& c0, const torch::Tensor& hs_in, const torch::Tensor& cs_in) {
  TORCH_CHECK(h0.dim() == 2 && h0.is_contiguous() && c0.sizes() == h0.sizes() &&
                  c0.is_contiguous(),
              "lstm_layer: h0 and c0 must be contiguous [B, H]");
  const int64_t B = h0.size(0), H = h0.size(1);
  TORCH_CHECK(pre.dim() == 3 && pre.is_contiguous() && pre.size(1) == B && pre.size(2) == 4 * H,
              "lstm_layer: pre must be contiguous [n, B, 4H] = [n, ", B, ", ", 4 * H, "]");
  const int64_t n = pre.size(0);
  TORCH_CHECK(w.scalar_type() == torch::kHalf && w.is_contiguous() && w.dim() == 2 &&
                  w.size(0) == 4 * H && w.size(1) == H,
              "lstm_layer: w must be contiguous float16 [4H, H]");
  TORCH_CHECK(H % 16 == 0, "lstm_layer: the hidden size must be a multiple of 16, got ", H);
  for (const torch::Tensor* t : {&pre, &h0, &c0, &hs_in, &cs_in})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->device().is_cpu(),
                "lstm_layer: float32 CPU tensors");
  for (const torch::Tensor* t : {&hs_in, &cs_in})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == n && t->size(1) == B && t->size(2) == H &&
                    t->stride(2) == 1 && t->stride(1) == H,
                "lstm_layer: hs and cs must be [n, B, H] with contiguous [B, H] frames");
  const auto wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* pp = pre.data_ptr<float>();
  float* hp = hs_in.data_ptr<float>();  // written through: hs and cs are outputs
  float* cp = cs_in.data_ptr<float>();
  const int64_t hstride = hs_in.stride(0), cstride = cs_in.stride(0);
  const int64_t blocks = (H + codec_lstm::kBlock - 1) / codec_lstm::kBlock;
  for (int64_t t = 0; t < n; ++t) {
    const float* h = t ? hp + (t - 1) * hstride : h0.data_ptr<float>();
    const float* c = t ? cp + (t - 1) * cstride : c0.data_ptr<float>();
    float* h_out = hp + t * hstride;
    float* c_out = cp + t * cstride;
    const float* p = pp + t * B * 4 * H;
    // Every thread takes whole blocks of units (the same ones every frame: its weights stay in
    // its core's cache as far as they fit); the end of the region is the frame's barrier.
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      codec_lstm::lstm_units(wp, p, 4 * H, h, c, h_out, c_out, B, H, b0 * codec_lstm::kBlock,
                             std::min(H, b1 * codec_lstm::kBlock), t % 2 == 1);
    });
  }
}

torch::Tensor elu(const torch::Tensor& x) {
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((bf16 || x.scalar_type() == torch::kFloat) && x.device().is_cpu(),
              "elu: float32 or bfloat16 CPU tensor");
  const auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  constexpr int64_t kGrain = 1 << 14;  // values per task: below ~64 KB a thread is not worth it
  if (bf16) {
    const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    at::parallel_for(0, xc.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      codec_simd::elu(xp + i0, yp + i0, i1 - i0);
    });
    return y;
  }
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, xc.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    codec_simd::elu(xp + i0, yp + i0, i1 - i0);
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_layer", &lstm_layer, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "one LSTM layer over n frames, float16 recurrent weights (unit-major)");
  m.def("elu", &elu, pybind11::call_guard<pybind11::gil_scoped_release>(), "ELU (alpha 1)");
}
