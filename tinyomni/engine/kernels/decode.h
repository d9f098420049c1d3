// The one-token decode step of a whole Llama-family decoder (RMSNorm, RoPE, grouped-query attention
// over the KV cache, SwiGLU; weights in the engine's int4/int8 blocks) in one C++ call.
//
// Why: at batch 1 a quantized layer's arithmetic takes ~0.2 ms, and the ~40 PyTorch ops around its
// 7 linears (norms, views, rotary, cache writes, attention, residuals) cost about as much again in
// Python and dispatch. Here the whole step is one parallel region: per layer 4 matrix-vector parts
// (q/k/v share one activation quantization and one part, as do gate/up) and attention split across
// the threads, 5 barriers, the cheap per-row work repeated by every thread, nothing allocated.
//
// It computes what the PyTorch modules compute, rounding where they round: with bfloat16
// activations every intermediate the eager path stores in bf16 (norm output, projections, rotary
// products, scores, probabilities, residual sums) is rounded to bf16 at the same point; float32 is
// float32 throughout. Only summation orders differ.
#pragma once

#include "common.h"

namespace tinyomni {

// One quantized weight as the kernels read it (the tensors stay alive in DecodeStack::keep_).
struct PackedLinear {
  int kind = 0;  // 4 or 8 (bits per code)
  const uint8_t* qw = nullptr;
  const at::Half* scales = nullptr;
  const at::Half* mins = nullptr;
  int64_t blocks = 0, groups = 0, in = 0, out = 0;
  const float* bias = nullptr;  // float32 copy, or nullptr
  // A float LoRA adapter beside the blocks (engine/lora.py), or none: y += scaling * B (A x), with
  // lora_a [rank, in] and lora_b [out, rank] row-major float32 copies.
  const float* lora_a = nullptr;
  const float* lora_b = nullptr;
  int64_t rank = 0;
  float scaling = 0.0f;
};

class DecodeStack {
 public:
  // Per layer l: norms[2l], norms[2l+1] = input / post-attention RMSNorm weights (the activation
  // dtype); linears in the order q, k, v, o, gate, up, down, each three tensors in `weights`
  // (qweight, scales, mins), one entry in `biases` (None for none) and (bits, in, out) in `shapes`.
  DecodeStack(const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& weights,
              const std::vector<std::optional<at::Tensor>>& biases, const std::vector<int64_t>& shapes,
              int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, int64_t passes);

  // x [B, 1, hidden] (float32 or bfloat16) through every layer, writing this step's keys and values
  // into the caches [layers, cache_rows, kv_heads, max_len, head_dim] at slots[b] of cache row
  // rows[b] (rows: None = b). cos/sin: [B, ..., head_dim] rotary tables for each row's position.
  // Attention reads slots 0..kv_len-1; key_valid [B, kv_len] (bool, None = all valid) marks padding,
  // and a row never attends past its own slot except where key_valid is None (as the eager mask).
  // Give linear `index` (layer * 7 + its place in the order above) a LoRA adapter: A [r, in] and
  // B [out, r] in the activation dtype, added as the eager LoRAQuantLinear adds it.
  void set_adapter(int64_t index, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling);

  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                     at::Tensor& v_cache, const at::Tensor& slots, const std::optional<at::Tensor>& rows,
                     int64_t kv_len, const std::optional<at::Tensor>& key_valid);

  // The token's two ends, so that forward_logits runs a whole decode step from token ids to logits:
  // the final RMSNorm (weight in the activation dtype) and the LM head's packed blocks (bits 4 or 8,
  // its bias or None; it becomes linear layers*7, so set_adapter reaches it too), and where token rows
  // come from: packed blocks (a QuantEmbedding's table, usually that same head) or a float table
  // [vocab, hidden] in the activation dtype (an nn.Embedding).
  void set_head(const at::Tensor& norm, double eps, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& mins, const std::optional<at::Tensor>& bias, int64_t bits, int64_t out_features);
  void set_embedding_blocks(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins, int64_t bits,
                            int64_t vocab);
  void set_embedding_table(const at::Tensor& table);

  // ids (B values, any shape) through embedding, every layer, final norm and LM head: logits
  // [B, 1, vocab] in the activation dtype, what embed_tokens → layers → norm → lm_head compute.
  // positions (B values, or one for all rows) pick each row's rotary values from cos_table/sin_table
  // [positions, head_dim] (RotaryEmbedding's buffers); the cache arguments are forward's (slots too
  // may be one for all rows). Python passes its tensors as they are: each PyTorch op it saved costs
  // tens of µs right after a step has streamed the weights through the caches.
  at::Tensor forward_logits(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& cos_table,
                            const at::Tensor& sin_table, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slots, const std::optional<at::Tensor>& rows, int64_t kv_len,
                            const std::optional<at::Tensor>& key_valid);

 private:
  // What forward and forward_logits check and size the same way: the caches, slots, rows, mask.
  struct Step {
    int64_t B = 0, cache_rows = 0, max_len = 0, kv_len = 0;
    at::Tensor slots, rows, valid;  // contiguous copies the pointers read
    const int64_t* slot = nullptr;
    const int64_t* row = nullptr;
    const bool* key_valid = nullptr;
    int threads = 1;
  };
  // A checked packed weight [out_features, hidden] as the kernels read it (its tensors kept alive).
  PackedLinear packed(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins, int64_t bits,
                      int64_t out_features);
  Step prepare(int64_t B, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
               const std::optional<at::Tensor>& rows, int64_t kv_len, const std::optional<at::Tensor>& key_valid);
  // The layers over x_ (and with `logits` the final norm and head into it: float [B, vocab], and
  // the same values rounded into logits_bf when the activations are bf16).
  void launch(const Step& st, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
              float* logits, at::BFloat16* logits_bf);
  template <bool BF, typename T>
  void run(const Step& st, const T* cos, const T* sin, T* kc, T* vc, float* logits, at::BFloat16* logits_bf);

  std::vector<at::Tensor> keep_;  // everything the pointers below point into
  std::vector<std::vector<float>> norms_;
  std::vector<PackedLinear> linears_;
  at::ScalarType dtype_;
  int64_t layers_, hidden_, heads_, kv_heads_, head_dim_, inter_;
  float eps_;
  int passes_;
  // Scratch reused by every step (grown, never shrunk): the values threads share (each written in
  // parts by all of them, read after a barrier), and each thread's own.
  std::vector<float> x_, q_, k_, v_, att_, o_, g_, u_;
  struct Scratch {
    std::vector<float> x, h;  // the residual stream and a norm's or SwiGLU's output, [B, ...]
    std::vector<float> lora;  // A x of up to three adapters, [3, B, max_rank_]
    std::vector<float> scores, qr, kr;  // one attention unit's scores and rotated query and key
  };
  std::vector<Scratch> scratch_;
  int64_t max_rank_ = 1;
  // The ends set_head / set_embedding_* give (none until then).
  bool has_head_ = false;
  std::vector<float> head_norm_;
  float head_eps_ = 0.0f;
  PackedLinear embed_blocks_;  // qw == nullptr: none
  const void* embed_table_ = nullptr;  // [vocab, hidden] in dtype_, or nullptr
  int64_t vocab_ = 0;
  std::vector<float> logits_;  // bf16 activations: the head's float results before rounding
};

}  // namespace tinyomni
