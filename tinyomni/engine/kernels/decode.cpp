// The fused one-token decode step (see decode.h for what and why).
#include "decode.h"

#include <omp.h>

#include <cmath>
#include <limits>
#include <utility>

namespace tinyomni {

namespace {

enum { Q, K, V, O, GATE, UP, DOWN, PER_LAYER };

inline float bf16_round(float v) { return static_cast<float>(c10::BFloat16(v)); }  // nearest even, as a cast
template <bool BF>
inline float R(float v) {
  return BF ? bf16_round(v) : v;
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

// 16 values of a cache row (float or bf16) as floats; n < 16 loads that many, zeros after.
inline __m512 load16(const float* p, int64_t n) {
  return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
inline __m512 load16(const at::BFloat16* p, int64_t n) {
  const __m256i raw = n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                              : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The mask of the first n lanes (all 16 when n >= 16): loads and stores of a row's tail.
inline __mmask16 first(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// Round each lane to bfloat16, nearest even, kept as a float: c10::BFloat16's rounding for the finite
// values activations are, 16 at a time.
inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
template <bool BF>
inline __m512 RV(__m512 v) {
  return BF ? round_bf16(v) : v;
}

// e^x in 16 lanes, to about 1 ulp (PyTorch's own vectorised exp differs from std::exp as much):
// x = n ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation < 1e-8
// relative), times 2^n by scalef. Inputs are clamped to [-120, 89]: e^-120 is 0 in float, as
// e^-inf must be (masked scores), and e^89 overflows to inf, as std::exp's does.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-120.0f)), _mm512_set1_ps(89.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts, so r is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// silu(g) * u into h, n values, rounded where the eager MLP stores (silu's output, the product).
// Vectorised: SmolLM2's 1536 values took 3.8 µs with scalar std::exp, 0.5 µs so (1 thread); with
// the softmax's ~1300 exps a layer that was ~0.2 ms of serial work in every 30-layer step.
template <bool BF>
void silu_mul(const float* g, const float* u, int64_t n, float* h) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = first(n - i);
    const __m512 gi = _mm512_maskz_loadu_ps(k, g + i), ui = _mm512_maskz_loadu_ps(k, u + i);
    const __m512 s = RV<BF>(_mm512_div_ps(gi, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gi)))));
    _mm512_mask_storeu_ps(h + i, k, RV<BF>(_mm512_mul_ps(s, ui)));
  }
}

// Softmax over s[0, n) in float, in place, the probabilities rounded to the activation dtype.
template <bool BF>
void softmax(float* s, int64_t n) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < n; t += 16) mx = _mm512_mask_max_ps(mx, first(n - t), mx, _mm512_maskz_loadu_ps(first(n - t), s + t));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = first(n - t);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), m));
    sum = _mm512_mask_add_ps(sum, k, sum, e);
    _mm512_mask_storeu_ps(s + t, k, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = first(n - t);
    _mm512_mask_storeu_ps(s + t, k, RV<BF>(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + t), inv)));
  }
}

void gemv_one(const PackedLinear& w, const Q8Activations& act, int64_t M, int64_t begin, int64_t end, float* out) {
  if (w.kind == 4) {
    int4_gemv(w.qw, w.scales, w.mins, w.blocks, act, M, begin, end, out, w.out);
  } else {
    int8_gemv(w.qw, w.scales, w.mins, w.blocks, act, M, begin, end, out, w.out);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(load16(a + i, n - i), load16(b + i, n - i), acc);
  return _mm512_reduce_add_ps(acc);
}

constexpr int64_t MAX_RANK = 512;

// The linear's epilogue for output rows [j0, j1) of its M rows: bias in float, then its output
// dtype; then a LoRA adapter's B (A x) from `a` = A x [M, rank], rounded where the eager
// LoRAQuantLinear's ops store their outputs (B (A x), the product with scaling, the sum).
template <bool BF>
void epilogue(const PackedLinear& w, const float* a, int64_t M, int64_t j0, int64_t j1, float* y) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = y + m * w.out;
    for (int64_t j = j0; j < j1; ++j) row[j] = R<BF>(row[j] + (w.bias ? w.bias[j] : 0.0f));
    if (!w.lora_a) continue;
    const float* am = a + m * w.rank;
    for (int64_t j = j0; j < j1; ++j)
      row[j] = R<BF>(row[j] + R<BF>(R<BF>(dot(w.lora_b + j * w.rank, am, w.rank)) * w.scaling));
  }
}

