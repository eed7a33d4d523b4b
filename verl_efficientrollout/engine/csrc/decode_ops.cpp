// The native engine's decode steps on a CPU (one token per row, or a verify's few), float32, as four
// ops: RMSNorm (with the residual add before it), RoPE + KV write + attention, and SiLU(gate) * up.
// The same computation as the model's
// eager path (model.Block) without its ~30 small PyTorch ops per layer, and attention that reads each
// row's KV once for all query heads of a KV head (grouped-query attention). Built at first use by
// verl_efficientrollout.engine.cpu_kernels; registered as torch.ops.verl_efficientrollout.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

// out[d] = x[d] * cos[d] + rotate_half(x)[d] * sin[d], as model._rope computes it (no fused multiply-add).
void rope(const float* x, const float* cos, const float* sin, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = x[d] * cos[d] + (-x[d + half]) * sin[d];
  for (int64_t d = half; d < dim; ++d) out[d] = x[d] * cos[d] + x[d - half] * sin[d];
}

float dot(const float* a, const float* b, int64_t dim) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // eight lanes: vectorised without reassociation
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8)
    for (int i = 0; i < 8; ++i) acc[i] += a[d + i] * b[d + i];
  for (int i = 0; d < dim; ++d, ++i) acc[i] += a[d] * b[d];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

at::Tensor decode_attention(
    const at::Tensor& qkv_in,     // [batch, tokens, (heads + 2 * kv_heads) * dim]: the fused q, k, v projection
    const at::Tensor& cos_in,     // [batch, 1, tokens, dim]
    const at::Tensor& sin_in,     // [batch, 1, tokens, dim]
    at::Tensor& k_cache,          // [batch, kv_heads, max_len, dim], contiguous: this layer's K of the batch's slots
    at::Tensor& v_cache,          // [batch, kv_heads, max_len, dim], contiguous
    const at::Tensor& positions_in,  // [batch, tokens] int64: the new tokens' positions
    int64_t heads, int64_t kv_heads, double scale) {  // -> [batch, tokens, heads * dim]
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "decode_attention: heads must be a multiple of kv_heads");
  const at::Tensor qkv = qkv_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  for (const at::Tensor* t : {&qkv, &cos, &sin, static_cast<const at::Tensor*>(&k_cache), static_cast<const at::Tensor*>(&v_cache)}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "decode_attention: takes float32 CPU tensors");
  }
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: k_cache and v_cache must be contiguous");
  TORCH_CHECK(positions.scalar_type() == at::kLong, "decode_attention: positions must be int64");
  TORCH_CHECK(qkv.dim() == 3, "decode_attention: qkv must be [batch, tokens, (heads + 2 * kv_heads) * dim]");
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), dim = k_cache.size(3), max_len = k_cache.size(2);
  const int64_t group = heads / kv_heads, queries = group * tokens;  // queries per (row, kv head)
  TORCH_CHECK(qkv.size(2) == (heads + 2 * kv_heads) * dim, "decode_attention: qkv must be [batch, tokens, (heads + 2 * kv_heads) * dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == batch && k_cache.size(1) == kv_heads && v_cache.sizes() == k_cache.sizes(),
              "decode_attention: k_cache and v_cache must be [batch, kv_heads, max_len, dim]");
  TORCH_CHECK(cos.numel() == batch * tokens * dim && sin.numel() == batch * tokens * dim && positions.numel() == batch * tokens,
              "decode_attention: cos, sin and positions must have one entry per row and token");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch * tokens; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < max_len, "decode_attention: position ", pos[i], " outside the KV cache (max_len ", max_len, ")");

  auto out = at::empty({batch, tokens, heads * dim}, qkv.options());
  const float *x = qkv.data_ptr<float>(), *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>(), *o = out.data_ptr<float>();
  const int64_t row_width = (heads + 2 * kv_heads) * dim;
  const float fscale = static_cast<float>(scale);

  // One task per (row, kv head): its tokens' new keys and values first, then its queries (the
  // group's heads x the tokens), each over keys 0..its own position. A query's arithmetic does not
  // depend on how many tokens the step has: a verify computes what one-token steps would.
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(queries * dim), scores;
    std::vector<int64_t> keys(queries);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      float* kb = kc + (b * kv_heads + h) * max_len * dim;
      float* vb = vc + (b * kv_heads + h) * max_len * dim;
      int64_t span = 0;  // keys any query of this task reads
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t bt = b * tokens + t, p = pos[bt];
        const float *xt = x + bt * row_width, *ct = c + bt * dim, *st = s + bt * dim;
        rope(xt + (heads + h) * dim, ct, st, dim, kb + p * dim);  // the new key, written in place
        std::copy_n(xt + (heads + kv_heads + h) * dim, dim, vb + p * dim);
        for (int64_t g = 0; g < group; ++g) {
          rope(xt + (h * group + g) * dim, ct, st, dim, q.data() + (t * group + g) * dim);
          keys[t * group + g] = p + 1;
        }
        span = std::max(span, p + 1);
      }
      scores.resize(queries * span);
      for (int64_t j = 0; j < span; ++j)  // each key read once for all queries that attend it
        for (int64_t qi = 0; qi < queries; ++qi)
          if (j < keys[qi]) scores[qi * span + j] = dot(q.data() + qi * dim, kb + j * dim, dim) * fscale;
      for (int64_t qi = 0; qi < queries; ++qi) {
        float* sq = scores.data() + qi * span;
        const int64_t n = keys[qi];
        const float top = *std::max_element(sq, sq + n);
        float total = 0.f;
        for (int64_t j = 0; j < n; ++j) total += (sq[j] = std::exp(sq[j] - top));
        const float inv = 1.f / total;
        for (int64_t j = 0; j < n; ++j) sq[j] *= inv;
        const int64_t t = qi / group, g = qi % group;
        std::fill_n(o + ((b * tokens + t) * heads + h * group + g) * dim, dim, 0.f);
      }
      for (int64_t j = 0; j < span; ++j) {  // each value read once for all queries that attend it
        const float* vj = vb + j * dim;
        for (int64_t qi = 0; qi < queries; ++qi) {
          if (j >= keys[qi]) continue;
          const float weight = scores[qi * span + j];
          float* oq = o + ((b * tokens + qi / group) * heads + h * group + qi % group) * dim;
          for (int64_t d = 0; d < dim; ++d) oq[d] += weight * vj[d];
        }
      }
    }
  });
  return out;
}

