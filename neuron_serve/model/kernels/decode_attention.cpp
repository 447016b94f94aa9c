// neuron_serve::decode_attention(q, k, v, k_cache, v_cache, layer, positions, scale): one query token per
// slot. Slot s's query heads q[s] [H, D] attend the cached keys 0..positions[s]-1 of `layer` in the
// whole cache [layers, slots, G, max_seq_len, D] and the step's own key k[s] [G, D] (not in the cache
// yet); the H/G query heads that share KV head g read its keys and values once. Out [S, H, D] in q's
// dtype; the math is fp32.
//
// Why hand-written: the same attention in torch ops reads a padded KV bucket of every slot, adds a
// mask over it and copies scores between ops. Each slot here reads exactly the positions it has,
// once for the keys and once for the values (figures: docs/ARCHITECTURE.md, "Decode attention on
// the CPU").
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
inline void widen_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

bool has_avx2_fma() {
  static const bool available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return available;
}

// e^x for x <= 0 (a score minus its row's maximum), 8 at a time: 2^n times e^r, r = x - n ln 2, with
// e^r as 1 + r + r^2 P(r), P of degree 5 (Cephes' expf coefficients), about 1e-7 relative error.
// std::exp one value at a time would cost more than reading the keys.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  // Below -87, 2^n would leave float's exponent range; e^-87 (about 1e-38) is as good as 0 beside the
  // row maximum's e^0 = 1.
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln 2, in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// scores[j] = e^(scores[j] - top) for j < n; returns their sum.
__attribute__((target("avx2,fma"))) float exp_and_sum_avx2(float* scores, int64_t n, float top) {
  const __m256 shift = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), shift));
    _mm256_storeu_ps(scores + j, e);
    total = _mm256_add_ps(total, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  float sum = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
  for (; j < n; ++j) sum += scores[j] = std::exp(scores[j] - top);
  return sum;
}

float exp_and_sum(float* scores, int64_t n, float top) {
  if (has_avx2_fma()) return exp_and_sum_avx2(scores, n, top);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += scores[j] = std::exp(scores[j] - top);
  return sum;
}

// Rows of a slot's keys or values stream from memory once, faster than the hardware prefetcher
// fetches them on this kind of machine (as in weight_only_linear.cpp): fetch each cache line of the
// row kPrefetchRows rows further on.
constexpr int64_t kPrefetchRows = 16;

__attribute__((target("avx2,fma"))) inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) _mm_prefetch(reinterpret_cast<const char*>(row + d), _MM_HINT_T0);
}

// The R query rows (fp32, scaled) of one KV head against n key rows; scores [R][n] (row stride ld).
__attribute__((target("avx2,fma"))) void scores_avx2(const float* q, int64_t R, const float* keys, int64_t n,
                                                      int64_t D, float* scores, int64_t ld) {
  for (int64_t j = 0; j < n; ++j) {
    const float* key = keys + j * D;
    prefetch_row(key + kPrefetchRows * D, D);
    for (int64_t r = 0; r < R; ++r) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), _mm256_loadu_ps(key + d), acc);
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      scores[r * ld + j] = _mm_cvtss_f32(s);
    }
  }
}

void scores_plain(const float* q, int64_t R, const float* keys, int64_t n, int64_t D, float* scores, int64_t ld) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < R; ++r) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += q[r * D + d] * keys[j * D + d];
      scores[r * ld + j] = dot;
    }
}

// out[r] += sum_j probs[r][j] * values[j] for R rows.
__attribute__((target("avx2,fma"))) void weighted_sum_avx2(const float* probs, int64_t ld, int64_t R,
                                                            const float* values, int64_t n, int64_t D, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float* value = values + j * D;
    prefetch_row(value + kPrefetchRows * D, D);
    for (int64_t r = 0; r < R; ++r) {
      const __m256 p = _mm256_set1_ps(probs[r * ld + j]);
      for (int64_t d = 0; d < D; d += 8) {
        float* sum = out + r * D + d;
        _mm256_storeu_ps(sum, _mm256_fmadd_ps(p, _mm256_loadu_ps(value + d), _mm256_loadu_ps(sum)));
      }
    }
  }
}

void weighted_sum_plain(const float* probs, int64_t ld, int64_t R, const float* values, int64_t n, int64_t D,
                        float* out) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t d = 0; d < D; ++d) out[r * D + d] += probs[r * ld + j] * values[j * D + d];
}

// Rows of keys or values as fp32: the cache's own memory when it is fp32, else widened in chunks.
template <typename T>
class FloatRows {
 public:
  FloatRows(const T* rows, int64_t D) : rows_(rows), D_(D) {}
  // Rows first..first+n-1 (n <= kChunk).
  const float* get(int64_t first, int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
      return rows_ + first * D_;
    } else {
      buffer_.resize(n * D_);
      widen_row(rows_ + first * D_, buffer_.data(), n * D_);
      return buffer_.data();
    }
  }
  static constexpr int64_t kChunk = 64;

 private:
  const T* rows_;
  int64_t D_;
  std::vector<float> buffer_;
};