// Thread tid's share [begin, end) of n items cut into nt runs of a multiple of `grain` items.
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t grain, int tid, int nt) {
  int64_t per = (n + nt - 1) / nt;
  per = (per + grain - 1) / grain * grain;
  const int64_t begin = std::min(n, tid * per);
  return {begin, std::min(n, begin + per)};
}

// This thread's share of out_i = act · W_i^T (+ bias_i) (+ LoRA_i(x)) for up to three weights that
// share one input x (`act` is x quantized): the row groups of all of them cut evenly, so each thread
// gets an even part of the whole layer part, and finishes its rows there (no barrier inside). An
// adapter's A x (rank * in multiply-adds a row, small) is computed by every thread into its own
// `lora` (M * max_rank per weight), which saves a barrier.
template <bool BF>
void gemv_share(const float* x, const Q8Activations& act, int64_t M, int n, const PackedLinear* const* ws,
                float* const* outs, float* lora, int64_t max_rank, int tid, int nt) {
  int64_t offsets[4] = {0, 0, 0, 0};
  for (int i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + ws[i]->groups;
  const auto [begin, end] = share(offsets[n], GROUP_GRAIN, tid, nt);
  for (int i = 0; i < n; ++i) {
    const int64_t lo = std::max(begin, offsets[i]), hi = std::min(end, offsets[i + 1]);
    if (lo >= hi) continue;
    const PackedLinear& w = *ws[i];
    float* a = lora + i * M * max_rank;
    for (int64_t m = 0; w.lora_a && m < M; ++m)
      for (int64_t r = 0; r < w.rank; ++r) a[m * w.rank + r] = R<BF>(dot(w.lora_a + r * w.in, x + m * w.in, w.in));
    gemv_one(w, act, M, lo - offsets[i], hi - offsets[i], outs[i]);
    epilogue<BF>(w, a, M, (lo - offsets[i]) * ROWS, std::min((hi - offsets[i]) * ROWS, w.out), outs[i]);
  }
}

// RMSNorm as model/decoder.py: normalise in float, cast to the activation dtype, times the weight.
template <bool BF>
void rms_norm(const float* x, const float* weight, int64_t B, int64_t D, float eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* row = x + b * D;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(first(D - i), row + i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float ss = _mm512_reduce_add_ps(acc);
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) out[b * D + i] = R<BF>(weight[i] * R<BF>(row[i] * scale));
  }
}

// x*cos + rotate_half(x)*sin for `heads` heads of one row, in place.
template <bool BF, typename T>
void rope(float* x, int64_t heads, int64_t hd, const T* cos, const T* sin) {
  const int64_t half = hd / 2;
  float tmp[1024];
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * hd;
    for (int64_t i = 0; i < hd; ++i) {
      const float rot = i < half ? -v[i + half] : v[i - half];
      tmp[i] = R<BF>(R<BF>(v[i] * to_float(cos[i])) + R<BF>(rot * to_float(sin[i])));
    }
    std::memcpy(v, tmp, hd * sizeof(float));
  }
}

}  // namespace

