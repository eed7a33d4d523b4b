// The native engine's decode steps on a CPU (one token per row, or a verify's few), float32, as four
// ops: RMSNorm (with the residual add before it), RoPE + KV write + attention, and SiLU(gate) * up.
// The same computation as the model's
// eager path (model.Block) without its ~30 small PyTorch ops per layer, and attention that reads each
// row's KV once for all query heads of a KV head (grouped-query attention). Built at first use by
// verl_efficientrollout.engine.cpu_kernels; registered as torch.ops.verl_efficientrollout.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
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


// ---- int4 weight-only linear (the self-drafter's GEMMs) ------------------------------------------
// Weights: torchao's asymmetric group-wise int4 (the tinygemm grid: q in 0..15, w = (q - 8) * scale + zero,
// scale and zero bfloat16 per group of 32 or 64 along K), re-laid for decode: row n, block of 32 along K
// -> 16 bytes, byte j = q[j] | q[j + 16] << 4. One output row's weights are contiguous, so a decode step
// (1-16 input rows) streams each byte once for all its rows.
// Activations: each row rounded to int16 per block of 32 (scale dx = max|x| / 32767, round to nearest:
// a relative error of 2^-16 of the block's largest value, far finer than bfloat16), so a block's dot
// product is 32 integer products (vpdpwssd on VNNI, vpmaddwd on AVX2). With b = zero - 8 * scale and
// xs = dx * Σ xi over the block:
//   out[m, n] = Σ_blocks (Σ_j q[j] * xi[j]) * scale * dx + b * xs   (+ bias; float32 sums)
// which is the dequantized weight times the int16-rounded activations, on every path (scalar, AVX2, VNNI),
// except the VNNI build's chunks of 8 and 16 rows: those multiply the dequantized weight into the float32
// activations themselves (int4_block_dequantized).

struct Int4Weights {
  const uint8_t* q;             // [N, K / 2]
  const uint16_t* scale_zero;   // [N, K / group, 2] bfloat16 bits
  int64_t n, k, group;
};

constexpr float kInt16Max = 32767.f;

struct Int16Rows {                    // the activations of a call, rounded per row and block of 32
  std::vector<int16_t> xi;            // [rows, K] in the vector path's order (kernel_order), else K order
  std::vector<float> dx, xs;          // [rows, K / 32]: each block's scale, and dx * Σ xi
  std::vector<float> dx16, xs16;      // [rows, K / 64, 16]: a pair of blocks' dx and xs / 8 over 16 lanes
};                                    // (lanes 0-7 the first block's, 8-15 the second's; VNNI path)

struct RowsView {                     // rows first.. of an Int16Rows
  const int16_t* xi;
  const float *dx, *xs, *dx16, *xs16;
};

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Where element j of a pair of blocks (64 along K) goes in the VNNI path: the unpacked weights come as
// [block 0's q 0-15, block 1's q 0-15] (low nibbles) and [block 0's 16-31, block 1's 16-31] (high).
inline int64_t kernel_order(int64_t j) { return (j % 32 < 16 ? 0 : 32) + (j / 32) * 16 + j % 16; }

Int16Rows quantize_rows(const float* x, int64_t rows, int64_t k, bool pairs) {
  const int64_t blocks = rows * k / 32;
  Int16Rows out{std::vector<int16_t>(rows * k), std::vector<float>(blocks), std::vector<float>(blocks), {}, {}};
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) {  // a NaN (or inf) makes amax NaN (inf) for good: the block's outputs are NaN
      const float v = std::fabs(xb[j]);
      if (std::isnan(v) || v > amax) amax = std::isnan(amax) ? amax : v;
    }
    const float inv = amax > 0.f ? kInt16Max / amax : 0.f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int v = std::max(-32767, std::min(32767, static_cast<int>(std::nearbyint(xb[j] * inv))));
      const int64_t at = pairs ? (b / 2) * 64 + kernel_order((b % 2) * 32 + j) : b * 32 + j;
      out.xi[at] = static_cast<int16_t>(v);
      sum += v;
    }
    out.dx[b] = amax / kInt16Max;
    out.xs[b] = out.dx[b] * static_cast<float>(sum);
  }
  if (pairs) {
    out.dx16.resize(blocks * 8);
    out.xs16.resize(blocks * 8);
    for (int64_t i = 0; i < blocks / 2; ++i)
      for (int l = 0; l < 16; ++l) {
        out.dx16[i * 16 + l] = out.dx[2 * i + l / 8];
        out.xs16[i * 16 + l] = out.xs[2 * i + l / 8] * 0.125f;  // the final 16-lane sum adds it eight times
      }
  }
  return out;
}

