// Prefill's quantized GEMM: many activation rows against one int4 or int8 packed weight, on AMX tiles.
//
// Why: a prompt of M tokens used to dequantize the whole weight to a float tensor and then run a float
// GEMM (oneDNN), so every prompt wrote and re-read every weight in memory, and fp32 activations ran at
// AVX-512 FMA speed. Here one row group (16 weight rows) at a time is dequantized into a per-thread
// buffer in AMX's bf16 B-tile layout (row k/2 holds inputs k, k+1 of the 16 rows) and reused for
// every 16-row activation tile; tdpbf16ps multiplies 16x32 activations by 32x16 weights into fp32
// sums that stay in tile registers for the whole input dimension.
//   bf16 activations: the weights rounded to bf16 as the float path rounded them, so the result is the
//     float path's (bf16 x bf16, fp32 sums) up to summation order;
//   fp32 activations: activations and weights each split into bf16 hi + lo (x = hi + lo to ~2^-17),
//     and hi*hi + hi*lo + lo*hi summed in fp32: ~2^-16 relative per product, about fp32's float path
//     (the dropped lo*lo is ~2^-17 of it), three tile products where bf16 needs one.
// The weight codes are dequantized with the same arithmetic as dequantize_into (multiply, then add).
// (An int8-activation variant, tdpbsud with per-block scales applied in AVX-512 after each block of
// 32 inputs, was measured first: its per-block epilogue made it 1.0-1.5x the float path on fp32 and
// slower on bf16, and it changes fp32 prefill's arithmetic to the decode kernels' int8 activations.)
//
// Each thread loads the tile configuration itself (tile state is per thread) and releases it after;
// the process asks Linux once for permission to use tile data (arch_prctl ARCH_REQ_XCOMP_PERM).
// Without AMX (or without that permission) gemm_supported() is false; when it is, or when switched off
// by set_gemm_enabled(false), gemm_available() is false and the linears keep dequantize + float GEMM.
#include "../amx.h"
#include "../common.h"

#include <atomic>

#pragma GCC target("amx-tile,amx-bf16,avx512bf16")

namespace tinyomni {

namespace {

bool detect_amx() {
  if (!amx_granted(1u << AMX_BF16_BIT)) return false;
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);  // AVX512_BF16 (vcvtne2ps2bf16)
}

// Tile registers (GCC's tile intrinsics take the register number as a literal). bf16 activations:
// four sums (2 activation tiles x 2 row groups), two activation tiles, two weight tiles. fp32: two sums
// (2 activation tiles x 1 row group), hi and lo of two activation tiles and of one weight tile.
#define S00 0
#define S01 1
#define S10 2
#define S11 3
#define X0 4
#define X1 5
#define W0 6
#define W1 7
#define XH0 2
#define XL0 3
#define XH1 4
#define XL1 5
#define WH 6
#define WL 7

TileConfig make_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;  // sums 16x16 fp32; inputs 16 x 32 bf16
  return c;
}

inline __m512 bf16_to_float(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// Rounds 32 floats (a: first 16, b: last 16) to bf16 at hi, to nearest even as a cast does (weights
// and activations are normal numbers), and with SPLIT the remainders' bf16 at lo.
template <bool SPLIT>
inline void store_bf16(__m512 a, __m512 b, at::BFloat16* hi, at::BFloat16* lo) {
  const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
  _mm512_storeu_si512(hi, h);
  if (SPLIT) {
    const __m512 ra = _mm512_sub_ps(a, bf16_to_float(_mm512_castsi512_si256(h)));
    const __m512 rb = _mm512_sub_ps(b, bf16_to_float(_mm512_extracti64x4_epi64(h, 1)));
    _mm512_storeu_si512(lo, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(rb, ra)));
  }
}

// 64 bytes of codes for inputs 4c..4c+3 of 16 weight rows (dword r = row r) → B-tile rows 2c and
// 2c+1 (inputs 4c, 4c+1 and 4c+2, 4c+3 of each row, as bf16 pairs). d and m are the block's scales
// and mins duplicated per pair: *_lo for rows 0..7, *_hi for rows 8..15.
template <bool SPLIT>
inline void dequantize_step(__m512i codes, __m512 d_lo, __m512 d_hi, __m512 m_lo, __m512 m_hi, at::BFloat16* hi,
                            at::BFloat16* lo) {
  for (int half = 0; half < 2; ++half) {
    const __m512i words = half == 0 ? codes : _mm512_srli_epi32(codes, 16);
    const __m256i bytes = _mm512_cvtepi32_epi16(words);  // 32 bytes: row 0 input a, b, row 1 a, b, ...
    const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(bytes)));
    const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(bytes, 1)));
    // Multiply, then add (not fused): the rounding of dequantize_into and the reference.
    const __m512 w0 = _mm512_add_ps(_mm512_mul_ps(q0, d_lo), m_lo);
    const __m512 w1 = _mm512_add_ps(_mm512_mul_ps(q1, d_hi), m_hi);
    store_bf16<SPLIT>(w0, w1, hi + half * 32, lo + half * 32);
  }
}