DecodeStack::DecodeStack(const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& weights,
                         const std::vector<std::optional<at::Tensor>>& biases, const std::vector<int64_t>& shapes,
                         int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, int64_t passes)
    : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(static_cast<float>(eps)),
      passes_(static_cast<int>(passes)) {
  TORCH_CHECK(!norms.empty() && norms.size() % 2 == 0, "DecodeStack: two norm weights per layer");
  layers_ = static_cast<int64_t>(norms.size()) / 2;
  const int64_t n = layers_ * PER_LAYER;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 3 * n && static_cast<int64_t>(biases.size()) == n &&
                  static_cast<int64_t>(shapes.size()) == 3 * n,
              "DecodeStack: expected 7 linears per layer (3 tensors, 1 bias, 3 shape numbers each)");
  TORCH_CHECK(passes == 1 || passes == 2, "DecodeStack: activation passes must be 1 or 2");
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= 64 && head_dim % 2 == 0 && head_dim <= 1024, "DecodeStack: bad head shapes");
  dtype_ = norms[0].scalar_type();
  TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kBFloat16, "DecodeStack: activations must be float32 or bfloat16");
  hidden_ = norms[0].numel();
  for (const at::Tensor& w : norms) {
    TORCH_CHECK(w.scalar_type() == dtype_ && w.numel() == hidden_, "DecodeStack: norm weights differ in dtype or size");
    at::Tensor f = w.detach().to(at::kFloat).contiguous();
    norms_.emplace_back(f.data_ptr<float>(), f.data_ptr<float>() + hidden_);
  }
  for (int64_t i = 0; i < n; ++i) {
    PackedLinear w;
    w.kind = static_cast<int>(shapes[3 * i]);
    w.in = shapes[3 * i + 1];
    w.out = shapes[3 * i + 2];
    const at::Tensor& qw = weights[3 * i];
    const int64_t bytes_per_block = w.kind == 4 ? 256 : 512;
    TORCH_CHECK((w.kind == 4 || w.kind == 8) && qw.scalar_type() == at::kByte && qw.is_contiguous() && qw.dim() == 2,
                "DecodeStack: linear ", i, " is not a packed int4/int8 weight");
    w.blocks = qw.size(1) / bytes_per_block;
    w.groups = qw.size(0);
    TORCH_CHECK(w.blocks == (w.in + QK - 1) / QK && w.groups == (w.out + ROWS - 1) / ROWS,
                "DecodeStack: linear ", i, " has packed shape ", qw.sizes(), " for ", w.out, "x", w.in);
    for (int j = 1; j <= 2; ++j) {
      const at::Tensor& t = weights[3 * i + j];
      TORCH_CHECK(is_half_bits(t) && t.is_contiguous() && t.numel() == w.groups * w.blocks * ROWS,
                  "DecodeStack: linear ", i, " scales/mins do not match its codes");
    }
    w.qw = qw.data_ptr<uint8_t>();
    w.scales = half_data(weights[3 * i + 1]);
    w.mins = half_data(weights[3 * i + 2]);
    keep_.insert(keep_.end(), {qw, weights[3 * i + 1], weights[3 * i + 2]});
    if (biases[i].has_value()) {
      at::Tensor b = biases[i]->detach().to(at::kFloat).contiguous();
      TORCH_CHECK(b.numel() == w.out, "DecodeStack: linear ", i, " bias has ", b.numel(), " values for ", w.out);
      keep_.push_back(b);
      w.bias = b.data_ptr<float>();
    }
    linears_.push_back(w);
  }
  inter_ = linears_[GATE].out;
  const int64_t qdim = heads * head_dim, kvdim = kv_heads * head_dim;
  for (int64_t l = 0; l < layers_; ++l) {
    const PackedLinear* w = &linears_[l * PER_LAYER];
    const bool ok = w[Q].in == hidden_ && w[Q].out == qdim && w[K].in == hidden_ && w[K].out == kvdim &&
                    w[V].in == hidden_ && w[V].out == kvdim && w[O].in == qdim && w[O].out == hidden_ &&
                    w[GATE].in == hidden_ && w[GATE].out == inter_ && w[UP].in == hidden_ && w[UP].out == inter_ &&
                    w[DOWN].in == inter_ && w[DOWN].out == hidden_ && !w[O].bias && !w[GATE].bias &&
                    !w[UP].bias && !w[DOWN].bias;
    TORCH_CHECK(ok, "DecodeStack: layer ", l, " does not have the Llama shapes (or has an unexpected bias)");
  }
}

void DecodeStack::set_adapter(int64_t index, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling) {
  TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(linears_.size()), "DecodeStack: no linear ", index);
  PackedLinear& w = linears_[index];
  TORCH_CHECK(lora_a.scalar_type() == dtype_ && lora_b.scalar_type() == dtype_,
              "DecodeStack: linear ", index, "'s adapter is not in the activation dtype ", dtype_);
  const int64_t r = lora_a.dim() == 2 ? lora_a.size(0) : -1;
  TORCH_CHECK(r >= 1 && r <= MAX_RANK && lora_a.size(1) == w.in && lora_b.dim() == 2 && lora_b.size(0) == w.out &&
                  lora_b.size(1) == r,
              "DecodeStack: linear ", index, " (", w.out, "x", w.in, ") gets adapter shapes A ", lora_a.sizes(),
              ", B ", lora_b.sizes(), " (rank 1..", MAX_RANK, ")");
  at::Tensor a = lora_a.detach().to(at::kFloat).contiguous(), b = lora_b.detach().to(at::kFloat).contiguous();
  keep_.insert(keep_.end(), {a, b});
  w.lora_a = a.data_ptr<float>();
  w.lora_b = b.data_ptr<float>();
  w.rank = r;
  max_rank_ = std::max(max_rank_, r);
  w.scaling = static_cast<float>(scaling);
}