// Scalar path, and the arithmetic the others follow: one block of 32 at a time (activations in K order).
void int4_rows_scalar(const RowsView& a, int64_t rows, const Int4Weights& w, const float* bias, float* out,
                      int64_t out_stride, int64_t n_begin, int64_t n_end) {
  const int64_t blocks = w.k / 32, groups = w.k / w.group;
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < rows; ++m) {
      float acc = 0.f;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const uint16_t* sz = w.scale_zero + (n * groups + blk * 32 / w.group) * 2;
        const float scale = bf16_to_float(sz[0]), offset = bf16_to_float(sz[1]) - 8.f * scale;
        const uint8_t* bytes = w.q + n * (w.k / 2) + blk * 16;
        const int16_t* xi = a.xi + m * w.k + blk * 32;
        int dot = 0;
        for (int j = 0; j < 16; ++j) dot += (bytes[j] & 0xF) * xi[j] + (bytes[j] >> 4) * xi[j + 16];
        acc += static_cast<float>(dot) * (scale * a.dx[m * blocks + blk]) + offset * a.xs[m * blocks + blk];
      }
      out[m * out_stride + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define INT4_ISA "avx512-vnni"
#define INT4_VECTOR
// MR input rows x NR outputs at a time: each pair of blocks (64 weights) is unpacked once and
// multiplied into MR accumulators; NR independent outputs keep the pipes busy at one row.
template <int MR, int NR>
void int4_block(const RowsView& a, const Int4Weights& w, const float* bias, float* out, int64_t out_stride, int64_t n0) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t pairs = w.k / 64, groups = w.k / w.group;
  const __m512i low = _mm512_set1_epi16(0x0F);
  // A pair's scale_zero as [scale0, zero0, scale1, zero1] (group 32) or [scale, zero] (group 64), to lanes.
  const __m512i scale_idx = w.group == 32 ? _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0)
                                          : _mm512_setzero_si512();
  const __m512i zero_idx = w.group == 32 ? _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)
                                         : _mm512_set1_epi32(1);
  for (int64_t p = 0; p < pairs; ++p) {
    for (int j = 0; j < NR; ++j) {
      const int64_t n = n0 + j;
      const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q + n * (w.k / 2) + p * 32)));
      const __m512i q_low = _mm512_and_si512(bytes, low), q_high = _mm512_srli_epi16(bytes, 4);
      const uint16_t* sz = w.scale_zero + (n * groups + p * 64 / w.group) * 2;
      const __m128i bits = w.group == 32 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sz))
                                         : _mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(sz));
      const __m512 params = _mm512_castps128_ps512(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16)));
      const __m512 scale = _mm512_permutexvar_ps(scale_idx, params);
      const __m512 offset = _mm512_sub_ps(_mm512_permutexvar_ps(zero_idx, params), _mm512_mul_ps(_mm512_set1_ps(8.f), scale));
      for (int m = 0; m < MR; ++m) {
        const int16_t* x = a.xi + m * w.k + p * 64;
        const __m512i dot = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), q_low, _mm512_loadu_si512(x)),
                                                q_high, _mm512_loadu_si512(x + 32));
        const int64_t lane = (m * pairs + p) * 16;
        acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_loadu_ps(a.dx16 + lane)), acc[m][j]);
        acc[m][j] = _mm512_fmadd_ps(offset, _mm512_loadu_ps(a.xs16 + lane), acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) out[m * out_stride + n0 + j] = _mm512_reduce_add_ps(acc[m][j]) + (bias ? bias[n0 + j] : 0.f);
}