// Row group g's weights as bf16 B tiles: block b at hi + b*512 (16 rows of 32 bf16); with SPLIT the
// remainders at lo + b*512.
template <bool SPLIT>
void dequantize_group(const uint8_t* qw, const at::Half* sc, const at::Half* mn, int64_t nb, int bits,
                      at::BFloat16* hi, at::BFloat16* lo) {
  const __m512i lo_idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + b * ROWS)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + b * ROWS)));
    const __m512 d_lo = _mm512_permutexvar_ps(lo_idx, d), d_hi = _mm512_permutexvar_ps(hi_idx, d);
    const __m512 m_lo = _mm512_permutexvar_ps(lo_idx, m), m_hi = _mm512_permutexvar_ps(hi_idx, m);
    at::BFloat16* h = hi + b * 512;
    at::BFloat16* l = lo + b * 512;
    if (bits == 4) {  // chunk c: low nibbles are inputs 4c.., high ones 16+4c..
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(qw + (b * 4 + c) * 64);
        dequantize_step<SPLIT>(_mm512_and_si512(v, low), d_lo, d_hi, m_lo, m_hi, h + c * 64, l + c * 64);
        dequantize_step<SPLIT>(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), d_lo, d_hi, m_lo, m_hi,
                               h + (4 + c) * 64, l + (4 + c) * 64);
      }
    } else {
      for (int c = 0; c < 8; ++c)
        dequantize_step<SPLIT>(_mm512_loadu_si512(qw + (b * 8 + c) * 64), d_lo, d_hi, m_lo, m_hi, h + c * 64,
                               l + c * 64);
    }
  }
}

// Stores a 16x16 sum tile's valid rows (from r0, before M) and columns (from c0, before N) with bias.
template <typename T>
inline void finish_tile(const float* sums, int64_t r0, int64_t M, int64_t c0, int64_t N, const float* bias, T* out) {
  const int64_t left = N - c0, valid = std::min<int64_t>(16, M - r0);
  const __mmask16 keep = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1);
  const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(keep, bias + c0) : _mm512_setzero_ps();
  for (int64_t r = 0; r < valid; ++r) store16(out + (r0 + r) * N + c0, _mm512_add_ps(_mm512_load_ps(sums + r * 16), bv), left);
}

// bf16: activation tiles [m0, m0 + 16*MT) against GT row groups' weight tiles, over all blocks.
template <int MT, int GT>
void bf16_tiles(const at::BFloat16* x, int64_t nb, const at::BFloat16* const (&w)[2], int64_t m0, int64_t M,
                int64_t n0, int64_t N, const float* bias, at::BFloat16* out) {
  const int64_t stride = nb * QK * 2;  // bytes between padded activation rows
  _tile_zero(S00);
  if (GT == 2) _tile_zero(S01);
  if (MT == 2) _tile_zero(S10);
  if (MT == 2 && GT == 2) _tile_zero(S11);
  for (int64_t b = 0; b < nb; ++b) {
    _tile_loadd(X0, x + m0 * nb * QK + b * QK, stride);
    _tile_loadd(W0, w[0] + b * 512, 64);
    _tile_dpbf16ps(S00, X0, W0);
    if (MT == 2) {
      _tile_loadd(X1, x + (m0 + 16) * nb * QK + b * QK, stride);
      _tile_dpbf16ps(S10, X1, W0);
    }
    if (GT == 2) {
      _tile_loadd(W1, w[1] + b * 512, 64);
      _tile_dpbf16ps(S01, X0, W1);
      if (MT == 2) _tile_dpbf16ps(S11, X1, W1);
    }
  }
  alignas(64) float sums[4][16 * 16];
  _tile_stored(S00, sums[0], 64);
  if (GT == 2) _tile_stored(S01, sums[1], 64);
  if (MT == 2) _tile_stored(S10, sums[2], 64);
  if (MT == 2 && GT == 2) _tile_stored(S11, sums[3], 64);
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < GT; ++j) finish_tile(sums[i * 2 + j], m0 + 16 * i, M, n0 + 16 * j, N, bias, out);
}