DecodeStack::Step DecodeStack::prepare(int64_t B, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& slots, const std::optional<at::Tensor>& rows, int64_t kv_len,
                                       const std::optional<at::Tensor>& key_valid) {
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->scalar_type() == dtype_ && c->is_contiguous() && c->dim() == 5 && c->size(0) == layers_ &&
                    c->size(2) == kv_heads_ && c->size(4) == head_dim_,
                "DecodeStack: the KV cache must be a contiguous [", layers_, ", rows, ", kv_heads_, ", len, ",
                head_dim_, "] ", dtype_, " tensor");
  }
  Step st;
  st.B = B;
  st.cache_rows = k_cache.size(1);
  st.max_len = k_cache.size(3);
  st.kv_len = kv_len;
  TORCH_CHECK(kv_len >= 1 && kv_len <= st.max_len, "DecodeStack: kv_len ", kv_len, " outside the cache (", st.max_len, ")");
  st.slots = slots.to(at::kLong).contiguous();
  if (st.slots.numel() == 1 && B > 1) st.slots = st.slots.reshape({1}).expand({B}).contiguous();  // one for all rows
  TORCH_CHECK(st.slots.numel() == B, "DecodeStack: one slot per row (or one for all) expected");
  st.slot = st.slots.data_ptr<int64_t>();
  if (rows.has_value()) {
    st.rows = rows->to(at::kLong).contiguous();
    TORCH_CHECK(st.rows.numel() == B, "DecodeStack: one cache row per batch row expected");
    st.row = st.rows.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(B <= st.cache_rows, "DecodeStack: batch ", B, " exceeds the cache's ", st.cache_rows, " rows");
  }
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(st.slot[b] >= 0 && st.slot[b] < kv_len, "DecodeStack: slot ", st.slot[b], " outside 0..", kv_len - 1);
    TORCH_CHECK(!st.row || (st.row[b] >= 0 && st.row[b] < st.cache_rows), "DecodeStack: cache row out of range");
  }
  if (key_valid.has_value()) {
    st.valid = key_valid->to(at::kBool).contiguous();
    TORCH_CHECK(st.valid.dim() == 2 && st.valid.size(0) == B && st.valid.size(1) == kv_len,
                "DecodeStack: key_valid must be [B, kv_len]");
    st.key_valid = st.valid.data_ptr<bool>();
  }

  const int64_t qdim = heads_ * head_dim_, kvdim = kv_heads_ * head_dim_;
  x_.resize(B * hidden_);
  q_.resize(B * qdim);
  k_.resize(B * kvdim);
  v_.resize(B * kvdim);
  att_.resize(B * qdim);
  o_.resize(B * hidden_);
  g_.resize(B * inter_);
  u_.resize(B * inter_);
  // One thread when called from inside another parallel region (nested regions would oversubscribe).
  st.threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  if (static_cast<int>(scratch_.size()) < st.threads) scratch_.resize(st.threads);
  for (int t = 0; t < st.threads; ++t) {
    Scratch& own = scratch_[t];
    own.x.resize(B * hidden_);
    own.h.resize(B * std::max(hidden_, inter_));
    own.lora.resize(3 * B * max_rank_);
    own.scores.resize(kv_len);
    own.qr.resize(head_dim_);
    own.kr.resize(head_dim_);
  }
  return st;
}

void DecodeStack::launch(const Step& st, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                         at::Tensor& v_cache, float* logits, at::BFloat16* logits_bf) {
  if (dtype_ == at::kBFloat16) {
    run<true>(st, cos.data_ptr<at::BFloat16>(), sin.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(),
              v_cache.data_ptr<at::BFloat16>(), logits, logits_bf);
  } else {
    run<false>(st, cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
               logits, logits_bf);
  }
}

