// int8 weight-only linear: group 32, asymmetric (w = d*q + m, q in 0..255; fp16 d and m per block),
// stored with rows interleaved in groups of 16. It holds GGUF Q8_0 (q + 128 with m = -128d), Q4_0
// and Q4_1 blocks exactly, and float weights to 1/255 of each block's range.
//
// Packed layout (reference.py's pack() builds it; its unpack() is the inverse):
//   qweight uint8 [N/16, blocks*512]: for row group g, block b, step c (0..7), row r (0..15), j (0..3),
//     byte (b*8 + c)*64 + r*4 + j = code(16g+r, 32b+4c+j)
//   scales, mins: fp16 bits (int16) [N/16, blocks*16], element b*16 + r for row 16g+r.
// Unsigned codes are what VNNI's dpbusd takes (unsigned x signed bytes): one instruction multiplies 4
// inputs of 16 rows by 4 broadcast activation bytes; the min adds m * d_x * sum(q_x) per block.
#include "../common.h"

namespace tinyomni {

namespace {

// Dot products of GT row groups with R quantized activation rows; results[gt][r] holds 16 rows.
// TWO: the activations carry a second (residual) pass, met by the same weight loads.
template <int GT, int R, bool TWO>
inline void group_dot(const uint8_t* qw, const at::Half* scales, const at::Half* mins, int64_t nb,
                      const Q8Activations& act, int64_t m0, __m512 (&results)[GT][R]) {
  const int64_t gstride = nb * 512, sstride = nb * ROWS;
  for (int t = 0; t < GT; ++t)
    for (int r = 0; r < R; ++r) results[t][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i sum0[GT][R], sum1[GT][R], res_sum[GT][R];  // two chains (and the residual's), so latencies overlap
    for (int t = 0; t < GT; ++t)
      for (int r = 0; r < R; ++r) sum0[t][r] = sum1[t][r] = res_sum[t][r] = _mm512_setzero_si512();
    for (int c = 0; c < 8; c += 2) {
      __m512i x0[R], x1[R], y0[R], y1[R];
      for (int r = 0; r < R; ++r) {
        const int64_t at = ((m0 + r) * nb + b) * QK;
        x0[r] = broadcast4(act.q.data() + at, c);
        x1[r] = broadcast4(act.q.data() + at, c + 1);
        if (TWO) {
          y0[r] = broadcast4(act.q2.data() + at, c);
          y1[r] = broadcast4(act.q2.data() + at, c + 1);
        }
      }
      for (int t = 0; t < GT; ++t) {
        const uint8_t* p = qw + t * gstride + (b * 8 + c) * 64;
        __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
        for (int r = 0; r < R; ++r) {
          sum0[t][r] = _mm512_dpbusd_epi32(sum0[t][r], w0, x0[r]);
          sum1[t][r] = _mm512_dpbusd_epi32(sum1[t][r], w1, x1[r]);
          if (TWO) {
            res_sum[t][r] = _mm512_dpbusd_epi32(res_sum[t][r], w0, y0[r]);
            res_sum[t][r] = _mm512_dpbusd_epi32(res_sum[t][r], w1, y1[r]);
          }
        }
      }
    }
    for (int t = 0; t < GT; ++t) {
      const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + t * sstride + b * ROWS)));
      const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + t * sstride + b * ROWS)));
      for (int r = 0; r < R; ++r) {
        const int64_t i = (m0 + r) * nb + b;
        const float dx = act.d[i];
        float xsum = dx * act.isum[i];
        __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(sum0[t][r], sum1[t][r]));
        results[t][r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, _mm512_set1_ps(dx)), results[t][r]);
        if (TWO) {
          const float dx2 = act.d2[i];
          xsum += dx2 * act.isum2[i];
          results[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(res_sum[t][r]), _mm512_mul_ps(dw, _mm512_set1_ps(dx2)),
                                          results[t][r]);
        }
        results[t][r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xsum), results[t][r]);
      }
    }
  }
}

template <int GT, int R, bool TWO>
inline void run_groups(const uint8_t* qw, const at::Half* sc, const at::Half* mn, int64_t nb, const Q8Activations& act,
                       int64_t m0, int64_t g, float* result, int64_t N) {
  __m512 res[GT][R];
  group_dot<GT, R, TWO>(qw + g * nb * 512, sc + g * nb * ROWS, mn + g * nb * ROWS, nb, act, m0, res);
  for (int t = 0; t < GT; ++t)
    for (int r = 0; r < R; ++r) store_group(res[t][r], result, m0 + r, N, (g + t) * ROWS);
}