// fp32: activation tiles [m0, m0 + 16*MT) (hi xh, lo xl) against one row group (hi wh, lo wl).
template <int MT>
void split_tiles(const at::BFloat16* xh, const at::BFloat16* xl, int64_t nb, const at::BFloat16* wh,
                 const at::BFloat16* wl, int64_t m0, int64_t M, int64_t n0, int64_t N, const float* bias, float* out) {
  const int64_t stride = nb * QK * 2;
  const int64_t a0 = m0 * nb * QK, a1 = (m0 + 16) * nb * QK;
  _tile_zero(S00);
  if (MT == 2) _tile_zero(S01);
  for (int64_t b = 0; b < nb; ++b) {
    _tile_loadd(WH, wh + b * 512, 64);
    _tile_loadd(WL, wl + b * 512, 64);
    _tile_loadd(XH0, xh + a0 + b * QK, stride);
    _tile_loadd(XL0, xl + a0 + b * QK, stride);
    _tile_dpbf16ps(S00, XH0, WH);
    _tile_dpbf16ps(S00, XH0, WL);
    _tile_dpbf16ps(S00, XL0, WH);
    if (MT == 2) {
      _tile_loadd(XH1, xh + a1 + b * QK, stride);
      _tile_loadd(XL1, xl + a1 + b * QK, stride);
      _tile_dpbf16ps(S01, XH1, WH);
      _tile_dpbf16ps(S01, XH1, WL);
      _tile_dpbf16ps(S01, XL1, WH);
    }
  }
  alignas(64) float sums[2][16 * 16];
  _tile_stored(S00, sums[0], 64);
  if (MT == 2) _tile_stored(S01, sums[1], 64);
  for (int i = 0; i < MT; ++i) finish_tile(sums[i], m0 + 16 * i, M, n0, N, bias, out);
}

struct Weights {
  const uint8_t* qw;
  const at::Half* sc;
  const at::Half* mn;
  int64_t nb, groups, N;
  int bits;
  int64_t group_bytes() const { return nb * (bits == 4 ? 256 : 512); }
};

void run_bf16(const Weights& W, const at::BFloat16* x, int64_t M, const float* bias, at::BFloat16* out) {
  static const TileConfig config = make_config();
  const int64_t nb = W.nb, pairs = (W.groups + 1) / 2, tiles = (M + 15) / 16;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    _tile_loadconfig(&config);
    thread_local std::vector<at::BFloat16> buffer;
    if (static_cast<int64_t>(buffer.size()) < 2 * nb * 512) buffer.resize(2 * nb * 512);
    const at::BFloat16* w[2] = {buffer.data(), buffer.data() + nb * 512};
    for (int64_t p = begin; p < end; ++p) {
      const int64_t g = 2 * p, gt = std::min<int64_t>(2, W.groups - g);
      for (int64_t j = 0; j < gt; ++j)
        dequantize_group<false>(W.qw + (g + j) * W.group_bytes(), W.sc + (g + j) * nb * ROWS,
                                W.mn + (g + j) * nb * ROWS, nb, W.bits, buffer.data() + j * nb * 512, nullptr);
      int64_t t = 0;
      for (; t + 2 <= tiles; t += 2) {
        if (gt == 2) bf16_tiles<2, 2>(x, nb, w, 16 * t, M, g * ROWS, W.N, bias, out);
        else bf16_tiles<2, 1>(x, nb, w, 16 * t, M, g * ROWS, W.N, bias, out);
      }
      if (t < tiles) {
        if (gt == 2) bf16_tiles<1, 2>(x, nb, w, 16 * t, M, g * ROWS, W.N, bias, out);
        else bf16_tiles<1, 1>(x, nb, w, 16 * t, M, g * ROWS, W.N, bias, out);
      }
    }
    _tile_release();
  });
}

void run_split(const Weights& W, const at::BFloat16* xh, const at::BFloat16* xl, int64_t M, const float* bias,
               float* out) {
  static const TileConfig config = make_config();
  const int64_t nb = W.nb, tiles = (M + 15) / 16;
  at::parallel_for(0, W.groups, 1, [&](int64_t begin, int64_t end) {
    _tile_loadconfig(&config);
    thread_local std::vector<at::BFloat16> buffer;
    if (static_cast<int64_t>(buffer.size()) < 2 * nb * 512) buffer.resize(2 * nb * 512);
    at::BFloat16* wh = buffer.data();
    at::BFloat16* wl = buffer.data() + nb * 512;
    for (int64_t g = begin; g < end; ++g) {
      dequantize_group<true>(W.qw + g * W.group_bytes(), W.sc + g * nb * ROWS, W.mn + g * nb * ROWS, nb, W.bits, wh, wl);
      int64_t t = 0;
      for (; t + 2 <= tiles; t += 2) split_tiles<2>(xh, xl, nb, wh, wl, 16 * t, M, g * ROWS, W.N, bias, out);
      if (t < tiles) split_tiles<1>(xh, xl, nb, wh, wl, 16 * t, M, g * ROWS, W.N, bias, out);
    }
    _tile_release();
  });
}