at::Tensor DecodeStack::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& slots, const std::optional<at::Tensor>& rows,
                                int64_t kv_len, const std::optional<at::Tensor>& key_valid) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(1) == 1 && x.size(2) == hidden_,
              "DecodeStack: x must be a CPU [B, 1, ", hidden_, "] tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype_, "DecodeStack: x is ", x.scalar_type(), ", the weights are ", dtype_);
  const int64_t B = x.size(0);
  const Step st = prepare(B, k_cache, v_cache, slots, rows, kv_len, key_valid);
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  TORCH_CHECK(c.scalar_type() == dtype_ && s.scalar_type() == dtype_ && c.numel() == B * head_dim_ &&
                  s.numel() == B * head_dim_,
              "DecodeStack: cos/sin must hold one ", head_dim_, "-value row per batch row");
  at::Tensor xin = x.contiguous();
  if (dtype_ == at::kBFloat16) {
    const at::BFloat16* p = xin.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < B * hidden_; ++i) x_[i] = static_cast<float>(p[i]);
  } else {
    std::memcpy(x_.data(), xin.data_ptr<float>(), B * hidden_ * sizeof(float));
  }
  launch(st, c, s, k_cache, v_cache, nullptr, nullptr);
  at::Tensor out = at::empty({B, 1, hidden_}, x.options());
  if (dtype_ == at::kBFloat16) {
    at::BFloat16* p = out.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < B * hidden_; ++i) p[i] = at::BFloat16(x_[i]);
  } else {
    std::memcpy(out.data_ptr<float>(), x_.data(), B * hidden_ * sizeof(float));
  }
  return out;
}

PackedLinear DecodeStack::packed(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                                 int64_t bits, int64_t out_features) {
  PackedLinear w;
  w.kind = static_cast<int>(bits);
  w.in = hidden_;
  w.out = out_features;
  w.blocks = qweight.size(1) / (bits == 4 ? 256 : 512);
  w.groups = qweight.size(0);
  w.qw = qweight.data_ptr<uint8_t>();
  w.scales = half_data(scales);
  w.mins = half_data(mins);
  keep_.insert(keep_.end(), {qweight, scales, mins});
  return w;
}

void DecodeStack::set_head(const at::Tensor& norm, double eps, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& mins, const std::optional<at::Tensor>& bias, int64_t bits,
                           int64_t out_features) {
  TORCH_CHECK(!has_head_, "DecodeStack: the head is already set");
  TORCH_CHECK(norm.scalar_type() == dtype_ && norm.numel() == hidden_, "DecodeStack: the final norm's weight must be ",
              hidden_, " values in ", dtype_);
  check_packed(qweight, scales, mins, hidden_, out_features, bits);
  at::Tensor f = norm.detach().to(at::kFloat).contiguous();
  head_norm_.assign(f.data_ptr<float>(), f.data_ptr<float>() + hidden_);
  head_eps_ = static_cast<float>(eps);
  PackedLinear w = packed(qweight, scales, mins, bits, out_features);
  if (bias.has_value()) {
    at::Tensor b = bias->detach().to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == out_features, "DecodeStack: the head's bias has ", b.numel(), " values for ", out_features);
    keep_.push_back(b);
    w.bias = b.data_ptr<float>();
  }
  linears_.push_back(w);
  has_head_ = true;
}

void DecodeStack::set_embedding_blocks(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                                       int64_t bits, int64_t vocab) {
  check_packed(qweight, scales, mins, hidden_, vocab, bits);
  embed_blocks_ = packed(qweight, scales, mins, bits, vocab);
  embed_table_ = nullptr;
  vocab_ = vocab;
}

void DecodeStack::set_embedding_table(const at::Tensor& table) {
  TORCH_CHECK(table.scalar_type() == dtype_ && table.dim() == 2 && table.size(1) == hidden_ && table.is_contiguous(),
              "DecodeStack: the embedding table must be a contiguous [vocab, ", hidden_, "] ", dtype_, " tensor");
  keep_.push_back(table);
  embed_table_ = table.data_ptr();
  embed_blocks_ = PackedLinear();
  vocab_ = table.size(0);
}

namespace {

// Row r of packed blocks as floats, w = d*q + m per block of 32: blocks.dequantize_codes' arithmetic
// (a product, then a sum; the build turns off fused multiply-adds), what QuantEmbedding looks up.
void packed_row(const PackedLinear& w, int64_t r, float* out) {
  const int64_t g = r / ROWS, lane = r % ROWS, bytes = w.kind == 4 ? 256 : 512;
  const uint8_t* group = w.qw + g * w.blocks * bytes;
  for (int64_t b = 0; b < w.blocks; ++b) {
    const float d = static_cast<float>(w.scales[(g * w.blocks + b) * ROWS + lane]);
    const float m = static_cast<float>(w.mins[(g * w.blocks + b) * ROWS + lane]);
    const uint8_t* block = group + b * bytes + lane * 4;  // this row's 4 bytes of each step of 16 rows
    for (int64_t i = 0; i < QK && b * QK + i < w.in; ++i) {
      const int64_t j = i % 4;
      int code;
      if (w.kind == 4) {
        const uint8_t byte = block[((i % 16) / 4) * 64 + j];  // steps of 4 codes; the high nibbles hold 16..31
        code = i < 16 ? (byte & 0x0F) : (byte >> 4);
      } else {
        code = block[(i / 4) * 64 + j];
      }
      out[b * QK + i] = static_cast<float>(code) * d + m;
    }
  }
}

}  // namespace

