// Weight-only quantized linear layers: x float [M, K] times each quantized weight [N_i, K], outputs
// side by side [M, sum N_i], accumulated in fp32 (the activations keep their precision). Several
// weights in one call, so q/k/v and gate/up cost one parallel region. Why hand-written: see
// model/quant_ops.py.
//
// - neuron_serve::int8_weight_linear(x, weights, scales): int8 [N, K], one fp32 scale per output row.
// - neuron_serve::int4_weight_linear(x, weights, scales, zeros, group_size): codes 0..15 packed two to
//   a byte [N, K/2] (column 2j in the low nibble, 2j+1 in the high one), fp16 scale and offset per
//   group of inputs [N, K/group_size]; the weight is code * scale + offset (GGUF Q4_1's form).
//
// Each weight streams from memory once per call: output rows are split among the threads in blocks
// that stay in cache while every tile of x's rows passes over them, and each weight vector is widened
// to fp32 once per tile, or, with 256-bit tiles from a weight type's kWidenFrom rows on, once per
// call. Without AVX2, FMA and F16C the same math runs as a dequantizing matmul.
//
// bf16 activations (the recipe chose bf16 because this CPU multiplies in it natively: AMX or
// avx512_bf16) of kBf16MatmulFrom rows or more go to oneDNN's bf16 matmul instead, on bf16 copies of
// the dequantized weights made on first use and kept for the life of the process (twice the int8
// bytes). Measured on a 2-core Sapphire Rapids (AMX), all 30 layers of the default model: 16 rows
// took 25 ms in the int8 kernel against about 17 in bf16, 128 rows 209 against about 24.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace {

constexpr int64_t kRowTile = 6;  // rows of x per pass over a block of weights
constexpr int64_t kBlock = 32;   // output rows per block (32 x 1536 int8 = 48 KiB)
constexpr int64_t kBf16MatmulFrom = 16;
// Few rows of x: streaming the weights from memory is the cost, and the tiles' short rows are too
// short for the hardware prefetcher to run far enough ahead. Measured on the default model's int8
// weights (2-core AVX2 EPYC, 2 threads, interleaved runs): 1 row 17.0 -> 11.9 ms per step's weights,
// 4 rows 29.0 -> 16.4 ms, 8 rows 36.3 -> 26.7 ms; 1 KiB ahead gained nothing, 2 to 8 KiB about the same.
constexpr int64_t kPrefetchAhead = 4096;

#define SIMD __attribute__((target("avx2,fma,f16c")))

SIMD inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The tile reads its COLS weight rows (contiguous) at `step_bytes` per step: fetch one cache line per
// 64 bytes read, kPrefetchAhead bytes further on.
SIMD inline void prefetch_ahead(const void* tile_start, int64_t bytes_read, int64_t step_bytes) {
  if (bytes_read % 64 < step_bytes)
    _mm_prefetch(static_cast<const char*>(tile_start) + bytes_read + kPrefetchAhead, _MM_HINT_T0);
}

// int8: ROWS rows of x (stride K) against COLS weight rows; y[r][c] = scale[c] * dot(x[r], w[c]).
template <int ROWS, int COLS>
SIMD void int8_tile(const float* x, const int8_t* w, const float* scale, float* y, int64_t K, int64_t ldy) {
  __m256 acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    prefetch_ahead(w, COLS * k, COLS * 8);
    __m256 wv[COLS];
    for (int c = 0; c < COLS; ++c)
      wv[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c * K + k))));
    for (int r = 0; r < ROWS; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int c = 0; c < COLS; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) y[r * ldy + c] = horizontal_sum(acc[r][c]) * scale[c];
}

// int4: ROWS rows of x (stride K, each run of 16 columns reordered evens first: see even_columns_first)
// against COLS rows of codes; 8 bytes hold 16 codes, whose low nibbles meet the even columns and
// high nibbles the odd ones, each widened to code * scale + offset of its group.
template <int ROWS, int COLS>
SIMD void int4_tile(const float* x, const uint8_t* w, const at::Half* scale, const at::Half* zero, float* y,
                    int64_t K, int64_t group, int64_t ldy) {
  const int64_t groups = K / group, row_bytes = K / 2;
  const __m256i low_nibble = _mm256_set1_epi32(15);
  __m256 acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 s[COLS], z[COLS];
    for (int c = 0; c < COLS; ++c) {
      s[c] = _mm256_set1_ps(_cvtsh_ss(scale[c * groups + g].x));
      z[c] = _mm256_set1_ps(_cvtsh_ss(zero[c * groups + g].x));
    }
    for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
      prefetch_ahead(w, COLS * k / 2, COLS * 8);
      for (int c = 0; c < COLS; ++c) {
        const __m256i bytes = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c * row_bytes + k / 2)));
        const __m256 even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_nibble)), s[c], z[c]);
        const __m256 odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), s[c], z[c]);
        for (int r = 0; r < ROWS; ++r) {
          acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), even, acc[r][c]);
          acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k + 8), odd, acc[r][c]);
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) y[r * ldy + c] = horizontal_sum(acc[r][c]);
}

