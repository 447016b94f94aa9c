// neuron_serve::int8_weight_linear(x, weights, scales): x float [M, K] times each int8 weight [N_i, K]
// with one fp32 scale per output row [N_i, 1], outputs side by side [M, sum N_i], accumulated in fp32
// (weight-only quantization: the activations keep their precision). Several weights in one call, so
// q/k/v and gate/up cost one parallel region. Why hand-written: see model/quant_ops.py.
//
// Each weight streams from memory once per call: output rows are split among the threads in blocks
// that stay in cache while every tile of x's rows passes over them, and each int8 vector is widened
// to fp32 once per tile. Without AVX2 and FMA the same math runs as a dequantizing matmul.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t kRowTile = 6;  // rows of x per pass over a block of weights
constexpr int64_t kBlock = 32;   // output rows per block (32 x 1536 int8 = 48 KiB)
// Few rows of x: streaming the weights from memory is the cost, and the tiles' short rows are too
// short for the hardware prefetcher to run far enough ahead. Measured on the default model's weights
// (2-core AVX2 EPYC, 2 threads, interleaved runs): 1 row 17.0 -> 11.9 ms per step's weights, 4 rows
// 29.0 -> 16.4 ms, 8 rows 36.3 -> 26.7 ms; 1 KiB ahead gained nothing, 2 to 8 KiB about the same.
constexpr int64_t kPrefetchAhead = 4096;

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline __m256 widen(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

// ROWS rows of x (stride K) against COLS weight rows; y[r][c] = scale[c] * dot(x[r], w[c]) (y stride ldy).
template <int ROWS, int COLS>
__attribute__((target("avx2,fma"))) void tile(const float* x, const int8_t* w, const float* scale, float* y,
                                               int64_t K, int64_t ldy) {
  __m256 acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    // The tile reads its COLS rows (contiguous, COLS * K bytes) at COLS * 8 bytes per step: fetch one
    // cache line per 64 bytes read, kPrefetchAhead bytes further on.
    if ((k * COLS) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + COLS * k + kPrefetchAhead), _MM_HINT_T0);
    __m256 wv[COLS];
    for (int c = 0; c < COLS; ++c) wv[c] = widen(w + c * K + k);
    for (int r = 0; r < ROWS; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int c = 0; c < COLS; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) y[r * ldy + c] = horizontal_sum(acc[r][c]) * scale[c];
}

// Enough independent accumulators to hide the FMA latency (4 cycles, 2 per cycle), few enough to
// stay in the 16 vector registers: 4 weight rows for 1 or 2 rows of x, 2 for 3 to 6.
template <int ROWS>
void rows_against_block(const float* x, const int8_t* w, const float* scale, float* y, int64_t K, int64_t ldy,
                        int64_t first, int64_t last) {
  constexpr int COLS = ROWS <= 2 ? 4 : 2;
  int64_t n = first;
  for (; n + COLS <= last; n += COLS) tile<ROWS, COLS>(x, w + n * K, scale + n, y + n, K, ldy);
  for (; n < last; ++n) tile<ROWS, 1>(x, w + n * K, scale + n, y + n, K, ldy);
}

void rows_against(int64_t rows, const float* x, const int8_t* w, const float* scale, float* y, int64_t K,
                  int64_t ldy, int64_t first, int64_t last) {
  switch (rows) {
    case 6: return rows_against_block<6>(x, w, scale, y, K, ldy, first, last);
    case 5: return rows_against_block<5>(x, w, scale, y, K, ldy, first, last);
    case 4: return rows_against_block<4>(x, w, scale, y, K, ldy, first, last);
    case 3: return rows_against_block<3>(x, w, scale, y, K, ldy, first, last);
    case 2: return rows_against_block<2>(x, w, scale, y, K, ldy, first, last);
    default: return rows_against_block<1>(x, w, scale, y, K, ldy, first, last);
  }
}

bool has_avx2_fma() {
  static const bool available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return available;
}

at::Tensor dequantized_linear(const at::Tensor& x, at::TensorList weights, at::TensorList scales) {
  std::vector<at::Tensor> parts;
  for (size_t i = 0; i < weights.size(); ++i) {
    parts.push_back(at::mm(x, weights[i].to(x.scalar_type()).t()) * scales[i].reshape({1, -1}).to(x.scalar_type()));
  }
  return at::cat(parts, 1);
}

at::Tensor int8_weight_linear(const at::Tensor& x, at::TensorList weights, at::TensorList scales) {
  TORCH_CHECK(x.dim() == 2 && !weights.empty() && weights.size() == scales.size(),
              "int8_weight_linear: x [M, K] and as many scales as weights expected");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> offsets{0};  // each weight's first output column
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.scalar_type() == at::kChar && scales[i].numel() == w.size(0),
                "int8_weight_linear: each weight must be int8 [N, ", K, "] with N scales, got ", w.sizes());
    offsets.push_back(offsets.back() + w.size(0));
  }
  if (!has_avx2_fma() || K % 8 != 0) return dequantized_linear(x, weights, scales);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  std::vector<at::Tensor> wc, sc;
  std::vector<int64_t> block_start{0};  // blocks of weight i are block_start[i] .. block_start[i+1]
  for (size_t i = 0; i < weights.size(); ++i) {
    wc.push_back(weights[i].contiguous());
    sc.push_back(scales[i].to(at::kFloat).contiguous());
    block_start.push_back(block_start.back() + (weights[i].size(0) + kBlock - 1) / kBlock);
  }
  const int64_t ldy = offsets.back();
  at::Tensor y = at::empty({M, ldy}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, block_start.back(), 1, [&](int64_t begin, int64_t end) {
    size_t i = 0;
    for (int64_t b = begin; b < end; ++b) {
      while (b >= block_start[i + 1]) ++i;
      const int64_t N = wc[i].size(0), first = (b - block_start[i]) * kBlock, last = std::min(N, first + kBlock);
      const int8_t* wp = wc[i].data_ptr<int8_t>();
      const float* sp = sc[i].data_ptr<float>();
      for (int64_t m = 0; m < M; m += kRowTile) {
        rows_against(std::min(kRowTile, M - m), xp + m * K, wp, sp, yp + m * ldy + offsets[i], K, ldy, first, last);
      }
    }
  });
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(neuron_serve, m) {
  m.def("int8_weight_linear(Tensor x, Tensor[] weights, Tensor[] scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(neuron_serve, CPU, m) {
  m.impl("int8_weight_linear", &int8_weight_linear);
}
