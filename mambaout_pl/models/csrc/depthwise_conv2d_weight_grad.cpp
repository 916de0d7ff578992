// Weight gradient of a depthwise k x k convolution (stride 1, dilation 1, padding k / 2) on
// channels-last activations, float32 or bfloat16 in, float32 accumulation and output:
//
//   grad_weight[c, i, j] = sum over b, h, w of grad_output[b, h, w, c] * input[b, h + i - k/2, w + j - k/2, c]
//
// One work item is one image and one block of channels as wide as a SIMD register. It copies its
// input plane (zero-padded left and right) and, row by row, its output-gradient plane into
// float32 buffers, then accumulates the k x k products with k accumulator registers per kernel
// row, the input vectors of neighbouring columns reused from registers. The plane is walked in
// column tiles whose k input rows stay in the L1 cache. The images' partial sums are added in
// a fixed order, so the result does not depend on the number of threads.
//
// Odd K from 3 to 15; each size is one instantiation per SIMD width, so each adds compile time.
// Built on first use by mambaout_pl/models/depthwise_conv_backward.py with the machine's C++
// compiler and OpenMP; the SIMD width is chosen at run time (AVX-512, AVX2, else 128-bit), so
// one build runs on any CPU of its architecture.

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

enum { FLOAT32 = 0, BFLOAT16 = 1 };

// Copies `lanes` channels at `offset` of `src` into the L floats at `dst` (zeros past `lanes`).
template <int L>
inline __attribute__((always_inline)) void load_lanes(float* dst, const void* src, int64_t offset, int64_t lanes,
                                                      int dtype) {
  if (lanes == L) {
    if (dtype == FLOAT32) {
      memcpy(dst, static_cast<const float*>(src) + offset, sizeof(float) * L);
    } else {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      uint32_t* d = reinterpret_cast<uint32_t*>(dst);
      for (int j = 0; j < L; ++j) d[j] = static_cast<uint32_t>(s[j]) << 16;
    }
    return;
  }
  for (int64_t j = 0; j < L; ++j) {
    uint32_t bits = 0;
    if (j < lanes) {
      if (dtype == FLOAT32) {
        memcpy(&bits, static_cast<const float*>(src) + offset + j, sizeof(float));
      } else {
        bits = static_cast<uint32_t>(static_cast<const uint16_t*>(src)[offset + j]) << 16;
      }
    }
    memcpy(dst + j, &bits, sizeof(float));
  }
}

// One image `b` and channels [c0, c0 + L): acc[i * K + j] = the L sums of grad_weight[c, i, j].
// V: L floats; U: output columns per step of the innermost loop (registers: K + (K + U - 1) + 1).
template <typename V, int L, int K, int U>
inline __attribute__((always_inline)) void weight_grad_item(const void* grad, const void* input, int dtype, int64_t b,
                                                            int64_t c0, int64_t H, int64_t W, int64_t C, V* xpad,
                                                            V* grow, V* acc) {
  constexpr int P = K / 2;
  constexpr int PREFETCH_ROWS = 2;
  constexpr int64_t L1_BYTES = 20480;  // what the tile's K input rows and one gradient row may use
  constexpr int64_t TILE_FIT = (L1_BYTES / (4 * L) - K * (K - 1)) / (K + 1) / U * U;
  constexpr int64_t TILE = TILE_FIT > U ? TILE_FIT : U;
  const int64_t Wp = W + K - 1;
  const int64_t lanes = C - c0 < L ? C - c0 : L;
  const int64_t element = dtype == FLOAT32 ? 4 : 2;
  const char* grad_bytes = static_cast<const char*>(grad);
  const char* input_bytes = static_cast<const char*>(input);
  auto at = [&](int64_t h, int64_t w) { return ((b * H + h) * W + w) * C + c0; };
  auto pack_input_row = [&](int64_t h) {
    V* row = xpad + h * Wp;
    for (int j = 0; j < P; ++j) row[j] = V{}, row[W + P + j] = V{};
    for (int64_t w = 0; w < W; ++w) load_lanes<L>(reinterpret_cast<float*>(row + P + w), input, at(h, w), lanes, dtype);
  };

  for (int i = 0; i < K * K; ++i) acc[i] = V{};
  for (int64_t h = 0; h < P && h < H; ++h) pack_input_row(h);
  for (int64_t w0 = 0; w0 < W; w0 += TILE) {
    const int64_t tile = W - w0 < TILE ? W - w0 : TILE;
    for (int64_t h = 0; h < H; ++h) {
      if (w0 == 0) {
        if (h + P < H) pack_input_row(h + P);
        for (int64_t w = 0; h + PREFETCH_ROWS < H && w < W; ++w) {
          __builtin_prefetch(grad_bytes + at(h + PREFETCH_ROWS, w) * element);
          if (h + P + PREFETCH_ROWS < H) __builtin_prefetch(input_bytes + at(h + P + PREFETCH_ROWS, w) * element);
        }
      }
      for (int64_t w = 0; w < tile; ++w) load_lanes<L>(reinterpret_cast<float*>(grow + w), grad, at(h, w0 + w), lanes, dtype);
      const int i_begin = h < P ? P - h : 0;
      const int i_end = H + P - h < K ? H + P - h : K;
      for (int i = i_begin; i < i_end; ++i) {
        const V* x_row = xpad + (h + i - P) * Wp + w0;
        V a[K];
        for (int j = 0; j < K; ++j) a[j] = acc[i * K + j];
        int64_t w = 0;
        for (; w + U <= tile; w += U) {
          V x[K + U - 1];
          for (int j = 0; j < K + U - 1; ++j) x[j] = x_row[w + j];
          for (int u = 0; u < U; ++u) {
            const V g = grow[w + u];
            for (int j = 0; j < K; ++j) a[j] += g * x[u + j];
          }
        }
        for (; w < tile; ++w) {
          const V g = grow[w];
          for (int j = 0; j < K; ++j) a[j] += g * x_row[w + j];
        }
        for (int j = 0; j < K; ++j) acc[i * K + j] = a[j];
      }
    }
  }
}