// The same two tiles in 512-bit vectors, where the CPU has AVX-512: twice the weights per instruction.
// On a 2-core Sapphire Rapids, all 30 layers, 256- against 512-bit tiles in one process: int8 1 row
// 6.3 -> 6.1 ms, 4 rows 8.6 -> 6.6, 8 rows 15.8 -> 11.0, 15 rows 27.7 -> 18.5; int4 1 row 8.0 -> 7.3,
// 8 rows 23.9 -> 19.3. int4 then reorders x in runs of 32 columns.
#define SIMD512 __attribute__((target("avx512f,avx512bw,fma,f16c")))

SIMD512 inline float horizontal_sum512(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int ROWS, int COLS>
SIMD512 void int8_tile512(const float* x, const int8_t* w, const float* scale, float* y, int64_t K, int64_t ldy) {
  __m512 acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    prefetch_ahead(w, COLS * k, COLS * 16);
    __m512 wv[COLS];
    for (int c = 0; c < COLS; ++c)
      wv[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * K + k))));
    for (int r = 0; r < ROWS; ++r) {
      __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int c = 0; c < COLS; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) y[r * ldy + c] = horizontal_sum512(acc[r][c]) * scale[c];
}

template <int ROWS, int COLS>
SIMD512 void int4_tile512(const float* x, const uint8_t* w, const at::Half* scale, const at::Half* zero, float* y,
                          int64_t K, int64_t group, int64_t ldy) {
  const int64_t groups = K / group, row_bytes = K / 2;
  const __m512i low_nibble = _mm512_set1_epi32(15);
  __m512 acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    prefetch_ahead(w, COLS * k / 2, COLS * 16);
    for (int c = 0; c < COLS; ++c) {
      const __m512 s = _mm512_set1_ps(_cvtsh_ss(scale[c * groups + k / group].x));
      const __m512 z = _mm512_set1_ps(_cvtsh_ss(zero[c * groups + k / group].x));
      const __m512i bytes =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * row_bytes + k / 2)));
      const __m512 even = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, low_nibble)), s, z);
      const __m512 odd = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), s, z);
      for (int r = 0; r < ROWS; ++r) {
        acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + k), even, acc[r][c]);
        acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + k + 16), odd, acc[r][c]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) y[r * ldy + c] = horizontal_sum512(acc[r][c]);
}

// fp32: ROWS rows of x (stride K) against COLS rows of weights widened beforehand (stride K).
template <int ROWS, int COLS>
SIMD void float_tile(const float* x, const float* w, float* y, int64_t K, int64_t ldy) {
  __m256 acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[COLS];
    for (int c = 0; c < COLS; ++c) wv[c] = _mm256_loadu_ps(w + c * K + k);
    for (int r = 0; r < ROWS; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int c = 0; c < COLS; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) y[r * ldy + c] = horizontal_sum(acc[r][c]);
}

SIMD void widen_int8_rows(const int8_t* w, const float* scale, int64_t rows, int64_t K, float* out) {
  for (int64_t n = 0; n < rows; ++n) {
    const __m256 s = _mm256_set1_ps(scale[n]);
    for (int64_t k = 0; k < K; k += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + n * K + k));
      _mm256_storeu_ps(out + n * K + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), s));
    }
  }
}

// Rows of int4 codes widened in the 256-bit tiles' order of x: each run of 16 columns evens first.
SIMD void widen_int4_rows(const uint8_t* w, const at::Half* scale, const at::Half* zero, int64_t rows, int64_t K,
                          int64_t group, float* out) {
  const int64_t groups = K / group;
  const __m256i low_nibble = _mm256_set1_epi32(15);
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[n * groups + k / group].x));
      const __m256 z = _mm256_set1_ps(_cvtsh_ss(zero[n * groups + k / group].x));
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + (n * K + k) / 2)));
      _mm256_storeu_ps(out + n * K + k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_nibble)), s, z));
      _mm256_storeu_ps(out + n * K + k + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), s, z));
    }
  }
}

