// Shared pieces of the weight-only quantized linears: the block size, activation quantization to
// int8 per block of 32 (llama.cpp's q8 activations), and the per-thread scratch that holds them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace tinyomni {

constexpr int64_t QK = 32;  // values per quantization block, weights and activations alike

// Up to this many activation rows use the VNNI matrix-vector kernels (decode, small batches); more
// rows (prefill) use the AMX bf16 tile GEMM (gemm/gemm.cpp) where the CPU has it, else dequantize the
// weight once and run a dense float GEMM (oneDNN).
constexpr int64_t GEMV_MAX_ROWS = 16;

// Weight rows are stored interleaved in groups of 16 (one AVX-512 lane per row), so one dpbusd
// multiplies 4 inputs of 16 rows by the same 4 broadcast activation bytes, and a block's 16 results
// land in one register: no horizontal sums, and a block's 16 scales are one vector load.
constexpr int64_t ROWS = 16;

// Activation rows handled together by one pass over a row group (the unpacked weights are reused);
// fewer with two-pass activations, whose broadcasts and sums need twice the registers.
constexpr int MT = 4;
constexpr int MT2 = 2;

// One activation matrix quantized to int8 blocks: row m, block b holds the values
// d[m*nb + b] * q[(m*nb + b)*32 + i]; isum is each block's integer code sum (as a float), which the
// int4 min term and the int8 offset correction need. With two passes, the rounding residual is
// quantized again (q2, d2, isum2): x = d*q + d2*q2 to ~1/64000 of the block's range instead of
// ~1/254, for two dot products per weight byte instead of one (the weights are read once either way).
struct Q8Activations {
  int64_t rows = 0;
  int64_t blocks = 0;
  int passes = 1;
  std::vector<int8_t> q, q2;
  std::vector<float> d, d2;
  std::vector<float> isum, isum2;
  std::vector<float> out;  // float results before the cast to bf16 (unused for fp32 outputs)
};

// Quantizes x2d [M, K] (fp32 or bf16, contiguous) into the calling thread's scratch, zero-padding
// each row to blocks*32. The scratch grows and is never freed, so a decode step allocates nothing.
Q8Activations& quantize_activations(const at::Tensor& x2d, int64_t blocks, int passes);

// The same from a float buffer x [M, K] (the fused decode step's intermediate values).
Q8Activations& quantize_activations(const float* x, int64_t M, int64_t K, int64_t blocks, int passes);

// Matrix-vector products of row groups [begin, end) of one packed weight against the M activation
// rows already in `act`: result [M, N] (row-major, N = out_features). The linears and the fused
// decode step both call these, so each weight format has one hot loop.
void int4_gemv(const uint8_t* qw, const at::Half* scales, const at::Half* mins, int64_t nb, const Q8Activations& act,
               int64_t M, int64_t begin, int64_t end, float* result, int64_t N);
void int8_gemv(const uint8_t* qw, const at::Half* scales, const at::Half* mins, int64_t nb, const Q8Activations& act,
               int64_t M, int64_t begin, int64_t end, float* result, int64_t N);

// Batched decode on AMX int8 tiles (batched/batched.cpp): the same results as int4_gemv/int8_gemv
// (bit for bit) for 1..16 rows, with one tile product per block of 16 weight rows x 32 inputs for all
// rows together. The GEMVs hand 2..16 rows to it when batched_available() (AMX-TILE and AMX-INT8
// present, the OS granted tile data, not switched off by set_batched_enabled(false)).
bool batched_supported();
bool batched_available();
void set_batched_enabled(bool flag);
void int4_batched_gemv(const uint8_t* qw, const at::Half* scales, const at::Half* mins, int64_t nb,
                       const Q8Activations& act, int64_t M, int64_t begin, int64_t end, float* result, int64_t N);
void int8_batched_gemv(const uint8_t* qw, const at::Half* scales, const at::Half* mins, int64_t nb,
                       const Q8Activations& act, int64_t M, int64_t begin, int64_t end, float* result, int64_t N);