typedef void (*item_fn)(const void*, const void*, int, int64_t, int64_t, int64_t, int64_t, int64_t, void*, void*,
                        void*);

#define DEFINE_ITEM(NAME, ATTRIBUTES, V, L, K, U)                                                               \
  ATTRIBUTES void NAME(const void* grad, const void* input, int dtype, int64_t b, int64_t c0, int64_t H, int64_t W, \
                       int64_t C, void* xpad, void* grow, void* acc) {                                         \
    weight_grad_item<V, L, K, U>(grad, input, dtype, b, c0, H, W, C, static_cast<V*>(xpad), static_cast<V*>(grow), \
                                 static_cast<V*>(acc));                                                        \
  }

#define DEFINE_ITEMS(ISA, ATTRIBUTES, V, L, U) \
  DEFINE_ITEM(item3_##ISA, ATTRIBUTES, V, L, 3, U) \
  DEFINE_ITEM(item5_##ISA, ATTRIBUTES, V, L, 5, U) \
  DEFINE_ITEM(item7_##ISA, ATTRIBUTES, V, L, 7, U) \
  DEFINE_ITEM(item9_##ISA, ATTRIBUTES, V, L, 9, U) \
  DEFINE_ITEM(item11_##ISA, ATTRIBUTES, V, L, 11, U) \
  DEFINE_ITEM(item13_##ISA, ATTRIBUTES, V, L, 13, U) \
  DEFINE_ITEM(item15_##ISA, ATTRIBUTES, V, L, 15, U)

#if defined(__x86_64__) || defined(__i386__)
DEFINE_ITEMS(avx512, __attribute__((target("avx512f"))), f32x16, 16, 4)
DEFINE_ITEMS(avx2, __attribute__((target("avx2,fma"))), f32x8, 8, 1)
#endif
DEFINE_ITEMS(base, , f32x4, 4, 1)

item_fn select_item(int K, int isa) {
  const int index = (K - 3) / 2;
  if (K < 3 || K > 15 || K % 2 == 0) return nullptr;
#if defined(__x86_64__) || defined(__i386__)
  static const item_fn avx512[] = {item3_avx512, item5_avx512, item7_avx512, item9_avx512,
                                   item11_avx512, item13_avx512, item15_avx512};
  static const item_fn avx2[] = {item3_avx2, item5_avx2, item7_avx2, item9_avx2, item11_avx2, item13_avx2, item15_avx2};
  if (isa == 2) return avx512[index];
  if (isa == 1) return avx2[index];
#endif
  static const item_fn base[] = {item3_base, item5_base, item7_base, item9_base, item11_base, item13_base, item15_base};
  return base[index];
}

void* aligned_buffer(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

}  // namespace

extern "C" {

// The widest SIMD this CPU runs: 2 AVX-512, 1 AVX2 with FMA, 0 128-bit vectors.
int mambaout_simd_level(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int mambaout_simd_lanes(int isa) { return isa == 2 ? 16 : isa == 1 ? 8 : 4; }

// grad_output, input: [B, H, W, C] dense (a channels-last [B, C, H, W] tensor), `dtype` 0 float32 or
// 1 bfloat16; out: [C, K, K] float32. Returns 0, 1 for an unsupported K or `isa`, 2 when out of memory.
int mambaout_depthwise_conv2d_weight_grad(const void* grad_output, const void* input, float* out, int dtype, int64_t B,
                                          int64_t H, int64_t W, int64_t C, int K, int isa, int threads) {
  if (isa < 0 || isa > mambaout_simd_level() || (dtype != FLOAT32 && dtype != BFLOAT16)) return 1;
  const item_fn item = select_item(K, isa);
  if (item == nullptr) return 1;
  const int64_t L = mambaout_simd_lanes(isa), blocks = (C + L - 1) / L, items = blocks * B, kk = K * K;
  float* partial = static_cast<float*>(aligned_buffer(sizeof(float) * items * kk * L));
  if (partial == nullptr) return 2;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float* xpad = static_cast<float*>(aligned_buffer(sizeof(float) * L * H * (W + K - 1)));
    float* grow = static_cast<float*>(aligned_buffer(sizeof(float) * L * W));
    if (xpad == nullptr || grow == nullptr) {
#pragma omp atomic write
      failed = 1;
    }
    // Consecutive items share an image, whose lines of channels the first item brings into cache.
#pragma omp for schedule(static)
    for (int64_t n = 0; n < items; ++n) {
      const int64_t b = n / blocks, block = n % blocks;
      if (xpad != nullptr && grow != nullptr)
        item(grad_output, input, dtype, b, block * L, H, W, C, xpad, grow, partial + (block * B + b) * kk * L);
    }
    free(xpad);
    free(grow);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t lanes = C - block * L < L ? C - block * L : L;
      for (int64_t t = 0; t < kk; ++t) {
        float sum[16] = {0.0f};
        for (int64_t b = 0; b < B; ++b) {
          const float* p = partial + ((block * B + b) * kk + t) * L;
          for (int64_t lane = 0; lane < L; ++lane) sum[lane] += p[lane];
        }
        for (int64_t lane = 0; lane < lanes; ++lane) out[(block * L + lane) * kk + t] = sum[lane];
      }
    }
  }
  free(partial);
  return failed ? 2 : 0;
}

}  // extern "C"