at::Tensor DecodeStack::forward_logits(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& cos_table,
                                       const at::Tensor& sin_table, at::Tensor& k_cache, at::Tensor& v_cache,
                                       const at::Tensor& slots, const std::optional<at::Tensor>& rows, int64_t kv_len,
                                       const std::optional<at::Tensor>& key_valid) {
  TORCH_CHECK(has_head_ && vocab_ > 0, "DecodeStack: forward_logits needs set_head and set_embedding_* first");
  at::Tensor id = ids.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  const int64_t B = id.numel();
  if (pos.numel() == 1 && B > 1) pos = pos.reshape({1}).expand({B}).contiguous();  // one for all rows
  TORCH_CHECK(B >= 1 && pos.numel() == B, "DecodeStack: one token id and one position per row (or one for all) expected");
  const Step st = prepare(B, k_cache, v_cache, slots, rows, kv_len, key_valid);
  at::Tensor ct = cos_table.contiguous(), stab = sin_table.contiguous();
  TORCH_CHECK(ct.dim() == 2 && ct.size(1) == head_dim_ && stab.sizes() == ct.sizes() &&
                  (ct.scalar_type() == at::kFloat || ct.scalar_type() == at::kBFloat16) &&
                  stab.scalar_type() == ct.scalar_type(),
              "DecodeStack: cos/sin tables must be [positions, ", head_dim_, "] float32 or bfloat16");
  const int64_t* t = id.data_ptr<int64_t>();
  const int64_t* p = pos.data_ptr<int64_t>();
  // One table value as a float (RotaryEmbedding's buffers follow model.to(): float32 or bfloat16).
  const bool f32_tables = ct.scalar_type() == at::kFloat;
  auto value = [f32_tables](const at::Tensor& table, int64_t at) {
    return f32_tables ? table.data_ptr<float>()[at] : static_cast<float>(table.data_ptr<at::BFloat16>()[at]);
  };
  // Token rows, rounded to the activation dtype as the lookup's .to(dtype) does; each row's rotary
  // values in the activation dtype, as RotaryEmbedding's gather and cast give them.
  at::Tensor c = at::empty({B, head_dim_}, ct.options().dtype(dtype_)), s = at::empty({B, head_dim_}, c.options());
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(t[b] >= 0 && t[b] < vocab_, "DecodeStack: token id ", t[b], " outside the vocabulary (", vocab_, ")");
    TORCH_CHECK(p[b] >= 0 && p[b] < ct.size(0), "DecodeStack: position ", p[b], " outside the rotary table (",
                ct.size(0), ")");
    float* xr = x_.data() + b * hidden_;
    if (embed_blocks_.qw) {
      packed_row(embed_blocks_, t[b], xr);
      if (dtype_ == at::kBFloat16)
        for (int64_t i = 0; i < hidden_; ++i) xr[i] = bf16_round(xr[i]);
    } else if (dtype_ == at::kBFloat16) {
      const at::BFloat16* row = static_cast<const at::BFloat16*>(embed_table_) + t[b] * hidden_;
      for (int64_t i = 0; i < hidden_; ++i) xr[i] = static_cast<float>(row[i]);
    } else {
      std::memcpy(xr, static_cast<const float*>(embed_table_) + t[b] * hidden_, hidden_ * sizeof(float));
    }
    for (int64_t i = 0; i < head_dim_; ++i) {
      const float cv = value(ct, p[b] * head_dim_ + i), sv = value(stab, p[b] * head_dim_ + i);
      if (dtype_ == at::kBFloat16) {
        c.data_ptr<at::BFloat16>()[b * head_dim_ + i] = at::BFloat16(cv);
        s.data_ptr<at::BFloat16>()[b * head_dim_ + i] = at::BFloat16(sv);
      } else {
        c.data_ptr<float>()[b * head_dim_ + i] = cv;
        s.data_ptr<float>()[b * head_dim_ + i] = sv;
      }
    }
  }
  at::Tensor out = at::empty({B, 1, vocab_}, k_cache.options());
  if (dtype_ == at::kBFloat16) {
    logits_.resize(B * vocab_);
    launch(st, c, s, k_cache, v_cache, logits_.data(), out.data_ptr<at::BFloat16>());
  } else {
    launch(st, c, s, k_cache, v_cache, out.data_ptr<float>(), nullptr);
  }
  return out;
}