void rms_norm_rows(const float* x, const float* weight, int64_t rows, int64_t hidden, double eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {  // a few rows of a few hundred elements: no threads
    const float* xr = x + r * hidden;
    const float inv = 1.f / std::sqrt(dot(xr, xr, hidden) / static_cast<float>(hidden) + static_cast<float>(eps));
    for (int64_t d = 0; d < hidden; ++d) out[r * hidden + d] = xr[d] * inv * weight[d];
  }
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rms_norm: takes float32 CPU tensors");
  TORCH_CHECK(weight.numel() == x.size(-1), "rms_norm: weight must have ", x.size(-1), " elements");
}

// RMSNorm over the last dimension: [..., hidden] -> [..., hidden].
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  check_norm_args(x, weight);
  auto out = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), x.numel() / x.size(-1), x.size(-1), eps, out.data_ptr<float>());
  return out;
}

// The residual add and the RMSNorm after it: (x + delta, rms_norm(x + delta)), both [..., hidden].
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& delta_in,
                                                const at::Tensor& weight_in, double eps) {
  const at::Tensor x = x_in.contiguous(), delta = delta_in.contiguous(), weight = weight_in.contiguous();
  check_norm_args(x, weight);
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == at::kFloat,
              "add_rms_norm: delta must be a float32 tensor of x's shape");
  auto residual = at::empty_like(x), normed = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *dp = delta.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) rp[i] = xp[i] + dp[i];
  rms_norm_rows(rp, weight.data_ptr<float>(), x.numel() / x.size(-1), x.size(-1), eps, normed.data_ptr<float>());
  return {residual, normed};
}

// SiLU(gate) * up of the fused gate/up projection: [..., 2 * inner] -> [..., inner].
at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const at::Tensor gate_up = gate_up_in.contiguous();
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.scalar_type() == at::kFloat && gate_up.size(-1) % 2 == 0,
              "silu_mul: takes a float32 CPU tensor with an even last dimension");
  const int64_t inner = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * inner);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = inner;
  auto out = at::empty(sizes, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows * inner, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / inner, d = i % inner;
      const float gate = in[r * 2 * inner + d];
      o[i] = gate / (1.f + std::exp(-gate)) * in[r * 2 * inner + inner + d];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(verl_efficientrollout, m) {
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor positions, int heads, int kv_heads, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(verl_efficientrollout, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
}