// Every row group in [begin, end) against every activation row: tiles of RT rows, then singles.
// With tiles, each row group meets every activation row while its few KB are in L1, so a batch reads
// the weights from memory once (a batched decode step costs little more than one row's).
template <int RT, bool TWO>
void run_range(const uint8_t* qw, const at::Half* sc, const at::Half* mn, int64_t nb, const Q8Activations& act,
               int64_t M, int64_t begin, int64_t end, float* result, int64_t N) {
  const int64_t tiled = M - M % RT;
  if (tiled > 0) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t m = 0; m < tiled; m += RT) run_groups<1, RT, TWO>(qw, sc, mn, nb, act, m, g, result, N);
      for (int64_t m = tiled; m < M; ++m) run_groups<1, 1, TWO>(qw, sc, mn, nb, act, m, g, result, N);
    }
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    int64_t g = begin;
    for (; g + 2 <= end; g += 2) run_groups<2, 1, TWO>(qw, sc, mn, nb, act, m, g, result, N);
    for (; g < end; ++g) run_groups<1, 1, TWO>(qw, sc, mn, nb, act, m, g, result, N);
  }
}


}  // namespace

void int8_gemv(const uint8_t* qw, const at::Half* sc, const at::Half* mn, int64_t nb, const Q8Activations& act,
               int64_t M, int64_t begin, int64_t end, float* result, int64_t N) {
  if (M > 1 && batched_available()) {  // several rows: AMX int8 tiles, same results (batched/batched.cpp)
    int8_batched_gemv(qw, sc, mn, nb, act, M, begin, end, result, N);
    return;
  }
  if (act.passes == 2) {
    run_range<MT2, true>(qw, sc, mn, nb, act, M, begin, end, result, N);
  } else {
    run_range<MT, false>(qw, sc, mn, nb, act, M, begin, end, result, N);
  }
}

namespace {

// The weight [N, K] in T (float or bf16), written in place: prefill's path, so one pass and no copy.
template <typename T>
void dequantize_into(const uint8_t* qw, const at::Half* sc, const at::Half* mn, int64_t nb, int64_t groups, int64_t N,
                     int64_t K, T* out) {
  // One row's block is 8 dwords 64 bytes apart: one gather, then bytes → 32 floats.
  const __m256i steps = _mm256_setr_epi32(0, 64, 128, 192, 256, 320, 384, 448);
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t rows = std::min<int64_t>(ROWS, N - g * ROWS);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* base = qw + g * nb * 512 + b * 512;
        for (int64_t r = 0; r < rows; ++r) {
          const __m512 d = _mm512_set1_ps(static_cast<float>(sc[(g * nb + b) * ROWS + r]));
          const __m512 m = _mm512_set1_ps(static_cast<float>(mn[(g * nb + b) * ROWS + r]));
          const __m256i bytes = _mm256_i32gather_epi32(reinterpret_cast<const int*>(base + r * 4), steps, 1);
          T* dst = out + (g * ROWS + r) * K + b * QK;
          const int64_t left = K - b * QK;
          // Multiply, then add (not fused): the same rounding as the reference and gguf's dequantize.
          const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(bytes)));
          const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(bytes, 1)));
          store16(dst, _mm512_add_ps(_mm512_mul_ps(q0, d), m), left);
          store16(dst + 16, _mm512_add_ps(_mm512_mul_ps(q1, d), m), left - 16);
        }
      }
    }
  });
}

}  // namespace

at::Tensor int8_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                           int64_t in_features, int64_t out_features, at::ScalarType dtype) {
  check_packed(qweight, scales, mins, in_features, out_features, 8);
  const int64_t groups = qweight.size(0), nb = qweight.size(1) / 512;
  const bool bf16 = dtype == at::kBFloat16;
  at::Tensor out = at::empty({out_features, in_features}, at::TensorOptions().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  if (bf16) {
    dequantize_into(qw, half_data(scales), half_data(mins), nb, groups, out_features, in_features,
                    out.data_ptr<at::BFloat16>());
  } else {
    dequantize_into(qw, half_data(scales), half_data(mins), nb, groups, out_features, in_features,
                    out.data_ptr<float>());
  }
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins, const std::optional<at::Tensor>& bias, int64_t in_features,
                       int64_t out_features, int64_t passes) {
  return packed_linear(x, qweight, scales, mins, bias, in_features, out_features, passes, 8, int8_gemv,
                       int8_dequantize);
}

}  // namespace tinyomni