// Single-query attention of query head j of batch row b (one thread's unit): rotary on this step's
// query and key, the key and value written into the cache at the row's slot (by the first query head
// of each KV head), scores over the cache, softmax, the weighted sum of values into out [hd]. This
// step's own key and value are taken from `kr` and `vnew`, not read back from the cache, so that no
// unit waits for another's cache write.
template <bool BF, typename T>
void attend(const float* q, const float* k, const float* vnew, const T* cos, const T* sin, T* keys, T* values,
            int64_t hd, int64_t slot, int64_t kv_len, const bool* valid, bool write, float inv_sqrt, float* qr,
            float* kr, float* s, float* out) {
  std::memcpy(qr, q, hd * sizeof(float));
  std::memcpy(kr, k, hd * sizeof(float));
  rope<BF>(qr, 1, hd, cos, sin);
  rope<BF>(kr, 1, hd, cos, sin);
  if (write) {
    for (int64_t i = 0; i < hd; ++i) {
      keys[slot * hd + i] = from_float<T>(kr[i]);
      values[slot * hd + i] = from_float<T>(vnew[i]);
    }
  }
  for (int64_t t = 0; t < kv_len; ++t) {
    if (valid && !valid[t] && t != slot) {
      s[t] = -std::numeric_limits<float>::infinity();
      continue;
    }
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < hd; c += 16) {
      const __m512 kv = t == slot ? load16(kr + c, hd - c) : load16(keys + t * hd + c, hd - c);
      acc = _mm512_fmadd_ps(load16(qr + c, hd - c), kv, acc);
    }
    s[t] = R<BF>(_mm512_reduce_add_ps(acc)) * inv_sqrt;
  }
  // A row's own slot past key_valid is causal-masked in the eager path only when key_valid is given
  // (then slots after this row's are never valid); softmax in float.
  if (valid)
    for (int64_t t = slot + 1; t < kv_len; ++t) s[t] = -std::numeric_limits<float>::infinity();
  softmax<BF>(s, kv_len);
  // Four 16-value columns at a time: four independent accumulation chains per key row.
  for (int64_t c0 = 0; c0 < hd; c0 += 64) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const int64_t cn = std::min<int64_t>(4, (hd - c0 + 15) / 16);
    for (int64_t t = 0; t < kv_len; ++t) {
      const __m512 p = _mm512_set1_ps(s[t]);
      for (int64_t c = 0; c < cn; ++c) {
        const int64_t at = c0 + 16 * c;
        const __m512 vt = t == slot ? load16(vnew + at, hd - at) : load16(values + t * hd + at, hd - at);
        acc[c] = _mm512_fmadd_ps(p, vt, acc[c]);
      }
    }
    for (int64_t c = 0; c < cn; ++c) {
      const int64_t at = c0 + 16 * c;
      _mm512_mask_storeu_ps(out + at, first(hd - at), RV<BF>(acc[c]));
    }
  }
}

