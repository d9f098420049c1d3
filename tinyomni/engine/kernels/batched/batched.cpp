// Batched decode: 2..16 activation rows against one int4 or int8 packed weight, on AMX int8 tiles.
//
// Why: the continuous-batching server decodes every active stream in one step, so each linear sees
// M = 2..16 rows. The VNNI GEMV (int4/int4.cpp, int8/int8.cpp) spends one dpbusd per weight load per
// row, so an 8-row step costs ~3x a 1-row one (compute-bound). Here one tdpbsud multiplies a block of
// 32 inputs of all M rows (A tile, M x 32 signed activation bytes) by 32 inputs of 16 weight rows
// (B tile, 8 x 64 unsigned code bytes), so the integer work no longer grows with M; what does grow is
// the per-block float epilogue (4 vector operations per row per block of 16 outputs, 7 with two
// passes) that VNNI pays too. Small batches stack blocks and passes into one product (see Plan).
//
// The packed layouts are already AMX's VNNI B layout (K/4 rows, each 4 consecutive inputs of 16 rows):
//   int8: block b is 512 contiguous bytes, tile row c = inputs 4c..4c+3: loaded straight from qweight;
//   int4: block b's 4 chunks of 64 bytes hold inputs 4c.. in the low nibbles (tile rows 0..3) and
//         16+4c.. in the high ones (tile rows 4..7): split into an L1 buffer first.
// Arithmetic per (row, block): the same as the GEMV's group_dot, operation for operation (int32 dot
// to float, times d_w*d_x, fused add; the residual pass likewise; then m_w * (d_x*isum [+ d2*isum2])),
// and blocks summed in the same order, so the results equal the GEMV's bit for bit.
//
// Tile state is per thread: every call loads its configuration (its Plan's shapes) and releases it, so it
// does not matter which other tile code (gemm/gemm.cpp) ran before on this thread. Linux must grant
// tile data once per process (arch_prctl ARCH_REQ_XCOMP_PERM); gemm.cpp asks the same for its GEMM
// (this file asks itself, so either works alone). batched_supported(): AMX-TILE + AMX-INT8 present
// and granted; batched_available(): supported and not switched off (set_batched_enabled(false), which
// ops.py does for TINYOMNI_BATCHED=0).
#include "../amx.h"
#include "../common.h"

#include <atomic>

#pragma GCC target("amx-tile,amx-int8")

namespace tinyomni {

namespace {

bool detect_amx_int8() { return amx_granted(1u << AMX_INT8_BIT); }

std::atomic<bool> batched_enabled{true};

// Tile registers (the intrinsics take literal numbers). Two products in flight: even ones use A0,
// B0, C0 (and C20 for a split residual pass), odd ones A20 (stacked) or A0 again, B1, C1 (C21); with
// split passes A20 holds the residual rows.
#define A0 0
#define A20 1
#define B0 2
#define B1 3
#define C0 4
#define C20 5
#define C1 6
#define C21 7

// Software prefetch distance for the packed weights (into L1). int8's B tiles are tile loads straight
// from qweight, which the hardware prefetchers served poorly: SmolLM2's 210 linears at 8 rows, two
// passes, 1 thread took 17.0 ms without, 14.0-14.6 ms with 2-4 KB ahead (loaded machine, alternating
// runs). int4's codes come in through vector loads, where it made no measurable difference.
constexpr int64_t AHEAD = 2048;

// Block b of an int4 row group as an int8 B tile at dst (512 bytes, 64 per tile row).
inline void split_nibbles(const uint8_t* block, uint8_t* dst) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m512i v = _mm512_loadu_si512(block + c * 64);
    _mm512_store_si512(dst + c * 64, _mm512_and_si512(v, low));
    _mm512_store_si512(dst + (4 + c) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
}

// What one call reads: the quantized activations with their per-(row, block) scalars, and the
// min-term factor xs = d*isum (+ d2*isum2), computed once per call as group_dot computes it.
struct Rows {
  const int8_t* q;
  const int8_t* q2;
  const float* d;
  const float* d2;
  const float* xs;
  int64_t nb, M;
};

// Adds block b's sums (c, and c2 for the residual pass: M rows of 16 int32) to the MR accumulators.
template <int MR, bool TWO>
__attribute__((always_inline)) inline void scale_block(const int32_t* c, const int32_t* c2, const at::Half* scales,
                                                       const at::Half* mins, const Rows& x, int64_t b,
                                                       __m512 (&acc)[MR]) {
  const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * ROWS)));
  const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + b * ROWS)));
  for (int m = 0; m < MR; ++m) {
    if (m >= x.M) break;
    const int64_t i = m * x.nb + b;
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(c + m * 16));
    acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, _mm512_set1_ps(x.d[i])), acc[m]);
    if (TWO) {
      const __m512 res = _mm512_cvtepi32_ps(_mm512_load_si512(c2 + m * 16));
      acc[m] = _mm512_fmadd_ps(res, _mm512_mul_ps(dw, _mm512_set1_ps(x.d2[i])), acc[m]);
    }
    acc[m] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x.xs[i]), acc[m]);
  }
}