// x [M, K] (fp32 or bf16) as bf16 rows of blocks*32 values, M rounded up to 16, zeros in the padding
// (the tiles read whole blocks and whole 16-row tiles): hi, and with SPLIT the remainder lo. The
// calling thread's scratch, grown, never freed.
template <bool SPLIT, typename T>
std::pair<const at::BFloat16*, const at::BFloat16*> padded_activations(const T* src, int64_t M, int64_t K, int64_t nb) {
  thread_local std::vector<at::BFloat16> hi, lo;
  const int64_t width = nb * QK, rows = (M + 15) / 16 * 16;
  if (static_cast<int64_t>(hi.size()) < rows * width) hi.resize(rows * width);
  if (SPLIT && static_cast<int64_t>(lo.size()) < rows * width) lo.resize(rows * width);
  at::BFloat16* h = hi.data();
  at::BFloat16* l = lo.data();
  at::parallel_for(0, rows, 32, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      at::BFloat16* hr = h + m * width;
      if (m >= M) {
        std::memset(static_cast<void*>(hr), 0, width * sizeof(at::BFloat16));
        if (SPLIT) std::memset(static_cast<void*>(l + m * width), 0, width * sizeof(at::BFloat16));
        continue;
      }
      const T* row = src + m * K;
      if (!SPLIT) {  // bf16 in, bf16 out: a copy
        std::memcpy(static_cast<void*>(hr), row, K * sizeof(T));
        std::memset(static_cast<void*>(hr + K), 0, (width - K) * sizeof(at::BFloat16));
        continue;
      }
      for (int64_t k = 0; k < width; k += 32) {
        const int64_t left = K - k;
        const __mmask16 m0 = static_cast<__mmask16>(left >= 16 ? 0xFFFF : left <= 0 ? 0 : (1u << left) - 1);
        const __mmask16 m1 = static_cast<__mmask16>(left >= 32 ? 0xFFFF : left <= 16 ? 0 : (1u << (left - 16)) - 1);
        const float* f = reinterpret_cast<const float*>(row);
        store_bf16<true>(_mm512_maskz_loadu_ps(m0, f + k), _mm512_maskz_loadu_ps(m1, f + k + 16), hr + k,
                         l + m * width + k);
      }
    }
  });
  return {h, l};
}

}  // namespace

bool gemm_supported() {
  static const bool ok = detect_amx();
  return ok;
}

namespace {
std::atomic<bool> gemm_enabled{true};
}  // namespace

void set_gemm_enabled(bool flag) { gemm_enabled = flag; }

bool gemm_available() { return gemm_enabled && gemm_supported(); }

at::Tensor gemm_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                       const std::optional<at::Tensor>& bias, int64_t in_features, int64_t out_features, int64_t bits) {
  check_packed(qweight, scales, mins, in_features, out_features, bits);
  at::Tensor x2d = as_matrix(x, in_features);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return quantized_gemm(x2d, qweight, scales, mins, bias, out_features, bits).view(shape);
}

at::Tensor quantized_gemm(const at::Tensor& x2d, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& mins, const std::optional<at::Tensor>& bias, int64_t out_features,
                          int64_t bits) {
  TORCH_CHECK(gemm_supported(), "the AMX GEMM is not available on this CPU (or the OS refused tile data)");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  const int64_t M = x2d.size(0), K = x2d.size(1);
  const Weights W{qweight.data_ptr<uint8_t>(), half_data(scales), half_data(mins),
                  qweight.size(1) / (bits == 4 ? 256 : 512), qweight.size(0), out_features, static_cast<int>(bits)};
  // The bias in the activations' dtype first, as the float path (at::linear) adds it.
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias->to(x2d.scalar_type()).to(at::kFloat).contiguous();
  const float* bp = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({M, out_features}, x2d.options());
  if (out.scalar_type() == at::kBFloat16) {
    const auto x = padded_activations<false>(x2d.data_ptr<at::BFloat16>(), M, K, W.nb);
    run_bf16(W, x.first, M, bp, out.data_ptr<at::BFloat16>());
  } else {
    const auto x = padded_activations<true>(x2d.data_ptr<float>(), M, K, W.nb);
    run_split(W, x.first, x.second, M, bp, out.data_ptr<float>());
  }
  return out;
}

}  // namespace tinyomni