// The whole step runs in one parallel region: every thread keeps its own copy of the residual
// stream and recomputes the cheap per-row work (norms, activation quantization, residual sums,
// SwiGLU: a few µs a layer) rather than waiting for one thread to do it, and the threads meet only
// where one's output feeds another: after each matrix-vector part and after attention (5 barriers a
// layer, against the 4 parallel regions and the serial work between them that one layer cost
// before). Attention is cut by (batch row, query head).
template <bool BF, typename T>
void DecodeStack::run(const Step& st, const T* cos, const T* sin, T* kc, T* vc, float* logits, at::BFloat16* logits_bf) {
  const int64_t B = st.B, cache_rows = st.cache_rows, max_len = st.max_len, kv_len = st.kv_len;
  const int64_t* slots = st.slot;
  const int64_t* rows = st.row;
  const bool* key_valid = st.key_valid;
  const int threads = st.threads;
  const int64_t hd = head_dim_, qdim = heads_ * hd, kvdim = kv_heads_ * hd, group = heads_ / kv_heads_;
  const float inv_sqrt = 1.0f / std::sqrt(static_cast<float>(hd));
#pragma omp parallel num_threads(threads)
  {
    // The threads the region got (at most `threads`, whose scratch exists): what the shares divide by.
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    Scratch& own = scratch_[tid];
    float* x = own.x.data();
    float* h = own.h.data();
    float* lora = own.lora.data();
    std::memcpy(x, x_.data(), B * hidden_ * sizeof(float));
    for (int64_t l = 0; l < layers_; ++l) {
      const PackedLinear* w = &linears_[l * PER_LAYER];
      // Attention: norm, q/k/v, then (batch row, query head) units.
      rms_norm<BF>(x, norms_[2 * l].data(), B, hidden_, eps_, h);
      {
        const Q8Activations& act = quantize_activations(h, B, hidden_, w[Q].blocks, passes_);
        const PackedLinear* ws[3] = {&w[Q], &w[K], &w[V]};
        float* outs[3] = {q_.data(), k_.data(), v_.data()};
        gemv_share<BF>(h, act, B, 3, ws, outs, lora, max_rank_, tid, nt);
      }
#pragma omp barrier
      {
        const auto [begin, end] = share(B * heads_, 1, tid, nt);
        for (int64_t unit = begin; unit < end; ++unit) {
          const int64_t b = unit / heads_, j = unit % heads_, g = j / group;
          const int64_t r = rows ? rows[b] : b;
          const int64_t base = ((l * cache_rows + r) * kv_heads_ + g) * max_len * hd;
          attend<BF, T>(q_.data() + b * qdim + j * hd, k_.data() + b * kvdim + g * hd, v_.data() + b * kvdim + g * hd,
                        cos + b * hd, sin + b * hd, kc + base, vc + base, hd, slots[b], kv_len,
                        key_valid ? key_valid + b * kv_len : nullptr, j % group == 0, inv_sqrt, own.qr.data(),
                        own.kr.data(), own.scores.data(), att_.data() + b * qdim + j * hd);
        }
      }
#pragma omp barrier
      {
        const Q8Activations& act = quantize_activations(att_.data(), B, qdim, w[O].blocks, passes_);
        const PackedLinear* ws[1] = {&w[O]};
        float* outs[1] = {o_.data()};
        gemv_share<BF>(att_.data(), act, B, 1, ws, outs, lora, max_rank_, tid, nt);
      }
#pragma omp barrier
      for (int64_t i = 0; i < B * hidden_; ++i) x[i] = R<BF>(x[i] + o_[i]);
      // MLP: norm, gate/up, silu(gate) * up, down.
      rms_norm<BF>(x, norms_[2 * l + 1].data(), B, hidden_, eps_, h);
      {
        const Q8Activations& act = quantize_activations(h, B, hidden_, w[GATE].blocks, passes_);
        const PackedLinear* ws[2] = {&w[GATE], &w[UP]};
        float* outs[2] = {g_.data(), u_.data()};
        gemv_share<BF>(h, act, B, 2, ws, outs, lora, max_rank_, tid, nt);
      }
#pragma omp barrier
      silu_mul<BF>(g_.data(), u_.data(), B * inter_, h);
      {
        const Q8Activations& act = quantize_activations(h, B, inter_, w[DOWN].blocks, passes_);
        const PackedLinear* ws[1] = {&w[DOWN]};
        float* outs[1] = {o_.data()};
        gemv_share<BF>(h, act, B, 1, ws, outs, lora, max_rank_, tid, nt);
      }
#pragma omp barrier
      for (int64_t i = 0; i < B * hidden_; ++i) x[i] = R<BF>(x[i] + o_[i]);
    }
    if (logits) {
      // The final norm and the LM head in the same region: no second thread start, and each thread
      // quantizes the normed row itself (as it does for every layer) instead of waiting for one.
      rms_norm<BF>(x, head_norm_.data(), B, hidden_, head_eps_, h);
      const PackedLinear& w = linears_[layers_ * PER_LAYER];
      const Q8Activations& act = quantize_activations(h, B, hidden_, w.blocks, passes_);
      const PackedLinear* ws[1] = {&w};
      float* outs[1] = {logits};
      gemv_share<BF>(h, act, B, 1, ws, outs, lora, max_rank_, tid, nt);
      if (logits_bf) {  // this thread's rows of the head, as gemv_share cut them
        const auto [begin, end] = share(w.groups, GROUP_GRAIN, tid, nt);
        const int64_t j1 = std::min(end * ROWS, w.out);
        for (int64_t m = 0; m < B; ++m)
          for (int64_t j = begin * ROWS; j < j1; ++j) logits_bf[m * w.out + j] = at::BFloat16(logits[m * w.out + j]);
      }
    } else if (tid == 0) {
      std::memcpy(x_.data(), x, B * hidden_ * sizeof(float));
    }
  }
}

}  // namespace tinyomni