// How one call lays out its tile products. A tile product takes up to 16 A rows and 64 inputs, but
// a block's sums must stay apart (each block has its own scales), so small batches stack several
// (block, pass) pieces into one product instead of paying a tile load, product and store for each
// (in a microbenchmark each of those cost about the same for 1 to 8 rows, ~1.5x that for 16):
//   KS = 2 blocks a product (K = 64): A row (j*P + p)*M + m holds pass p of row m's block 2u + j in
//     bytes 32j..32j+31 and zeros in the other half, so C row (j*P + p)*M + m is that block's dot;
//     the B tile is the two blocks' 16 rows (int8: 1 KB contiguous in qweight);
//   P = 2 passes stacked in rows (KS = 1 or 2) while KS*P*M <= 16; above, the residual pass is a second
//     product (A from q2, C2) against the same B tile (SPLIT_PASSES).
// The stacked A rows are built once per call (abuf); unstacked ones are read in place from act.
struct Plan {
  int ks = 1;                 // blocks per tile product
  bool stacked = false;       // A from abuf (stacked rows) rather than act.q
  bool split_passes = false;  // two passes as two products (M > 8)
  int64_t rows = 0;           // A and C rows per product
};

Plan make_plan(int64_t M, int passes, int64_t nb) {
  Plan plan;
  if (passes == 2 && M > 8) {
    plan.split_passes = true;
    plan.rows = M;
    return plan;
  }
  plan.ks = (nb % 2 == 0 && 2 * passes * M <= 16) ? 2 : 1;
  plan.stacked = plan.ks == 2 || passes == 2;
  plan.rows = plan.ks * passes * M;
  return plan;
}

TileConfig make_config(const Plan& plan) {
  TileConfig c;
  const auto rows = static_cast<uint8_t>(plan.rows);
  for (int t : {A0, A20}) c.rows[t] = rows, c.colsb[t] = static_cast<uint16_t>(plan.ks * QK);
  for (int t : {B0, B1}) c.rows[t] = static_cast<uint8_t>(plan.ks * QK / 4), c.colsb[t] = 64;
  for (int t : {C0, C20, C1, C21}) c.rows[t] = rows, c.colsb[t] = 64;
  return c;
}

// The stacked A rows for every product of a call: product u's rows at abuf + u*rows*ks*32.
void stack_rows(const Rows& x, int passes, const Plan& plan, std::vector<int8_t>& abuf) {
  const int64_t width = plan.ks * QK, units = x.nb / plan.ks, M = x.M;
  const int64_t size = units * plan.rows * width;
  if (static_cast<int64_t>(abuf.size()) < size) abuf.resize(size);
  if (plan.ks == 2) std::memset(abuf.data(), 0, size);  // the other block's half of each row
  for (int64_t u = 0; u < units; ++u)
    for (int j = 0; j < plan.ks; ++j)
      for (int p = 0; p < passes; ++p)
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* src = (p == 0 ? x.q : x.q2) + (m * x.nb + u * plan.ks + j) * QK;
          std::memcpy(abuf.data() + (u * plan.rows + (j * passes + p) * M + m) * width + j * QK, src, QK);
        }
}

