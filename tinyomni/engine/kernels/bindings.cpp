// The extension's Python surface: direct pybind11 functions for eager calls (the least dispatch
// cost per call, which matters at ~200 linears per token), the same functions registered as
// torch.ops.tinyomni.* so torch.compile can keep them in a graph, and the CPU-feature probe.
#include <torch/extension.h>

#include "common.h"
#include "decode.h"

namespace tinyomni {
at::Tensor int4_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&, int64_t, int64_t, int64_t);
at::Tensor int4_dequantize(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, at::ScalarType);
at::Tensor int8_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&, int64_t, int64_t, int64_t);
at::Tensor int8_dequantize(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, at::ScalarType);
at::Tensor gemm_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&, int64_t, int64_t, int64_t);
bool batched_supported();
void set_batched_enabled(bool);
at::Tensor batched_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t);
}  // namespace tinyomni

namespace {

// The kernels need AVX-512 F/BW/VL, VNNI and F16C; checked at run time so a .so built here but
// loaded on an older CPU refuses politely instead of dying on an illegal instruction.
bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_supported", &cpu_supported);
  m.def("int4_linear", &tinyomni::int4_linear);
  m.def("int4_dequantize", &tinyomni::int4_dequantize);
  m.def("int8_linear", &tinyomni::int8_linear);
  m.def("int8_dequantize", &tinyomni::int8_dequantize);
  m.def("gemm_supported", &tinyomni::gemm_supported);  // prefill's AMX GEMM (gemm/gemm.cpp)
  m.def("set_gemm_enabled", &tinyomni::set_gemm_enabled);
  m.def("gemm_linear", &tinyomni::gemm_linear);
  m.def("batched_supported", &tinyomni::batched_supported);  // batched decode on AMX int8 (batched/)
  m.def("set_batched_enabled", &tinyomni::set_batched_enabled);
  m.def("batched_linear", &tinyomni::batched_linear);
  pybind11::class_<tinyomni::DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                          const std::vector<std::optional<at::Tensor>>&, const std::vector<int64_t>&, int64_t, int64_t,
                          int64_t, double, int64_t>())
      .def("set_adapter", &tinyomni::DecodeStack::set_adapter)
      .def("set_head", &tinyomni::DecodeStack::set_head)
      .def("set_embedding_blocks", &tinyomni::DecodeStack::set_embedding_blocks)
      .def("set_embedding_table", &tinyomni::DecodeStack::set_embedding_table)
      .def("forward", &tinyomni::DecodeStack::forward)
      .def("forward_logits", &tinyomni::DecodeStack::forward_logits);
}

TORCH_LIBRARY(tinyomni, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, Tensor? bias, int in_features, int out_features, int passes) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, Tensor? bias, int in_features, int out_features, int passes) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyomni, CPU, m) {
  m.impl("int4_linear", &tinyomni::int4_linear);
  m.impl("int8_linear", &tinyomni::int8_linear);
}
