// The fused one-token decode step (see decode.h for what and why).
#include "decode.h"

#include <cmath>
#include <limits>

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

// out_i = act · W_i^T (+ bias_i) (+ LoRA_i(x)) for up to three weights that share one input x
// (`act` is x quantized): one parallel region over all their row groups, so each thread gets an
// even share of the whole layer part, and finishes its rows there. An adapter's A x (rank * in
// multiply-adds a row, small) is computed before the region into `lora` (M * max_rank per weight).
template <bool BF>
void gemv(const float* x, const Q8Activations& act, int64_t M, int n, const PackedLinear* const* ws,
          float* const* outs, float* lora, int64_t max_rank) {
  int64_t offsets[4] = {0, 0, 0, 0};
  for (int i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + ws[i]->groups;
  for (int i = 0; i < n; ++i) {
    const PackedLinear& w = *ws[i];
    for (int64_t m = 0; w.lora_a && m < M; ++m)
      for (int64_t r = 0; r < w.rank; ++r)
        lora[i * M * max_rank + m * w.rank + r] = R<BF>(dot(w.lora_a + r * w.in, x + m * w.in, w.in));
  }
  at::parallel_for(0, offsets[n], GROUP_GRAIN, [&](int64_t begin, int64_t end) {
    for (int i = 0; i < n; ++i) {
      const int64_t lo = std::max(begin, offsets[i]), hi = std::min(end, offsets[i + 1]);
      if (lo >= hi) continue;
      const PackedLinear& w = *ws[i];
      gemv_one(w, act, M, lo - offsets[i], hi - offsets[i], outs[i]);
      epilogue<BF>(w, lora + i * M * max_rank, M, (lo - offsets[i]) * ROWS, std::min((hi - offsets[i]) * ROWS, w.out),
                   outs[i]);
    }
  });
}

// RMSNorm as model/decoder.py: normalise in float, cast to the activation dtype, times the weight.
template <bool BF>
void rms_norm(const float* x, const float* weight, int64_t B, int64_t D, float eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* row = x + b * D;
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) ss += row[i] * row[i];
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

at::Tensor DecodeStack::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& slots, const std::optional<at::Tensor>& rows,
                                int64_t kv_len, const std::optional<at::Tensor>& key_valid) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(1) == 1 && x.size(2) == hidden_,
              "DecodeStack: x must be a CPU [B, 1, ", hidden_, "] tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype_, "DecodeStack: x is ", x.scalar_type(), ", the weights are ", dtype_);
  const int64_t B = x.size(0);
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->scalar_type() == dtype_ && c->is_contiguous() && c->dim() == 5 && c->size(0) == layers_ &&
                    c->size(2) == kv_heads_ && c->size(4) == head_dim_,
                "DecodeStack: the KV cache must be a contiguous [", layers_, ", rows, ", kv_heads_, ", len, ",
                head_dim_, "] ", dtype_, " tensor");
  }
  const int64_t cache_rows = k_cache.size(1), max_len = k_cache.size(3);
  TORCH_CHECK(kv_len >= 1 && kv_len <= max_len, "DecodeStack: kv_len ", kv_len, " outside the cache (", max_len, ")");
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  TORCH_CHECK(c.scalar_type() == dtype_ && s.scalar_type() == dtype_ && c.numel() == B * head_dim_ &&
                  s.numel() == B * head_dim_,
              "DecodeStack: cos/sin must hold one ", head_dim_, "-value row per batch row");
  at::Tensor sl = slots.to(at::kLong).contiguous();
  TORCH_CHECK(sl.numel() == B, "DecodeStack: one slot per row expected");
  const int64_t* slot = sl.data_ptr<int64_t>();
  at::Tensor rw;
  const int64_t* row = nullptr;
  if (rows.has_value()) {
    rw = rows->to(at::kLong).contiguous();
    TORCH_CHECK(rw.numel() == B, "DecodeStack: one cache row per batch row expected");
    row = rw.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(B <= cache_rows, "DecodeStack: batch ", B, " exceeds the cache's ", cache_rows, " rows");
  }
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slot[b] >= 0 && slot[b] < kv_len, "DecodeStack: slot ", slot[b], " outside 0..", kv_len - 1);
    TORCH_CHECK(!row || (row[b] >= 0 && row[b] < cache_rows), "DecodeStack: cache row out of range");
  }
  at::Tensor kv;
  const bool* valid = nullptr;
  if (key_valid.has_value()) {
    kv = key_valid->to(at::kBool).contiguous();
    TORCH_CHECK(kv.dim() == 2 && kv.size(0) == B && kv.size(1) == kv_len, "DecodeStack: key_valid must be [B, kv_len]");
    valid = kv.data_ptr<bool>();
  }

  const int64_t qdim = heads_ * head_dim_, kvdim = kv_heads_ * head_dim_;
  x_.resize(B * hidden_);
  h_.resize(B * std::max(hidden_, inter_));
  q_.resize(B * qdim);
  k_.resize(B * kvdim);
  v_.resize(B * kvdim);
  att_.resize(B * qdim);
  o_.resize(B * hidden_);
  g_.resize(B * inter_);
  u_.resize(B * inter_);
  scores_.resize((heads_ / kv_heads_) * kv_len);
  lora_.resize(3 * B * max_rank_);
  at::Tensor xin = x.contiguous();
  if (dtype_ == at::kBFloat16) {
    const at::BFloat16* p = xin.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < B * hidden_; ++i) x_[i] = static_cast<float>(p[i]);
    run<true>(B, c.data_ptr<at::BFloat16>(), s.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(),
              v_cache.data_ptr<at::BFloat16>(), slot, row, cache_rows, max_len, kv_len, valid);
  } else {
    std::memcpy(x_.data(), xin.data_ptr<float>(), B * hidden_ * sizeof(float));
    run<false>(B, c.data_ptr<float>(), s.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
               slot, row, cache_rows, max_len, kv_len, valid);
  }
  at::Tensor out = at::empty({B, 1, hidden_}, x.options());
  if (dtype_ == at::kBFloat16) {
    at::BFloat16* p = out.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < B * hidden_; ++i) p[i] = at::BFloat16(x_[i]);
  } else {
    std::memcpy(out.data_ptr<float>(), x_.data(), B * hidden_ * sizeof(float));
  }
  return out;
}

