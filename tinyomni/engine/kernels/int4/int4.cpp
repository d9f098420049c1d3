// int4 weight-only linear: group 32, asymmetric (w = d*q + m, q in 0..15) as GGUF Q4_1 (Q4_0 is the
// case m = -8d), stored for the kernel with rows interleaved in groups of 16.
//
// Packed layout (reference.py's pack() builds it; its unpack() is the inverse):
//   qweight uint8 [N/16, blocks*256]: for row group g, block b, chunk c (0..3), row r (0..15), j (0..3),
//     byte (b*4 + c)*64 + r*4 + j = code(16g+r, 32b+4c+j) | code(16g+r, 32b+16+4c+j) << 4
//   scales, mins: fp16 bits (int16) [N/16, blocks*16], element b*16 + r for row 16g+r.
// Decode: the activation is quantized to int8 per block; one 64-byte load gives two 4-input steps
// of 16 rows (low and high nibbles), each one VNNI dpbusd (unsigned codes x broadcast signed bytes)
// into int32 lanes, one per row. Per block the 16 sums are scaled by d_w*d_x and the min adds
// m_w * d_x * sum(q_x).
#include "../common.h"

namespace tinyomni {

namespace {

// Dot products of GT row groups with R quantized activation rows; results[gt][r] holds 16 rows.
// TWO: the activations carry a second (residual) pass, met by the same unpacked weights.
// next: the following GT row groups (codes, scales, mins), prefetched while these are computed, or
// nullptr. Why: at one activation row the loop has ~15 cycles of work per 256 weight bytes, and the
// hardware prefetcher alone keeps too few cache misses in flight to hide L3's latency behind it;
// touching the next tile one block ahead took a 1-thread pass over SmolLM2's 66 MB of int4 layers
// from ~22 to ~27 GB/s (a standalone copy of this loop; diagnostics/gemv_bandwidth.py measures these
// kernels themselves).
template <int GT, int R, bool TWO>
inline void group_dot(const uint8_t* qw, const at::Half* scales, const at::Half* mins, int64_t nb,
                      const Q8Activations& act, int64_t m0, __m512 (&results)[GT][R], const uint8_t* next) {
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8(static_cast<char>(0xF0));
  const int64_t gstride = nb * 256, sstride = nb * ROWS;
  const char* next_scales = reinterpret_cast<const char*>(scales + GT * sstride);
  const char* next_mins = reinterpret_cast<const char*>(mins + GT * sstride);
  for (int t = 0; t < GT; ++t)
    for (int r = 0; r < R; ++r) results[t][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (next != nullptr) {  // block b's share of the next tile: GT*256 code bytes, GT*64 of scales and mins
      for (int c = 0; c < 4 * GT; ++c) _mm_prefetch(reinterpret_cast<const char*>(next) + (b * GT * 4 + c) * 64, _MM_HINT_T0);
      for (int64_t line = b * GT / 2; line < (b + 1) * GT / 2; ++line) {
        _mm_prefetch(next_scales + line * 64, _MM_HINT_T0);
        _mm_prefetch(next_mins + line * 64, _MM_HINT_T0);
      }
    }
    // Separate low/high-nibble chains so consecutive dpbusd do not wait on each other. The high
    // nibbles are masked in place (16 x the code, one instruction instead of a shift and a mask), so
    // hi_sum holds 16 x their dot product, exactly (|sum| < 2^19); one shift per block undoes it.
    __m512i lo_sum[GT][R], hi_sum[GT][R], res_sum[GT][R], res_hi[GT][R];
    for (int t = 0; t < GT; ++t)
      for (int r = 0; r < R; ++r) lo_sum[t][r] = hi_sum[t][r] = res_sum[t][r] = res_hi[t][r] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      __m512i xl[R], xh[R], xl2[R], xh2[R];
      for (int r = 0; r < R; ++r) {
        const int64_t at = ((m0 + r) * nb + b) * QK;
        xl[r] = broadcast4(act.q.data() + at, c);
        xh[r] = broadcast4(act.q.data() + at, c + 4);
        if (TWO) {
          xl2[r] = broadcast4(act.q2.data() + at, c);
          xh2[r] = broadcast4(act.q2.data() + at, c + 4);
        }
      }
      for (int t = 0; t < GT; ++t) {
        __m512i v = _mm512_loadu_si512(qw + t * gstride + (b * 4 + c) * 64);
        __m512i wl = _mm512_and_si512(v, low);
        __m512i wh = _mm512_and_si512(v, high);
        for (int r = 0; r < R; ++r) {
          lo_sum[t][r] = _mm512_dpbusd_epi32(lo_sum[t][r], wl, xl[r]);
          hi_sum[t][r] = _mm512_dpbusd_epi32(hi_sum[t][r], wh, xh[r]);
          if (TWO) {
            res_sum[t][r] = _mm512_dpbusd_epi32(res_sum[t][r], wl, xl2[r]);
            res_hi[t][r] = _mm512_dpbusd_epi32(res_hi[t][r], wh, xh2[r]);
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
        __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_sum[t][r], _mm512_srai_epi32(hi_sum[t][r], 4)));
        results[t][r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, _mm512_set1_ps(dx)), results[t][r]);
        if (TWO) {
          const float dx2 = act.d2[i];
          xsum += dx2 * act.isum2[i];
          const __m512i res = _mm512_add_epi32(res_sum[t][r], _mm512_srai_epi32(res_hi[t][r], 4));
          results[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(res), _mm512_mul_ps(dw, _mm512_set1_ps(dx2)), results[t][r]);
        }
        results[t][r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xsum), results[t][r]);
      }
    }
  }
}

