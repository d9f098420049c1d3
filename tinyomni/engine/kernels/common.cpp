// Activation quantization (q8 blocks) and the output epilogue shared by the int4 and int8 kernels.
#include "common.h"

#include <utility>

namespace tinyomni {

namespace {

// Loads 16 values of row `x` starting at column k as floats, zero past `limit` (a K that is not a
// multiple of 32 pads with zeros, which add nothing to any dot product).
inline __m512 load16(const float* x, int64_t k, int64_t limit) {
  int64_t left = limit - k;
  if (left >= 16) return _mm512_loadu_ps(x + k);
  if (left <= 0) return _mm512_setzero_ps();
  return _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), x + k);
}

inline __m512 load16(const at::BFloat16* x, int64_t k, int64_t limit) {
  int64_t left = limit - k;
  __m256i raw;
  if (left >= 16) {
    raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
  } else if (left <= 0) {
    return _mm512_setzero_ps();
  } else {
    raw = _mm256_maskz_loadu_epi16((__mmask16)((1u << left) - 1), x + k);
  }
  // bf16 is the top half of an fp32: widen and shift.
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Quantizes two 16-value halves of a block to int8 codes at dst, returns (scale, code sum).
inline std::pair<float, float> quantize_block(__m512 v0, __m512 v1, int8_t* dst, __m512* r0, __m512* r1) {
  __m512 amax = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
  float d = _mm512_reduce_max_ps(amax) / 127.0f;
  float id = d != 0.0f ? 1.0f / d : 0.0f;
  __m512 scale = _mm512_set1_ps(id);
  // Round to nearest even (the default MXCSR mode), as torch.round does in the reference.
  __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, scale));
  __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, scale));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q1));
  if (r0 != nullptr) {  // what the codes miss, for the second pass
    __m512 dv = _mm512_set1_ps(d);
    *r0 = _mm512_sub_ps(v0, _mm512_mul_ps(_mm512_cvtepi32_ps(q0), dv));
    *r1 = _mm512_sub_ps(v1, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), dv));
  }
  return {d, static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)))};
}

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int64_t nb, Q8Activations& act) {
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * K;
    for (int64_t b = 0; b < nb; ++b) {
      __m512 v0 = load16(row, b * QK, K);
      __m512 v1 = load16(row, b * QK + 16, K);
      const int64_t i = m * nb + b;
      __m512 r0, r1;
      const bool two = act.passes == 2;
      auto [d, sum] = quantize_block(v0, v1, act.q.data() + i * QK, two ? &r0 : nullptr, two ? &r1 : nullptr);
      act.d[i] = d;
      act.isum[i] = sum;
      if (two) {
        auto [d2, sum2] = quantize_block(r0, r1, act.q2.data() + i * QK, nullptr, nullptr);
        act.d2[i] = d2;
        act.isum2[i] = sum2;
      }
    }
  }
}

// The calling thread's scratch, grown to M rows of `blocks` blocks.
Q8Activations& scratch(int64_t M, int64_t blocks, int passes) {
  thread_local Q8Activations act;
  act.rows = M;
  act.blocks = blocks;
  act.passes = passes;
  if (static_cast<int64_t>(act.d.size()) < M * blocks) {
    for (auto* v : {&act.q, &act.q2}) v->resize(M * blocks * QK);
    for (auto* v : {&act.d, &act.d2, &act.isum, &act.isum2}) v->resize(M * blocks);
  }
  return act;
}

}  // namespace

Q8Activations& quantize_activations(const at::Tensor& x2d, int64_t blocks, int passes) {
  TORCH_CHECK(passes == 1 || passes == 2, "activation passes must be 1 or 2, got ", passes);
  const int64_t M = x2d.size(0), K = x2d.size(1);
  Q8Activations& act = scratch(M, blocks, passes);
  if (x2d.scalar_type() == at::kBFloat16) {
    quantize_rows(x2d.data_ptr<at::BFloat16>(), M, K, blocks, act);
  } else {
    quantize_rows(x2d.data_ptr<float>(), M, K, blocks, act);
  }
  return act;
}