// NEURON_SERVE_CPU_ISA=avx2 keeps the 256-bit tiles on an AVX-512 CPU (what the tests of those tiles use).
bool has_avx512() {
  static const char* isa = std::getenv("NEURON_SERVE_CPU_ISA");
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                !(isa && std::string(isa) == "avx2");
  return available;
}

// One weight of the call, in the form its tiles read: quantized rows as they are, or widened to fp32.
struct Int8Weight {
  // Widening a block once per call pays from 64 rows on. All 30 layers, fp32 activations, 256-bit
  // tiles: on a 2-core Zen 3 EPYC 1.13x faster at 64 rows, 1.02x at 32; on a 2-core Sapphire Rapids
  // 64 rows 102 -> 100 ms, 128 rows 209 -> 197, 32 rows 51 -> 58.
  static constexpr int64_t kWidenFrom = 64;
  const int8_t* w;
  const float* scale;
  int64_t K;
  bool wide;  // 512-bit tiles
  template <int ROWS, int COLS>
  void tile(const float* x, int64_t n, float* y, int64_t ldy) const {
    if (wide)
      int8_tile512<ROWS, COLS>(x, w + n * K, scale + n, y, K, ldy);
    else
      int8_tile<ROWS, COLS>(x, w + n * K, scale + n, y, K, ldy);
  }
  void widen(int64_t first, int64_t last, float* out) const { widen_int8_rows(w + first * K, scale + first, last - first, K, out); }
};

struct Int4Weight {
  // Unpacking costs more per code than widening int8, so widening once pays earlier (Sapphire Rapids,
  // as above): 32 rows 78 -> 66 ms, 128 rows 302 -> 212.
  static constexpr int64_t kWidenFrom = 32;
  const uint8_t* w;
  const at::Half* scale;
  const at::Half* zero;
  int64_t K, group;
  bool wide;  // 512-bit tiles: x reordered in runs of 32
  template <int ROWS, int COLS>
  void tile(const float* x, int64_t n, float* y, int64_t ldy) const {
    const int64_t groups = K / group;
    if (wide)
      int4_tile512<ROWS, COLS>(x, w + n * K / 2, scale + n * groups, zero + n * groups, y, K, group, ldy);
    else
      int4_tile<ROWS, COLS>(x, w + n * K / 2, scale + n * groups, zero + n * groups, y, K, group, ldy);
  }
  void widen(int64_t first, int64_t last, float* out) const {
    const int64_t groups = K / group;
    widen_int4_rows(w + first * K / 2, scale + first * groups, zero + first * groups, last - first, K, group, out);
  }
};

// A block of weight rows widened to fp32 (row n of the block at n - first).
struct WidenedBlock {
  const float* w;
  int64_t K, first;
  template <int ROWS, int COLS>
  void tile(const float* x, int64_t n, float* y, int64_t ldy) const {
    float_tile<ROWS, COLS>(x, w + (n - first) * K, y, K, ldy);
  }
};

// Enough independent accumulators to hide the FMA latency (4 cycles, 2 per cycle), few enough to
// stay in the 16 vector registers: 4 weight rows for 1 or 2 rows of x, 2 for 3 to 6.
template <int ROWS, class Weight>
void rows_against_block(const Weight& weight, const float* x, float* y, int64_t ldy, int64_t first, int64_t last) {
  constexpr int COLS = ROWS <= 2 ? 4 : 2;
  int64_t n = first;
  for (; n + COLS <= last; n += COLS) weight.template tile<ROWS, COLS>(x, n, y + n, ldy);
  for (; n < last; ++n) weight.template tile<ROWS, 1>(x, n, y + n, ldy);
}

template <class Weight>
void rows_against(int64_t rows, const Weight& weight, const float* x, float* y, int64_t ldy, int64_t first,
                  int64_t last) {
  switch (rows) {
    case 6: return rows_against_block<6>(weight, x, y, ldy, first, last);
    case 5: return rows_against_block<5>(weight, x, y, ldy, first, last);
    case 4: return rows_against_block<4>(weight, x, y, ldy, first, last);
    case 3: return rows_against_block<3>(weight, x, y, ldy, first, last);
    case 2: return rows_against_block<2>(weight, x, y, ldy, first, last);
    default: return rows_against_block<1>(weight, x, y, ldy, first, last);
  }
}