template <bool BF, typename T>
void DecodeStack::run(int64_t B, const T* cos, const T* sin, T* kc, T* vc, const int64_t* slots, const int64_t* rows,
                      int64_t cache_rows, int64_t max_len, int64_t kv_len, const bool* key_valid) {
  const int64_t hd = head_dim_, qdim = heads_ * hd, kvdim = kv_heads_ * hd, group = heads_ / kv_heads_;
  const float inv_sqrt = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t chunks = (hd + 15) / 16;
  for (int64_t l = 0; l < layers_; ++l) {
    const PackedLinear* w = &linears_[l * PER_LAYER];
    // Attention: norm, q/k/v in one region, rotary, cache write.
    rms_norm<BF>(x_.data(), norms_[2 * l].data(), B, hidden_, eps_, h_.data());
    {
      const Q8Activations& act = quantize_activations(h_.data(), B, hidden_, w[Q].blocks, passes_);
      const PackedLinear* ws[3] = {&w[Q], &w[K], &w[V]};
      float* outs[3] = {q_.data(), k_.data(), v_.data()};
      gemv<BF>(h_.data(), act, B, 3, ws, outs, lora_.data(), max_rank_);
    }
    for (int64_t b = 0; b < B; ++b) {
      rope<BF>(q_.data() + b * qdim, heads_, hd, cos + b * hd, sin + b * hd);
      rope<BF>(k_.data() + b * kvdim, kv_heads_, hd, cos + b * hd, sin + b * hd);
      const int64_t r = rows ? rows[b] : b;
      for (int64_t g = 0; g < kv_heads_; ++g) {
        const int64_t at = (((l * cache_rows + r) * kv_heads_ + g) * max_len + slots[b]) * hd;
        for (int64_t i = 0; i < hd; ++i) {
          kc[at + i] = from_float<T>(k_[b * kvdim + g * hd + i]);
          vc[at + i] = from_float<T>(v_[b * kvdim + g * hd + i]);
        }
      }
    }
    // Single-query attention, the query heads of one KV head together (each key row read once).
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = rows ? rows[b] : b;
      const bool* valid = key_valid ? key_valid + b * kv_len : nullptr;
      for (int64_t g = 0; g < kv_heads_; ++g) {
        const T* keys = kc + ((l * cache_rows + r) * kv_heads_ + g) * max_len * hd;
        const T* values = vc + ((l * cache_rows + r) * kv_heads_ + g) * max_len * hd;
        const float* qg = q_.data() + b * qdim + g * group * hd;
        float* out = att_.data() + b * qdim + g * group * hd;
        for (int64_t j = 0; j < group; ++j) {
          float* s = scores_.data() + j * kv_len;
          for (int64_t t = 0; t < kv_len; ++t) {
            if (valid && !valid[t] && t != slots[b]) {
              s[t] = -std::numeric_limits<float>::infinity();
              continue;
            }
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c) {
              const int64_t left = std::min<int64_t>(16, hd - 16 * c);
              acc = _mm512_fmadd_ps(load16(qg + j * hd + 16 * c, left), load16(keys + t * hd + 16 * c, left), acc);
            }
            s[t] = R<BF>(_mm512_reduce_add_ps(acc)) * inv_sqrt;
          }
          // A row's own slot past key_valid is causal-masked in the eager path only when key_valid is
          // given (then slots after this row's are never valid); softmax in float.
          if (valid)
            for (int64_t t = slots[b] + 1; t < kv_len; ++t) s[t] = -std::numeric_limits<float>::infinity();
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < kv_len; ++t) mx = std::max(mx, s[t]);
          float sum = 0.0f;
          for (int64_t t = 0; t < kv_len; ++t) {
            s[t] = std::exp(s[t] - mx);
            sum += s[t];
          }
          const float inv = 1.0f / sum;
          for (int64_t t = 0; t < kv_len; ++t) s[t] = R<BF>(s[t] * inv);
        }
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t left = std::min<int64_t>(16, hd - 16 * c);
          __m512 acc[64];
          const int64_t jn = std::min<int64_t>(group, 64);
          for (int64_t j = 0; j < jn; ++j) acc[j] = _mm512_setzero_ps();
          for (int64_t t = 0; t < kv_len; ++t) {
            const __m512 vt = load16(values + t * hd + 16 * c, left);
            for (int64_t j = 0; j < jn; ++j)
              acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(scores_[j * kv_len + t]), vt, acc[j]);
          }
          for (int64_t j = 0; j < jn; ++j) {
            float tmp[16];
            _mm512_storeu_ps(tmp, acc[j]);
            for (int64_t i = 0; i < left; ++i) out[j * hd + 16 * c + i] = R<BF>(tmp[i]);
          }
        }
      }
    }
    {
      const Q8Activations& act = quantize_activations(att_.data(), B, qdim, w[O].blocks, passes_);
      const PackedLinear* ws[1] = {&w[O]};
      float* outs[1] = {o_.data()};
      gemv<BF>(att_.data(), act, B, 1, ws, outs, lora_.data(), max_rank_);
    }
    for (int64_t i = 0; i < B * hidden_; ++i) x_[i] = R<BF>(x_[i] + o_[i]);
    // MLP: norm, gate/up in one region, silu(gate) * up, down.
    rms_norm<BF>(x_.data(), norms_[2 * l + 1].data(), B, hidden_, eps_, h_.data());
    {
      const Q8Activations& act = quantize_activations(h_.data(), B, hidden_, w[GATE].blocks, passes_);
      const PackedLinear* ws[2] = {&w[GATE], &w[UP]};
      float* outs[2] = {g_.data(), u_.data()};
      gemv<BF>(h_.data(), act, B, 2, ws, outs, lora_.data(), max_rank_);
    }
    for (int64_t i = 0; i < B * inter_; ++i) {
      const float gi = g_[i];
      h_[i] = R<BF>(R<BF>(gi / (1.0f + std::exp(-gi))) * u_[i]);
    }
    {
      const Q8Activations& act = quantize_activations(h_.data(), B, inter_, w[DOWN].blocks, passes_);
      const PackedLinear* ws[1] = {&w[DOWN]};
      float* outs[1] = {o_.data()};
      gemv<BF>(h_.data(), act, B, 1, ws, outs, lora_.data(), max_rank_);
    }
    for (int64_t i = 0; i < B * hidden_; ++i) x_[i] = R<BF>(x_[i] + o_[i]);
  }
}

}  // namespace tinyomni