// Chunks of 8 or 16 rows are compute-bound, where the integer path's per-row work (two vpdpwssd, a
// conversion and two multiply-adds per 64 weights) costs more than dequantizing each weight once to
// float32 and multiplying it into every row's float32 activations (four multiply-adds per 64).
template <int MR>
void int4_block_dequantized(const float* x, const Int4Weights& w, const float* bias, float* out, int64_t out_stride, int64_t n) {
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(0x0F);
  const int64_t blocks = w.k / 32, groups = w.k / w.group;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const uint16_t* sz = w.scale_zero + (n * groups + blk * 32 / w.group) * 2;
    const float s = bf16_to_float(sz[0]);
    const __m512 scale = _mm512_set1_ps(s), offset = _mm512_set1_ps(bf16_to_float(sz[1]) - 8.f * s);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + n * (w.k / 2) + blk * 16)));
    const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), scale, offset);   // q 0-15
    const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), scale, offset);    // q 16-31
    for (int m = 0; m < MR; ++m) {
      acc[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + m * w.k + blk * 32), acc[m]);
      acc[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + m * w.k + blk * 32 + 16), acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) out[m * out_stride + n] = _mm512_reduce_add_ps(acc[m]) + (bias ? bias[n] : 0.f);
}
#define INT4_DEQUANTIZED_ROWS 8  // chunks of this many rows or more take int4_block_dequantized
constexpr int NR_1 = 4, NR_2 = 4, NR_4 = 4, NR_8 = 1, NR_16 = 1;  // accumulators MR x NR of 32 zmm registers
inline bool vector_path(int64_t k) { return k % 64 == 0; }  // pairs of blocks; another K runs the scalar path
#elif defined(__AVX2__) && defined(__FMA__)
#define INT4_ISA "avx2"
#define INT4_VECTOR
inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// One block of 32 at a time: vpmaddwd of the low and high nibbles with activations 0-15 and 16-31.
template <int MR, int NR>
void int4_block(const RowsView& a, const Int4Weights& w, const float* bias, float* out, int64_t out_stride, int64_t n0) {
  __m256 acc[MR][NR];
  float offsets[MR][NR] = {};
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_setzero_ps();
  const int64_t blocks = w.k / 32, groups = w.k / w.group;
  const __m256i low = _mm256_set1_epi16(0x0F);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int j = 0; j < NR; ++j) {
      const int64_t n = n0 + j;
      const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + n * (w.k / 2) + blk * 16)));
      const __m256i q_low = _mm256_and_si256(bytes, low), q_high = _mm256_srli_epi16(bytes, 4);
      const uint16_t* sz = w.scale_zero + (n * groups + blk * 32 / w.group) * 2;
      const float scale = bf16_to_float(sz[0]), offset = bf16_to_float(sz[1]) - 8.f * scale;
      for (int m = 0; m < MR; ++m) {
        const int16_t* x = a.xi + m * w.k + blk * 32;
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(q_low, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                                             _mm256_madd_epi16(q_high, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
        acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale * a.dx[m * blocks + blk]), acc[m][j]);
        offsets[m][j] += offset * a.xs[m * blocks + blk];
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j)
      out[m * out_stride + n0 + j] = hsum256(acc[m][j]) + offsets[m][j] + (bias ? bias[n0 + j] : 0.f);
}
constexpr int NR_1 = 4, NR_2 = 2, NR_4 = 2, NR_8 = 1, NR_16 = 1;  // accumulators MR x NR of 16 ymm registers
inline bool vector_path(int64_t) { return true; }
#else
#define INT4_ISA "scalar"
inline bool vector_path(int64_t) { return false; }
#endif

#ifdef INT4_VECTOR
// Outputs n_begin..n_end of MR input rows: NR outputs at a time, the rest one by one.
template <int MR, int NR>
void int4_rows(const RowsView& a, const Int4Weights& w, const float* bias, float* out, int64_t out_stride,
               int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + NR <= n_end; n += NR) int4_block<MR, NR>(a, w, bias, out, out_stride, n);
  for (; n < n_end; ++n) int4_block<MR, 1>(a, w, bias, out, out_stride, n);
}
#endif

std::string int4_kernel_isa() { return INT4_ISA; }