// x [M, K] fp32 against every weight, output rows in blocks of kBlock spread over the threads.
template <class Weight>
at::Tensor blocks_in_parallel(const at::Tensor& xf, const std::vector<Weight>& weights, const std::vector<int64_t>& rows) {
  const int64_t M = xf.size(0), K = xf.size(1);
  std::vector<int64_t> offsets{0}, block_start{0};  // weight i: its first output column, its first block
  for (int64_t n : rows) {
    offsets.push_back(offsets.back() + n);
    block_start.push_back(block_start.back() + (n + kBlock - 1) / kBlock);
  }
  const int64_t ldy = offsets.back();
  at::Tensor y = at::empty({M, ldy}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, block_start.back(), 1, [&](int64_t begin, int64_t end) {
    size_t i = 0;
    for (int64_t b = begin; b < end; ++b) {
      while (b >= block_start[i + 1]) ++i;
      const int64_t first = (b - block_start[i]) * kBlock, last = std::min(rows[i], first + kBlock);
      // The 512-bit tiles beat widening into the 256-bit fp32 tile at every size (Sapphire Rapids,
      // all 30 layers: int8 16 rows 20 against 39 ms, 128 rows 140 against 206; int4 32 rows 63
      // against 82, 128 rows 232 against 238).
      if (weights[i].wide || M < Weight::kWidenFrom) {
        for (int64_t m = 0; m < M; m += kRowTile)
          rows_against(std::min(kRowTile, M - m), weights[i], xp + m * K, yp + m * ldy + offsets[i], ldy, first, last);
        continue;
      }
      thread_local std::vector<float> widened;
      widened.resize(kBlock * K);
      weights[i].widen(first, last, widened.data());
      const WidenedBlock block{widened.data(), K, first};
      for (int64_t m = 0; m < M; m += kRowTile)
        rows_against(std::min(kRowTile, M - m), block, xp + m * K, yp + m * ldy + offsets[i], ldy, first, last);
    }
  });
  return y;
}

bool has_simd() {
  static const bool available =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return available;
}

// x against the weights as one float matrix [sum N_i, K]: the matmul without SIMD kernels.
at::Tensor dequantized_linear(const at::Tensor& x, const at::Tensor& weights) {
  return at::mm(x, weights.to(x.scalar_type()).t());
}

// The bf16 copy of a call's weights, dequantized by `make` the first time these tensors are seen.
// The entry keeps the tensors it was made from, so their memory is never reused under the same key.
template <class Make>
const at::Tensor& bf16_weights(const std::vector<at::Tensor>& sources, Make make) {
  static std::mutex mutex;
  static std::map<std::vector<const void*>, std::pair<std::vector<at::Tensor>, at::Tensor>> copies;
  std::vector<const void*> key;
  for (const at::Tensor& t : sources) key.push_back(t.data_ptr());
  std::lock_guard<std::mutex> lock(mutex);
  auto found = copies.find(key);
  if (found == copies.end()) found = copies.emplace(key, std::make_pair(sources, make())).first;
  return found->second.second;
}

bool bf16_matmul(const at::Tensor& x) { return x.scalar_type() == at::kBFloat16 && x.size(0) >= kBf16MatmulFrom; }

// The weights dequantized, one matrix [sum N_i, K] in `dtype` (each weight through fp32 on its own,
// so that no fp32 copy of them all is made).
at::Tensor int8_floats(at::TensorList weights, at::TensorList scales, at::ScalarType dtype) {
  std::vector<at::Tensor> floats;
  for (size_t i = 0; i < weights.size(); ++i)
    floats.push_back((weights[i].to(at::kFloat) * scales[i].reshape({-1, 1})).to(dtype));
  return at::cat(floats);
}

at::Tensor int4_floats(at::TensorList weights, at::TensorList scales, at::TensorList zeros, int64_t group,
                       at::ScalarType dtype) {
  std::vector<at::Tensor> floats;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t N = weights[i].size(0);
    const at::Tensor codes = at::stack({weights[i].bitwise_and(15), weights[i].bitwise_right_shift(4)}, -1);
    const at::Tensor groups = codes.reshape({N, -1, group}).to(at::kFloat);
    floats.push_back((groups * scales[i].to(at::kFloat).reshape({N, -1, 1}) + zeros[i].to(at::kFloat).reshape({N, -1, 1}))
                         .reshape({N, -1})
                         .to(dtype));
  }
  return at::cat(floats);
}