Q8Activations& quantize_activations(const float* x, int64_t M, int64_t K, int64_t blocks, int passes) {
  TORCH_CHECK(passes == 1 || passes == 2, "activation passes must be 1 or 2, got ", passes);
  Q8Activations& act = scratch(M, blocks, passes);
  quantize_rows(x, M, K, blocks, act);
  return act;
}

void check_packed(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins, int64_t in_features,
                  int64_t out_features, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  const int64_t nb = (in_features + QK - 1) / QK, groups = (out_features + ROWS - 1) / ROWS;
  const int64_t width = bits == 4 ? 256 : 512;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(0) == groups && qweight.size(1) == nb * width,
              "int", bits, " qweight must be a contiguous uint8 [", groups, ", ", nb * width, "] tensor (packed rows)");
  for (const at::Tensor* t : {&scales, &mins}) {
    TORCH_CHECK(is_half_bits(*t) && t->is_contiguous() && t->numel() == groups * nb * ROWS,
                "scales and mins must be contiguous float16 (or int16 holding float16 bits) [", groups, ", ",
                nb * ROWS, "]");
  }
}

at::Tensor as_matrix(const at::Tensor& x, int64_t in_features) {
  TORCH_CHECK(x.device().is_cpu(), "tinyomni quantized kernels run on CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "activations must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(-1) == in_features, "expected ", in_features, " input features, got ", x.size(-1));
  return x.reshape({-1, in_features}).contiguous();
}

float* output_buffer(Q8Activations& act, at::Tensor& out) {
  if (out.scalar_type() == at::kFloat) return out.data_ptr<float>();
  if (static_cast<int64_t>(act.out.size()) < out.numel()) act.out.resize(out.numel());
  return act.out.data();
}

void finish_output(Q8Activations& act, float* result, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const int64_t M = out.size(0), N = out.size(1);
  if (bias.has_value()) {
    at::Tensor b = bias->to(at::kFloat).contiguous();
    const float* bp = b.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) result[m * N + n] += bp[n];
  }
  if (out.scalar_type() == at::kBFloat16) {
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) o[i] = at::BFloat16(result[i]);
  }
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& mins, const std::optional<at::Tensor>& bias, int64_t in_features,
                         int64_t out_features, int64_t passes, int64_t bits, GemvKernel gemv,
                         DequantizeKernel dequantize) {
  check_packed(qweight, scales, mins, in_features, out_features, bits);
  at::Tensor x2d = as_matrix(x, in_features);
  const int64_t M = x2d.size(0), N = out_features, nb = (in_features + QK - 1) / QK, groups = qweight.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  if (M > GEMV_MAX_ROWS && gemm_available()) {  // prefill on AMX: no dequantized copy
    return quantized_gemm(x2d, qweight, scales, mins, bias, N, bits).view(shape);
  }
  if (M > GEMV_MAX_ROWS) {  // prefill without AMX: dequantize once, dense GEMM
    TORCH_CHECK(dequantize != nullptr, "this kernel takes 1..", GEMV_MAX_ROWS, " rows, got ", M);
    at::Tensor w = dequantize(qweight, scales, mins, in_features, N, x.scalar_type());
    return at::linear(x2d, w, bias.has_value() ? bias->to(x.scalar_type()) : std::optional<at::Tensor>())
        .view(shape);
  }
  at::Tensor out = at::empty({M, N}, x.options());
  Q8Activations& act = quantize_activations(x2d, nb, static_cast<int>(passes));
  float* result = output_buffer(act, out);
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const at::Half* sc = half_data(scales);
  const at::Half* mn = half_data(mins);
  at::parallel_for(0, groups, GROUP_GRAIN, [&](int64_t begin, int64_t end) { gemv(qw, sc, mn, nb, act, M, begin, end, result, N); });
  finish_output(act, result, bias, out);
  return out.view(shape);
}

}  // namespace tinyomni