// Row groups [g, g + GT) for activation rows [m0, m0 + R); prefetch: whether to fetch the next GT groups.
template <int GT, int R, bool TWO>
inline void run_groups(const uint8_t* qw, const at::Half* sc, const at::Half* mn, int64_t nb, const Q8Activations& act,
                       int64_t m0, int64_t g, float* result, int64_t N, bool prefetch = false) {
  __m512 res[GT][R];
  group_dot<GT, R, TWO>(qw + g * nb * 256, sc + g * nb * ROWS, mn + g * nb * ROWS, nb, act, m0, res,
                        prefetch ? qw + (g + GT) * nb * 256 : nullptr);
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
    for (; g + 2 <= end; g += 2) run_groups<2, 1, TWO>(qw, sc, mn, nb, act, m, g, result, N, g + 4 <= end);
    for (; g < end; ++g) run_groups<1, 1, TWO>(qw, sc, mn, nb, act, m, g, result, N);
  }
}


}  // namespace

void int4_gemv(const uint8_t* qw, const at::Half* sc, const at::Half* mn, int64_t nb, const Q8Activations& act,
               int64_t M, int64_t begin, int64_t end, float* result, int64_t N) {
  if (M > 1 && batched_available()) {  // several rows: AMX int8 tiles, same results (batched/batched.cpp)
    int4_batched_gemv(qw, sc, mn, nb, act, M, begin, end, result, N);
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
  // One row's block is 4 dwords 64 bytes apart: one gather, then nibbles → 32 floats.
  const __m128i steps = _mm_setr_epi32(0, 64, 128, 192);
  const __m128i low = _mm_set1_epi8(0x0F);
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t rows = std::min<int64_t>(ROWS, N - g * ROWS);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* base = qw + g * nb * 256 + b * 256;
        for (int64_t r = 0; r < rows; ++r) {
          const __m512 d = _mm512_set1_ps(static_cast<float>(sc[(g * nb + b) * ROWS + r]));
          const __m512 m = _mm512_set1_ps(static_cast<float>(mn[(g * nb + b) * ROWS + r]));
          const __m128i bytes = _mm_i32gather_epi32(reinterpret_cast<const int*>(base + r * 4), steps, 1);
          const __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
          T* dst = out + (g * ROWS + r) * K + b * QK;
          const int64_t left = K - b * QK;
          // Multiply, then add (not fused): the same rounding as the reference and gguf's dequantize.
          store16(dst, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d), m), left);
          store16(dst + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d), m), left - 16);
        }
      }
    }
  });
}

}  // namespace

at::Tensor int4_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                           int64_t in_features, int64_t out_features, at::ScalarType dtype) {
  check_packed(qweight, scales, mins, in_features, out_features, 4);
  const int64_t groups = qweight.size(0), nb = qweight.size(1) / 256;
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

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins, const std::optional<at::Tensor>& bias, int64_t in_features,
                       int64_t out_features, int64_t passes) {
  return packed_linear(x, qweight, scales, mins, bias, in_features, out_features, passes, 4, int4_gemv,
                       int4_dequantize);
}

}  // namespace tinyomni