struct Shape {
  int64_t S, H, G, R, D, slots, max_len;
};

// One (slot, KV head): its R query heads attend the slot's n cached keys and its own.
template <typename T>
void attend_one(const Shape& sh, const T* q, const T* k, const T* v, const T* k_rows, const T* v_rows, int64_t n,
                float scale, T* out, std::vector<float>& scratch) {
  const bool simd = has_avx2_fma() && sh.D % 8 == 0;
  const int64_t R = sh.R, D = sh.D, ld = n + 1;
  scratch.assign(R * D + R * ld + R * D + 2 * D, 0.f);
  float* qf = scratch.data();
  float* scores = qf + R * D;
  float* acc = scores + R * ld;
  float* own = acc + R * D;  // the own key, then the own value, as fp32
  for (int64_t i = 0; i < R * D; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  widen_row(k, own, D);
  widen_row(v, own + D, D);
  auto score = simd ? scores_avx2 : scores_plain;
  auto weigh = simd ? weighted_sum_avx2 : weighted_sum_plain;
  FloatRows<T> keys(k_rows, D), values(v_rows, D);
  for (int64_t j = 0; j < n; j += FloatRows<T>::kChunk) {
    const int64_t m = std::min(FloatRows<T>::kChunk, n - j);
    score(qf, R, keys.get(j, m), m, D, scores + j, ld);
  }
  score(qf, R, own, 1, D, scores + n, ld);
  for (int64_t r = 0; r < R; ++r) {
    float* row = scores + r * ld;
    float top = row[0];
    for (int64_t j = 1; j <= n; ++j) top = std::max(top, row[j]);
    const float inverse = 1.f / exp_and_sum(row, n + 1, top);
    for (int64_t j = 0; j <= n; ++j) row[j] *= inverse;
  }
  for (int64_t j = 0; j < n; j += FloatRows<T>::kChunk) {
    const int64_t m = std::min(FloatRows<T>::kChunk, n - j);
    weigh(scores + j, ld, R, values.get(j, m), m, D, acc);
  }
  weigh(scores + n, ld, R, own + D, 1, D, acc);
  for (int64_t i = 0; i < R * D; ++i) out[i] = static_cast<T>(acc[i]);
}

template <typename T>
void attend_all(const Shape& sh, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t layer, const int64_t* positions,
                float scale, at::Tensor& out) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t row = sh.max_len * sh.D;  // one (slot, KV head)'s cache
  const T* kc = k_cache.data_ptr<T>() + layer * sh.slots * sh.G * row;
  const T* vc = v_cache.data_ptr<T>() + layer * sh.slots * sh.G * row;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, sh.S * sh.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / sh.G, g = item % sh.G;
      const int64_t heads = (s * sh.H + g * sh.R) * sh.D, cached = (s * sh.G + g) * row;
      attend_one<T>(sh, qp + heads, kp + (s * sh.G + g) * sh.D, vp + (s * sh.G + g) * sh.D, kc + cached, vc + cached,
                    positions[s], scale, op + heads, scratch);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, int64_t layer, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && k_cache.dim() == 5 &&
                  v_cache.sizes() == k_cache.sizes(),
              "decode_attention: q [S, H, D], k and v [S, G, D], caches [layers, slots, G, max_seq_len, D] expected");
  const Shape sh{q.size(0), q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), k_cache.size(1), k_cache.size(3)};
  TORCH_CHECK(k.size(0) == sh.S && k.size(2) == sh.D && k_cache.size(2) == sh.G && k_cache.size(4) == sh.D &&
                  sh.H % sh.G == 0 && sh.S <= sh.slots && 0 <= layer && layer < k_cache.size(0),
              "decode_attention: q ", q.sizes(), ", k ", k.sizes(), " and the cache ", k_cache.sizes(), " disagree");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: the caches must be contiguous");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_attention: fp32 or bf16 cache, got ", dtype);
  const at::Tensor qc = q.to(dtype).contiguous(), kc = k.to(dtype).contiguous(), vc = v.to(dtype).contiguous();
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t s = 0; s < sh.S; ++s)
    TORCH_CHECK(0 <= pp[s] && pp[s] < sh.max_len, "decode_attention: position ", pp[s], " of row ", s,
                " is outside the cache's ", sh.max_len);
  at::Tensor out = at::empty({sh.S, sh.H, sh.D}, qc.options());
  if (dtype == at::kFloat) {
    attend_all<float>(sh, qc, kc, vc, k_cache, v_cache, layer, pp, static_cast<float>(scale), out);
  } else {
    attend_all<at::BFloat16>(sh, qc, kc, vc, k_cache, v_cache, layer, pp, static_cast<float>(scale), out);
  }
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(neuron_serve, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, int layer, Tensor positions, "
      "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(neuron_serve, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