// Product u's tile work into C (and C2 with split passes), stored to cbuf slot u % 4. A is register
// A0 for even u and A20 for odd ones (with split passes A20 holds the residual's rows instead).
#define TILE_STEP(u, A, B, C, C2)                                               \
  do {                                                                          \
    int32_t* slot = cbuf + ((u) & 3) * 512;                                     \
    _tile_loadd(B, weights(u), 64);                                             \
    if (SPLIT) {                                                                \
      _tile_loadd(A0, x.q + (u) * QK, x.nb * QK);                               \
      _tile_zero(C);                                                            \
      _tile_dpbsud(C, A0, B);                                                   \
      _tile_loadd(A20, x.q2 + (u) * QK, x.nb * QK);                             \
      _tile_zero(C2);                                                           \
      _tile_dpbsud(C2, A20, B);                                                 \
      _tile_stored(C, slot, 64);                                                \
      _tile_stored(C2, slot + 256, 64);                                         \
    } else {                                                                    \
      if (STACKED) _tile_loadd(A, abuf + (u) * astep, KS * QK);                 \
      else _tile_loadd(A, x.q + (u) * QK, x.nb * QK);                           \
      _tile_zero(C);                                                            \
      _tile_dpbsud(C, A, B);                                                    \
      _tile_stored(C, slot, 64);                                                \
    }                                                                           \
  } while (0)

// One row group (16 outputs) against all M rows, software-pipelined by two products: product u's
// int4 codes are split two products before its tile load, and its sums scaled two products after
// their tile store. A tile load of bytes just written by vector stores, or a vector load of a
// just-stored tile, waits for the stores to reach L1 (~100 cycles a block when back to back,
// measured), so each is kept two products from its use; in between, tile and vector work overlap.
template <int BITS, int MR, bool TWO, int KS, bool STACKED, bool SPLIT>
void group(const uint8_t* qw, const at::Half* scales, const at::Half* mins, const Rows& x, const int8_t* abuf,
           int64_t astep, uint8_t* wbuf, int32_t* cbuf, __m512 (&acc)[MR]) {
  constexpr int64_t BLOCK = BITS == 4 ? 256 : 512;  // packed bytes per block of a row group
  constexpr int P = TWO ? 2 : 1;
  const int64_t units = x.nb / KS;
  // B tile source for product u: int8 in place; int4 split into wbuf slot u % 4.
  auto weights = [&](int64_t u) -> const uint8_t* {
    if (BITS == 8) return qw + u * KS * BLOCK;
    return wbuf + (u & 3) * 1024;
  };
  auto prepare = [&](int64_t u) {
    for (int l = 0; l < KS * BLOCK / 64; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(qw + u * KS * BLOCK + AHEAD + l * 64), _MM_HINT_T0);
    if (BITS == 4 && u < units)
      for (int j = 0; j < KS; ++j) split_nibbles(qw + (u * KS + j) * BLOCK, wbuf + (u & 3) * 1024 + j * 512);
  };
  auto finish = [&](int64_t u) {
    const int32_t* slot = cbuf + (u & 3) * 512;
    for (int j = 0; j < KS; ++j) {
      const int32_t* c = SPLIT ? slot : slot + j * P * x.M * 16;
      const int32_t* c2 = SPLIT ? slot + 256 : c + x.M * 16;
      scale_block<MR, TWO>(c, c2, scales, mins, x, u * KS + j, acc);
    }
  };
  prepare(0);
  prepare(1);
  int64_t u = 0;
  for (; u + 2 <= units; u += 2) {
    prepare(u + 2);
    TILE_STEP(u, A0, B0, C0, C20);
    if (u >= 2) finish(u - 2);
    prepare(u + 3);
    TILE_STEP(u + 1, A20, B1, C1, C21);
    if (u >= 2) finish(u - 1);
  }
  if (u < units) {  // odd product count: the last one
    TILE_STEP(u, A0, B0, C0, C20);
  }
  for (int64_t f = std::max<int64_t>(0, u - 2); f < units; ++f) finish(f);
}

#undef TILE_STEP

template <int BITS, int MR, bool TWO, int KS, bool STACKED, bool SPLIT>
void run(const uint8_t* qw, const at::Half* sc, const at::Half* mn, const Rows& x, const int8_t* abuf, int64_t astep,
         int64_t begin, int64_t end, float* result, int64_t N) {
  constexpr int64_t BLOCK = BITS == 4 ? 256 : 512;
  alignas(64) uint8_t wbuf[4 * 1024];
  alignas(64) int32_t cbuf[4 * 512];
  for (int64_t g = begin; g < end; ++g) {
    __m512 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    group<BITS, MR, TWO, KS, STACKED, SPLIT>(qw + g * x.nb * BLOCK, sc + g * x.nb * ROWS, mn + g * x.nb * ROWS, x,
                                             abuf, astep, wbuf, cbuf, acc);
    for (int m = 0; m < MR; ++m) {
      if (m >= x.M) break;
      store_group(acc[m], result, m, N, g * ROWS);
    }
  }
}