// `rows` (1, 2, 4, 8 or 16) rows of the call's activations, outputs n_begin..n_end.
void int4_chunk(const RowsView& a, const float* x, int64_t rows, const Int4Weights& w, const float* bias, float* out,
                int64_t out_stride, int64_t n_begin, int64_t n_end) {
#ifdef INT4_DEQUANTIZED_ROWS
  if (rows >= INT4_DEQUANTIZED_ROWS) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      if (rows == 16) int4_block_dequantized<16>(x, w, bias, out, out_stride, n);
      else int4_block_dequantized<8>(x, w, bias, out, out_stride, n);
    }
    return;
  }
#endif
#ifdef INT4_VECTOR
  if (vector_path(w.k)) {
    switch (rows) {
      case 1: return int4_rows<1, NR_1>(a, w, bias, out, out_stride, n_begin, n_end);
      case 2: return int4_rows<2, NR_2>(a, w, bias, out, out_stride, n_begin, n_end);
      case 4: return int4_rows<4, NR_4>(a, w, bias, out, out_stride, n_begin, n_end);
      case 8: return int4_rows<8, NR_8>(a, w, bias, out, out_stride, n_begin, n_end);
      case 16: return int4_rows<16, NR_16>(a, w, bias, out, out_stride, n_begin, n_end);
    }
  }
#endif
  int4_rows_scalar(a, rows, w, bias, out, out_stride, n_begin, n_end);
}

// x [..., K] float32 @ the int4 weight [N, K] (+ bias [N]) -> [..., N] float32.
at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& scale_zero_in,
                       const c10::optional<at::Tensor>& bias_in, int64_t group) {
  const at::Tensor x = x_in.contiguous(), q = q_in.contiguous(), scale_zero = scale_zero_in.contiguous();
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "int4_linear: x must be a float32 CPU tensor");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 2, "int4_linear: q must be [N, K / 2] uint8");
  TORCH_CHECK(group == 32 || group == 64, "int4_linear: group must be 32 or 64, got ", group);
  const int64_t k = x.size(-1), n = q.size(0);
  TORCH_CHECK(k % group == 0 && q.size(1) * 2 == k, "int4_linear: x's last dimension (", k, ") must be q's K (",
              q.size(1) * 2, ") and a multiple of the group (", group, ")");
  TORCH_CHECK(scale_zero.scalar_type() == at::kBFloat16 && scale_zero.dim() == 3 && scale_zero.size(0) == n &&
              scale_zero.size(1) == k / group && scale_zero.size(2) == 2,
              "int4_linear: scale_zero must be [N, K / group, 2] bfloat16");
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == n, "int4_linear: bias must be [N] float32");
  }
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto out = at::empty(sizes, x.options());
  const int64_t rows = x.numel() / k;
  const Int4Weights w{q.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale_zero.data_ptr<at::BFloat16>()), n, k, group};
  const float* xp = x.data_ptr<float>();
#ifdef INT4_DEQUANTIZED_ROWS
  const int64_t rounded_from = rows - rows % INT4_DEQUANTIZED_ROWS;  // the chunks of 8+ rows come first, in float32
  const bool pairs = vector_path(k);  // activations in the VNNI path's order
#else
  const int64_t rounded_from = 0;
  const bool pairs = false;
#endif
  const Int16Rows a = quantize_rows(xp + rounded_from * k, rows - rounded_from, k, pairs);  // only the rows that use it
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // Threads split the outputs (each weight byte read by one thread); rows go in chunks of 16, 8, 4, 2, 1.
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < rows;) {
      const int64_t left = rows - m, chunk = left >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
      const int64_t r = m - rounded_from, pair_lanes = pairs ? r * (k / 64) * 16 : 0;
      const RowsView view = r < 0 ? RowsView{} : RowsView{a.xi.data() + r * k, a.dx.data() + r * k / 32,
                                                           a.xs.data() + r * k / 32, a.dx16.data() + pair_lanes,
                                                           a.xs16.data() + pair_lanes};
      int4_chunk(view, xp + m * k, chunk, w, bp, op + m * n, n, begin, end);
      m += chunk;
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
  m.def("int4_linear(Tensor x, Tensor q, Tensor scale_zero, Tensor? bias, int group) -> Tensor");
  m.def("int4_kernel_isa() -> str", &int4_kernel_isa);
}

TORCH_LIBRARY_IMPL(verl_efficientrollout, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("int4_linear", &int4_linear);
}