// Prefill's GEMM on AMX bf16 tiles (gemm/gemm.cpp): x2d [M, K] contiguous fp32/bf16 against one packed
// weight of `bits` 4 or 8 (already checked by the caller), result [M, N] in x2d's dtype; the float
// path's arithmetic (no activation quantization, so no `passes`). Only call it
// when gemm_supported() (AMX-BF16 and AVX512-BF16 present and the OS granted tile data to this process);
// the linears use it when gemm_available() (supported, and not switched off by set_gemm_enabled).
bool gemm_supported();
bool gemm_available();
void set_gemm_enabled(bool flag);
at::Tensor quantized_gemm(const at::Tensor& x2d, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& mins, const std::optional<at::Tensor>& bias, int64_t out_features,
                          int64_t bits);

// Checks one packed int4 (`bits` 4) or int8 weight: qweight [groups, blocks*256|512] uint8, scales and
// mins fp16 bits [groups, blocks*16]; a clear error naming the tensor otherwise (the direct entry points).
void check_packed(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins, int64_t in_features,
                  int64_t out_features, int64_t bits);

// A matrix-vector kernel over row groups [begin, end): int4_gemv, int8_gemv or their batched forms.
using GemvKernel = void (*)(const uint8_t*, const at::Half*, const at::Half*, int64_t, const Q8Activations&, int64_t,
                            int64_t, int64_t, float*, int64_t);
// Dequantizes a packed weight to a dense [out, in] tensor of a dtype (int4_dequantize, int8_dequantize).
using DequantizeKernel = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                        at::ScalarType);

// The quantized linear for either width (`bits` 4 or 8): the weight checked, then more than
// GEMV_MAX_ROWS rows (prefill) on the AMX GEMM where available, else `dequantize` + a dense GEMM
// (nullptr: not allowed); up to GEMV_MAX_ROWS rows as quantized activations through `gemv`, its row
// groups split across the threads; bias and the output dtype last.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& mins, const std::optional<at::Tensor>& bias, int64_t in_features,
                         int64_t out_features, int64_t passes, int64_t bits, GemvKernel gemv,
                         DequantizeKernel dequantize);

// Shape checks shared by both kernels; returns x as a contiguous [M, K] matrix.
at::Tensor as_matrix(const at::Tensor& x, int64_t in_features);

// Where float results go: the output itself when it is fp32, else the thread's scratch.
float* output_buffer(Q8Activations& act, at::Tensor& out);

// Adds the bias and writes float results into out [M, N] (fp32 or bf16).
void finish_output(Q8Activations& act, float* result, const std::optional<at::Tensor>& bias, at::Tensor& out);

// Scales and mins are fp16 values; the engine stores them as int16 tensors holding the fp16 bits, so
// that `model.to(torch.bfloat16)` (which casts every floating-point buffer) cannot change them.
inline bool is_half_bits(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kShort;
}
inline const at::Half* half_data(const at::Tensor& t) { return reinterpret_cast<const at::Half*>(t.data_ptr()); }

// Row groups per parallel task: small enough that both cores share a 192-row projection (12 groups).
constexpr int64_t GROUP_GRAIN = 2;

// Broadcast of activation bytes [4*i, 4*i+4) of one quantized block.
inline __m512i broadcast4(const int8_t* block, int i) {
  int32_t v;
  std::memcpy(&v, block + 4 * i, 4);
  return _mm512_set1_epi32(v);
}

// Stores the first `left` (up to 16) of v at dst as float32, or as bfloat16 rounded to nearest even
// (what a cast does, for the finite values weights are); nothing when left <= 0.
inline void store16(float* dst, __m512 v, int64_t left) {
  if (left >= 16) {
    _mm512_storeu_ps(dst, v);
  } else if (left > 0) {
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << left) - 1), v);
  }
}
inline void store16(at::BFloat16* dst, __m512 v, int64_t left) {
  if (left <= 0) return;
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __m256i half = _mm512_cvtepi32_epi16(rounded);
  if (left >= 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), half);
  } else {
    _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << left) - 1), half);
  }
}

// Writes a row group's 16 results for activation row m, dropping the padding rows past N.
inline void store_group(const __m512 v, float* result, int64_t m, int64_t N, int64_t n0) {
  const int64_t valid = std::min<int64_t>(ROWS, N - n0);
  _mm512_mask_storeu_ps(result + m * N + n0, static_cast<__mmask16>((1u << valid) - 1), v);
}

}  // namespace tinyomni