at::Tensor int8_weight_linear(const at::Tensor& x, at::TensorList weights, at::TensorList scales) {
  TORCH_CHECK(x.dim() == 2 && !weights.empty() && weights.size() == scales.size(),
              "int8_weight_linear: x [M, K] and as many scales as weights expected");
  const int64_t K = x.size(1);
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(1) == K && weights[i].scalar_type() == at::kChar &&
                    scales[i].numel() == weights[i].size(0),
                "int8_weight_linear: each weight must be int8 [N, ", K, "] with N scales, got ", weights[i].sizes());
  }
  if (bf16_matmul(x)) {
    std::vector<at::Tensor> sources(weights.begin(), weights.end());
    sources.insert(sources.end(), scales.begin(), scales.end());
    return at::mm(x, bf16_weights(sources, [&] { return int8_floats(weights, scales, at::kBFloat16); }).t());
  }
  if (!has_simd() || K % 8 != 0) return dequantized_linear(x, int8_floats(weights, scales, at::kFloat));
  const bool wide = has_avx512() && K % 16 == 0;
  std::vector<at::Tensor> kept;  // contiguous copies, alive for the call
  std::vector<Int8Weight> views;
  std::vector<int64_t> rows;
  for (size_t i = 0; i < weights.size(); ++i) {
    kept.push_back(weights[i].contiguous());
    kept.push_back(scales[i].to(at::kFloat).contiguous());
    views.push_back({kept[2 * i].data_ptr<int8_t>(), kept[2 * i + 1].data_ptr<float>(), K, wide});
    rows.push_back(weights[i].size(0));
  }
  return blocks_in_parallel(x.to(at::kFloat).contiguous(), views, rows).to(x.scalar_type());
}

// x with each run of `run` columns reordered: its even columns, then its odd ones.
at::Tensor even_columns_first(const at::Tensor& x, int64_t run) {
  const int64_t M = x.size(0), K = x.size(1);
  return x.to(at::kFloat).reshape({M, K / run, run / 2, 2}).transpose(2, 3).contiguous().reshape({M, K});
}

at::Tensor int4_weight_linear(const at::Tensor& x, at::TensorList weights, at::TensorList scales,
                              at::TensorList zeros, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && !weights.empty() && weights.size() == scales.size() && weights.size() == zeros.size(),
              "int4_weight_linear: x [M, K] and as many scales and zeros as weights expected");
  const int64_t K = x.size(1);
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "int4_weight_linear: group_size ", group_size,
              " must divide the ", K, " inputs");
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t N = weights[i].size(0);
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(1) * 2 == K && weights[i].scalar_type() == at::kByte &&
                    scales[i].numel() == N * (K / group_size) && zeros[i].numel() == N * (K / group_size),
                "int4_weight_linear: each weight must be uint8 [N, ", K / 2, "] with [N, ", K / group_size,
                "] scales and zeros, got ", weights[i].sizes());
  }
  if (bf16_matmul(x)) {
    std::vector<at::Tensor> sources(weights.begin(), weights.end());
    sources.insert(sources.end(), scales.begin(), scales.end());
    sources.insert(sources.end(), zeros.begin(), zeros.end());
    return at::mm(x, bf16_weights(sources, [&] { return int4_floats(weights, scales, zeros, group_size, at::kBFloat16); }).t());
  }
  if (!has_simd() || group_size % 16 != 0) return dequantized_linear(x, int4_floats(weights, scales, zeros, group_size, at::kFloat));
  const bool wide = has_avx512() && group_size % 32 == 0;
  std::vector<at::Tensor> kept;  // contiguous copies, alive for the call
  std::vector<Int4Weight> views;
  std::vector<int64_t> rows;
  for (size_t i = 0; i < weights.size(); ++i) {
    kept.push_back(weights[i].contiguous());
    kept.push_back(scales[i].to(at::kHalf).contiguous());
    kept.push_back(zeros[i].to(at::kHalf).contiguous());
    views.push_back({kept[3 * i].data_ptr<uint8_t>(), kept[3 * i + 1].data_ptr<at::Half>(),
                     kept[3 * i + 2].data_ptr<at::Half>(), K, group_size, wide});
    rows.push_back(weights[i].size(0));
  }
  return blocks_in_parallel(even_columns_first(x, wide ? 32 : 16), views, rows).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(neuron_serve, m) {
  m.def("int8_weight_linear(Tensor x, Tensor[] weights, Tensor[] scales) -> Tensor");
  m.def("int4_weight_linear(Tensor x, Tensor[] weights, Tensor[] scales, Tensor[] zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(neuron_serve, CPU, m) {
  m.impl("int8_weight_linear", &int8_weight_linear);
  m.impl("int4_weight_linear", &int4_weight_linear);
}