template <int BITS>
void batched_gemv(const uint8_t* qw, const at::Half* sc, const at::Half* mn, int64_t nb, const Q8Activations& act,
                  int64_t M, int64_t begin, int64_t end, float* result, int64_t N) {
  TORCH_CHECK(M >= 1 && M <= 16, "the batched kernel takes 1..16 rows, got ", M);
  const bool two = act.passes == 2;
  // The min term's per-(row, block) factor, rounded as group_dot rounds it (mul, mul, add).
  thread_local std::vector<float> xs;
  if (static_cast<int64_t>(xs.size()) < M * nb) xs.resize(M * nb);
  for (int64_t i = 0; i < M * nb; ++i) {
    float s = act.d[i] * act.isum[i];
    if (two) s += act.d2[i] * act.isum2[i];
    xs[i] = s;
  }
  const Rows x{act.q.data(), two ? act.q2.data() : nullptr, act.d.data(), two ? act.d2.data() : nullptr, xs.data(),
               nb, M};
  const Plan plan = make_plan(M, act.passes, nb);
  thread_local std::vector<int8_t> abuf;
  if (plan.stacked) stack_rows(x, act.passes, plan, abuf);
  const int64_t astep = plan.rows * plan.ks * QK;
  const TileConfig config = make_config(plan);
  _tile_loadconfig(&config);
  const int8_t* a = abuf.data();
  // Row counts round up to 4, 8 or 16 accumulators (the rows past M are skipped).
#define RUN(MR, TWO, KS, STACKED, SPLIT) run<BITS, MR, TWO, KS, STACKED, SPLIT>(qw, sc, mn, x, a, astep, begin, end, result, N)
  if (plan.split_passes) {
    RUN(16, true, 1, false, true);
  } else if (two) {
    if (plan.ks == 2) RUN(4, true, 2, true, false);  // M <= 4
    else if (M <= 4) RUN(4, true, 1, true, false);   // odd block count
    else RUN(8, true, 1, true, false);
  } else if (plan.ks == 2) {
    if (M <= 4) RUN(4, false, 2, true, false);
    else RUN(8, false, 2, true, false);
  } else {
    if (M <= 4) RUN(4, false, 1, false, false);
    else if (M <= 8) RUN(8, false, 1, false, false);
    else RUN(16, false, 1, false, false);
  }
#undef RUN
  _tile_release();
}

}  // namespace

bool batched_supported() {
  static const bool ok = detect_amx_int8();
  return ok;
}

void set_batched_enabled(bool flag) { batched_enabled = flag; }

bool batched_available() { return batched_enabled.load(std::memory_order_relaxed) && batched_supported(); }

void int4_batched_gemv(const uint8_t* qw, const at::Half* sc, const at::Half* mn, int64_t nb, const Q8Activations& act,
                       int64_t M, int64_t begin, int64_t end, float* result, int64_t N) {
  batched_gemv<4>(qw, sc, mn, nb, act, M, begin, end, result, N);
}

void int8_batched_gemv(const uint8_t* qw, const at::Half* sc, const at::Half* mn, int64_t nb, const Q8Activations& act,
                       int64_t M, int64_t begin, int64_t end, float* result, int64_t N) {
  batched_gemv<8>(qw, sc, mn, nb, act, M, begin, end, result, N);
}

// Direct entry point for tests and benchmarks: the int4/int8 linear's decode path with this kernel,
// whatever the dispatch does (the caller checks batched_supported()).
at::Tensor batched_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& mins, const std::optional<at::Tensor>& bias, int64_t in_features,
                          int64_t out_features, int64_t bits, int64_t passes) {
  TORCH_CHECK(batched_supported(), "the AMX int8 batched kernel is not available on this CPU (or the OS refused tile data)");
  const int64_t M = in_features > 0 ? x.numel() / in_features : 0;
  TORCH_CHECK(M >= 1 && M <= GEMV_MAX_ROWS, "the batched kernel takes 1..", GEMV_MAX_ROWS, " rows, got ", M);
  return packed_linear(x, qweight, scales, mins, bias, in_features, out_features, passes, bits,
                       bits == 4 ? int4_batched_gemv : int8_batched_gemv, nullptr);
}

}  // namespace tinyomni
