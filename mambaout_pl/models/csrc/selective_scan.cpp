// Selective state-space scan (S6, Mamba's `selective_scan_fn`) on CPU, forward and backward, with
// float32 or bfloat16 tensors in and float32 arithmetic. Per channel c of group g and token t:
//
//   dt      = softplus(delta[c, t] + bias[c])           (or delta + bias without softplus)
//   h[n]    = exp(dt * A[c, n]) * h[n] + dt * B[g, n, t] * u[c, t]      for n < N, from h = 0
//   out[c, t] = (sum_n C[g, n, t] * h[n] + D[c] * u[c, t]) * silu(z[c, t])
//
// Vectorised over channels: one SIMD register holds one token of W consecutive channels of a group,
// so the N states of W channels stay in N registers and the products with B and C broadcast one
// value to every lane. A work item is one batch element, one group and a run of channel blocks
// ("part"); it steps through the tokens in tiles of T, the tile's inputs transposed into
// [token][lane] buffers.
//
// The backward recomputes the states instead of storing them: a first pass keeps the state at the
// start of every tile (a checkpoint), then the tiles are walked backwards, each one's states
// recomputed from its checkpoint and the gradients carried back through it. The gradients of B and
// C (shared by the channels of a group) are summed over the part's blocks in [token][state] vector
// buffers, over lanes once per tile, and over parts in a fixed order at the end, so the results do
// not depend on the number of threads.
//
// Built on first use by mambaout_pl/models/selective_scan_kernel.py with the machine's C++ compiler
// and OpenMP; the SIMD width is chosen at run time (AVX-512, AVX2, else 128-bit vectors).

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

template <typename F>
struct IntVector;
template <>
struct IntVector<f32x16> {
  typedef i32x16 type;
};
template <>
struct IntVector<f32x8> {
  typedef i32x8 type;
};
template <>
struct IntVector<f32x4> {
  typedef i32x4 type;
};

#define INLINE inline __attribute__((always_inline))

enum { FLOAT32 = 0, BFLOAT16 = 1 };
constexpr int64_t TILE = 32;                         // tokens per tile
constexpr int64_t MIN_ITEMS = 32;                    // work items to aim for, for the threads to share
constexpr int64_t CHECKPOINT_BYTES = 4 << 20;        // most checkpoint memory one work item may hold
constexpr int64_t MAX_BLOCKS_PER_PART = 64;
constexpr float LOG2E = 1.44269504088896341f;
constexpr float LN2_HI = 0.693145751953125f;         // ln 2 to 16 bits: exact times any exponent
constexpr float LN2_LO = 1.42860682030941723e-06f;   // ln 2 - LN2_HI
constexpr float SQRT2 = 1.41421356237309505f;
constexpr float SOFTPLUS_THRESHOLD = 20.0f;          // softplus(x) = x above it, as in PyTorch and mamba_ssm

template <typename F>
INLINE F splat(float x) {
  return F{} + x;
}

template <typename To, typename From>
INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// e^x to about 1e-7 relative: x = k ln 2 + r with |r| <= ln(2) / 2, e^r by its Taylor series to r^7
// (remainder below 1e-8), 2^k through the exponent bits. 0 below -88, no overflow above 88.
template <typename F>
INLINE F vexp(F x) {
  typedef typename IntVector<F>::type I;
  const F low = splat<F>(-88.0f), high = splat<F>(88.0f);
  x = x < low ? low : x;
  x = x > high ? high : x;
  const F round = splat<F>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const F k = (x * LOG2E + round) - round;
  const F r = (x - k * LN2_HI) - k * LN2_LO;
  F p = splat<F>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I bits = (__builtin_convertvector(k, I) + 127) << 23;  // k = -127 gives 0
  return p * bit_cast<F>(bits);
}

// ln x for positive normal x: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s) with
// s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^9 (remainder below 1e-8 relative).
template <typename F>
INLINE F vlog(F x) {
  typedef typename IntVector<F>::type I;
  const I bits = bit_cast<I>(x);
  I exponent = ((bits >> 23) & 0xff) - 127;
  const I mantissa_bits = (bits & 0x007fffff) | 0x3f800000;
  F m = bit_cast<F>(mantissa_bits);  // [1, 2)
  const I above = m > SQRT2;                         // -1 where true
  m = above ? m * 0.5f : m;
  exponent -= above;
  const F f = m - 1.0f;
  const F s = f / (f + 2.0f);
  const F s2 = s * s;
  F p = splat<F>(1.0f / 9.0f);
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const F e = __builtin_convertvector(exponent, F);
  return e * LN2_HI + (2.0f * s * p + e * LN2_LO);
}

// ln(1 + e^x), with ln(1 + w) as ln(u) * w / (u - 1) for u = 1 + w (exact to a few units in the
// last place even where u rounds), and x itself above the threshold.
template <typename F>
INLINE F vsoftplus(F x) {
  const F w = vexp(x);
  const F u = w + 1.0f;
  const F small = vlog(u) * (w / (u - 1.0f));
  const F value = u == splat<F>(1.0f) ? w : small;
  return x > SOFTPLUS_THRESHOLD ? x : value;
}

template <typename F>
INLINE F vsigmoid(F x) {
  return 1.0f / (1.0f + vexp(-x));
}

template <typename E>
INLINE float to_float(E value);
template <>
INLINE float to_float<float>(float value) {
  return value;
}
template <>
INLINE float to_float<uint16_t>(uint16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value) << 16;
  float result;
  memcpy(&result, &bits, sizeof(result));
  return result;
}

template <typename E>
INLINE E from_float(float value);
template <>
INLINE float from_float<float>(float value) {
  return value;
}
template <>
INLINE uint16_t from_float<uint16_t>(float value) {  // to bfloat16, to nearest, ties to even
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

struct Tensors {
  const void* u;           // [batch, channels, length]
  const void* delta;       // [batch, channels, length]
  const float* A;          // [channels, state]
  const void* B;           // [batch, groups, state, length]
  const void* C;           // [batch, groups, state, length]
  const float* D;          // [channels] or null
  const void* z;           // [batch, channels, length] or null
  const float* delta_bias; // [channels] or null
  const void* grad_out;    // [batch, channels, length], backward only
  void* out;               // [batch, channels, length], forward only
  void* grad_u;            // backward outputs: grad_u, grad_delta, grad_z like u; the rest float32
  void* grad_delta;
  float* grad_A;
  float* grad_B;
  float* grad_C;
  float* grad_D;
  void* grad_z;            // null without z
  float* grad_delta_bias;
};

struct Shape {
  int64_t batch, channels, length, state, groups;
  int32_t softplus, dtype;
};

// How channel blocks of W lanes are split into work items.
struct Plan {
  int64_t per_group, blocks, tiles, blocks_per_part, parts;
};

Plan make_plan(const Shape& s, int64_t W) {
  Plan plan;
  plan.per_group = s.channels / s.groups;
  plan.blocks = (plan.per_group + W - 1) / W;
  plan.tiles = (s.length + TILE - 1) / TILE;
  const int64_t by_memory = CHECKPOINT_BYTES / (plan.tiles * s.state * W * 4 + 1);
  const int64_t wanted_parts = (MIN_ITEMS + s.batch * s.groups - 1) / (s.batch * s.groups);
  const int64_t by_items = (plan.blocks + wanted_parts - 1) / wanted_parts;
  int64_t per_part = plan.blocks < by_memory ? plan.blocks : by_memory;
  per_part = per_part < by_items ? per_part : by_items;
  per_part = per_part < MAX_BLOCKS_PER_PART ? per_part : MAX_BLOCKS_PER_PART;
  plan.blocks_per_part = per_part > 1 ? per_part : 1;
  plan.parts = (plan.blocks + plan.blocks_per_part - 1) / plan.blocks_per_part;
  return plan;
}

// Whole W x W blocks are transposed in registers: log2(W) rounds, round D swapping bit D of the row
// index with bit D of the column index (the off-diagonal D x D blocks of every 2D x 2D block).
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define HAVE_SHUFFLEVECTOR 1
#else
#define HAVE_SHUFFLEVECTOR 0  // older GCC: element by element
#endif

template <int64_t W>
struct Lanes;
template <>
struct Lanes<16> {
  typedef f32x16 F;
  typedef uint32_t U __attribute__((vector_size(64)));
  typedef uint16_t H __attribute__((vector_size(32)));
};
template <>
struct Lanes<8> {
  typedef f32x8 F;
  typedef uint32_t U __attribute__((vector_size(32)));
  typedef uint16_t H __attribute__((vector_size(16)));
};
template <>
struct Lanes<4> {
  typedef f32x4 F;
  typedef uint32_t U __attribute__((vector_size(16)));
  typedef uint16_t H __attribute__((vector_size(8)));
};

#if HAVE_SHUFFLEVECTOR
template <typename F, int64_t W, int64_t D, size_t... J>
INLINE void swap_blocks(F& a, F& b, std::index_sequence<J...>) {
  const F low = __builtin_shufflevector(a, b, ((J & D) == 0 ? J : W + J - D)...);
  const F high = __builtin_shufflevector(a, b, ((J & D) == 0 ? J + D : W + J)...);
  a = low;
  b = high;
}

template <typename F, int64_t W, int64_t D>
INLINE void transpose_round(F* rows) {
  if constexpr (D < W) {
    for (int64_t i = 0; i < W; ++i)
      if ((i & D) == 0) swap_blocks<F, W, D>(rows[i], rows[i + D], std::make_index_sequence<W>{});
    transpose_round<F, W, 2 * D>(rows);
  }
}
#endif

template <typename E, int64_t W>
INLINE typename Lanes<W>::F load_row(const E* src) {
  typedef typename Lanes<W>::F F;
  if constexpr (sizeof(E) == 4) {
    F v;
    memcpy(&v, src, sizeof(F));
    return v;
  } else {
    typename Lanes<W>::H half;
    memcpy(&half, src, sizeof(half));
    return bit_cast<F>(__builtin_convertvector(half, typename Lanes<W>::U) << 16);
  }
}

template <typename E, int64_t W>
INLINE void store_row(E* dst, typename Lanes<W>::F v) {
  if constexpr (sizeof(E) == 4) {
    memcpy(dst, &v, sizeof(v));
  } else {  // to bfloat16, to nearest, ties to even; NaNs stay quiet NaNs
    typedef typename Lanes<W>::U U;
    const U bits = bit_cast<U>(v);
    const U rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const U nan = (bits & 0x7fffffffu) > 0x7f800000u;
    const U result = nan ? (bits >> 16) | 0x40u : rounded;
    const typename Lanes<W>::H half = __builtin_convertvector(result, typename Lanes<W>::H);
    memcpy(dst, &half, sizeof(half));
  }
}

// Rows `row0 .. row0 + lanes` of a [rows, length] tensor, tokens t0 .. t0 + count, into dst[t * W + lane].
template <typename E, int64_t W>
INLINE void load_tile(const void* src, int64_t row0, int64_t lanes, int64_t length, int64_t t0, int64_t count,
                      float* dst) {
  typedef typename Lanes<W>::F F;
  const E* base = static_cast<const E*>(src) + row0 * length + t0;
  int64_t done = 0;
#if HAVE_SHUFFLEVECTOR
  if (lanes == W) {
    for (; done + W <= count; done += W) {
      F rows[W];
      for (int64_t lane = 0; lane < W; ++lane) rows[lane] = load_row<E, W>(base + lane * length + done);
      transpose_round<F, W, 1>(rows);
      for (int64_t t = 0; t < W; ++t) memcpy(dst + (done + t) * W, &rows[t], sizeof(F));
    }
  }
#endif
  for (int64_t lane = 0; lane < W; ++lane) {
    const E* row = base + lane * length;
    for (int64_t t = done; t < count; ++t) dst[t * W + lane] = lane < lanes ? to_float<E>(row[t]) : 0.0f;
  }
}

template <typename E, int64_t W>
INLINE void store_tile(const float* src, int64_t row0, int64_t lanes, int64_t length, int64_t t0, int64_t count,
                       void* dst) {
  typedef typename Lanes<W>::F F;
  E* base = static_cast<E*>(dst) + row0 * length + t0;
  int64_t done = 0;
#if HAVE_SHUFFLEVECTOR
  if (lanes == W) {
    for (; done + W <= count; done += W) {
      F rows[W];
      for (int64_t t = 0; t < W; ++t) memcpy(&rows[t], src + (done + t) * W, sizeof(F));
      transpose_round<F, W, 1>(rows);
      for (int64_t lane = 0; lane < W; ++lane) store_row<E, W>(base + lane * length + done, rows[lane]);
    }
  }
#endif
  for (int64_t lane = 0; lane < lanes; ++lane) {
    E* row = base + lane * length;
    for (int64_t t = done; t < count; ++t) row[t] = from_float<E>(src[t * W + lane]);
  }
}

template <typename F, int64_t W>
INLINE F load_lanes(const float* src, int64_t stride, int64_t lanes) {
  F v = F{};
  for (int64_t lane = 0; lane < lanes; ++lane) v[lane] = src[lane * stride];
  return v;
}

// B or C of batch element b, group g, as [token][state] floats.
template <typename E>
INLINE void load_transposed(const void* src, const Shape& s, int64_t b, int64_t g, float* dst) {
  const int64_t N = s.state, L = s.length;
  for (int64_t n = 0; n < N; ++n) {
    const E* row = static_cast<const E*>(src) + ((b * s.groups + g) * N + n) * L;
    for (int64_t t = 0; t < L; ++t) dst[t * N + n] = to_float<E>(row[t]);
  }
}

void* aligned_buffer(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64 + 64); }

// The per-block constants: A's rows, D and the step-size bias of the block's channels.
template <typename F, int64_t W>
struct BlockConstants {
  int64_t c0, lanes;
  F D, bias;
};

template <typename F, int64_t W>
INLINE BlockConstants<F, W> block_constants(const Tensors& x, const Shape& s, const Plan& plan, int64_t g,
                                            int64_t block, F* A) {
  BlockConstants<F, W> k;
  k.c0 = g * plan.per_group + block * W;
  const int64_t left = (g + 1) * plan.per_group - k.c0;
  k.lanes = left < W ? left : W;
  for (int64_t n = 0; n < s.state; ++n) A[n] = load_lanes<F, W>(x.A + k.c0 * s.state + n, s.state, k.lanes);
  k.D = x.D != nullptr ? load_lanes<F, W>(x.D + k.c0, 1, k.lanes) : F{};
  k.bias = x.delta_bias != nullptr ? load_lanes<F, W>(x.delta_bias + k.c0, 1, k.lanes) : F{};
  return k;
}

template <typename F>
INLINE F step_size(F delta, F bias, bool softplus) {
  const F d = delta + bias;
  return softplus ? vsoftplus(d) : d;
}

template <typename F>
INLINE F vload(const float* p) {
  F v;
  memcpy(&v, p, sizeof(F));
  return v;
}

template <typename F>
INLINE void vstore(float* p, F v) {
  memcpy(p, &v, sizeof(F));
}

// Per-thread buffers, sized for the widest vectors (16 lanes); the item functions view them as
// vectors of their own width.
struct Workspace {
  float* Bt;           // [length][state]
  float* Ct;           // [length][state]
  float* A;            // [blocks_per_part + 1][state] vectors
  float* checkpoints;  // [blocks_per_part][tiles][state] vectors (backward)
  float* carry;        // [blocks_per_part][state] vectors: d loss / d state, carried backwards
  float* sum_A;        // [blocks_per_part][state] vectors
  float* sum_D;        // [blocks_per_part] vectors
  float* sum_bias;     // [blocks_per_part] vectors
  float* states;       // [TILE + 1][state] vectors: the tile's entering state, then after each token
  float* decays;       // [TILE][state] vectors
  float* tile_grad_B;  // [TILE][state] vectors
  float* tile_grad_C;  // [TILE][state] vectors
  float* tiles;        // 8 x [TILE][lanes] floats
};

// Shared by the threads: the parts' sums for B and C ([part][batch][group][token][state]) and the
// batch elements' for A, D and the bias.
struct Partials {
  float* grad_B;
  float* grad_C;
  float* grad_A;     // [batch][channels][state]
  float* grad_D;     // [batch][channels]
  float* grad_bias;  // [batch][channels]
};

constexpr int64_t MAX_LANES = 16;

void free_workspace(Workspace& w) {
  float** buffers[] = {&w.Bt,       &w.Ct,     &w.A,      &w.checkpoints, &w.carry,       &w.sum_A,       &w.sum_D,
                       &w.sum_bias, &w.states, &w.decays, &w.tile_grad_B, &w.tile_grad_C, &w.tiles};
  for (float** buffer : buffers) {
    free(*buffer);
    *buffer = nullptr;
  }
}

bool allocate_workspace(Workspace& w, const Shape& s, const Plan& plan, bool backward) {
  const int64_t N = s.state, P = plan.blocks_per_part, vector = sizeof(float) * MAX_LANES;
  auto take = [](size_t bytes) { return static_cast<float*>(aligned_buffer(bytes)); };
  memset(&w, 0, sizeof(w));
  w.Bt = take(sizeof(float) * s.length * N);
  w.Ct = take(sizeof(float) * s.length * N);
  w.A = take(vector * (P + 1) * N);  // forward: one block's rows, then its state
  w.tiles = take(sizeof(float) * 8 * TILE * MAX_LANES);
  bool ready = w.Bt && w.Ct && w.A && w.tiles;
  if (backward) {
    w.checkpoints = take(vector * P * plan.tiles * N);
    w.carry = take(vector * P * N);
    w.sum_A = take(vector * P * N);
    w.sum_D = take(vector * P);
    w.sum_bias = take(vector * P);
    w.states = take(vector * (TILE + 1) * N);
    w.decays = take(vector * TILE * N);
    w.tile_grad_B = take(vector * TILE * N);
    w.tile_grad_C = take(vector * TILE * N);
    ready = ready && w.checkpoints && w.carry && w.sum_A && w.sum_D && w.sum_bias && w.states && w.decays &&
            w.tile_grad_B && w.tile_grad_C;
  }
  if (!ready) free_workspace(w);
  return ready;
}

struct Item {
  int64_t b, g, part, first, last;  // batch element, group, part and its blocks [first, last)
};

Item item_at(const Shape& s, const Plan& plan, int64_t index) {
  Item item;
  item.b = index / (s.groups * plan.parts);
  item.g = index / plan.parts % s.groups;
  item.part = index % plan.parts;
  item.first = item.part * plan.blocks_per_part;
  const int64_t end = item.first + plan.blocks_per_part;
  item.last = end < plan.blocks ? end : plan.blocks;
  return item;
}

// ---------------------------------------------------------------------------------------------------
// Forward: the blocks of one item, each through every token.

template <typename F, int64_t W, typename E>
INLINE void forward_item(const Tensors& x, const Shape& s, const Plan& plan, const Item& item, Workspace& w) {
  const int64_t N = s.state, L = s.length;
  const bool softplus = s.softplus != 0, gated = x.z != nullptr;
  F* A = reinterpret_cast<F*>(w.A);
  F* h = reinterpret_cast<F*>(w.A) + N;
  float *tu = w.tiles, *td = w.tiles + TILE * W, *tz = w.tiles + 2 * TILE * W, *ty = w.tiles + 3 * TILE * W;
  load_transposed<E>(x.B, s, item.b, item.g, w.Bt);
  load_transposed<E>(x.C, s, item.b, item.g, w.Ct);
  for (int64_t block = item.first; block < item.last; ++block) {
    const BlockConstants<F, W> k = block_constants<F, W>(x, s, plan, item.g, block, A);
    const int64_t row0 = item.b * s.channels + k.c0;
    for (int64_t n = 0; n < N; ++n) h[n] = F{};
    for (int64_t t0 = 0; t0 < L; t0 += TILE) {
      const int64_t count = L - t0 < TILE ? L - t0 : TILE;
      load_tile<E, W>(x.u, row0, k.lanes, L, t0, count, tu);
      load_tile<E, W>(x.delta, row0, k.lanes, L, t0, count, td);
      if (gated) load_tile<E, W>(x.z, row0, k.lanes, L, t0, count, tz);
      for (int64_t t = 0; t < count; ++t) {
        const F u = vload<F>(tu + t * W);
        const F dt = step_size(vload<F>(td + t * W), k.bias, softplus);
        const F dtu = dt * u;
        const float* Bp = w.Bt + (t0 + t) * N;
        const float* Cp = w.Ct + (t0 + t) * N;
        F y = k.D * u;
        for (int64_t n = 0; n < N; ++n) {
          h[n] = vexp(dt * A[n]) * h[n] + dtu * Bp[n];
          y += h[n] * Cp[n];
        }
        if (gated) {
          const F z = vload<F>(tz + t * W);
          y *= z * vsigmoid(z);
        }
        vstore(ty + t * W, y);
      }
      store_tile<E, W>(ty, row0, k.lanes, L, t0, count, x.out);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward: the blocks of one item, tile by tile from the last token.

template <typename F, int64_t W, typename E>
INLINE void backward_item(const Tensors& x, const Shape& s, const Plan& plan, const Item& item, Workspace& w,
                          const Partials& out) {
  const int64_t N = s.state, L = s.length, G = s.groups, T = plan.tiles, blocks = item.last - item.first;
  const int64_t b = item.b, g = item.g;
  const bool softplus = s.softplus != 0, gated = x.z != nullptr;
  F* A = reinterpret_cast<F*>(w.A);
  F* checkpoints = reinterpret_cast<F*>(w.checkpoints);
  F* carry = reinterpret_cast<F*>(w.carry);
  F* sum_A = reinterpret_cast<F*>(w.sum_A);
  F* sum_D = reinterpret_cast<F*>(w.sum_D);
  F* sum_bias = reinterpret_cast<F*>(w.sum_bias);
  F* states = reinterpret_cast<F*>(w.states);
  F* decays = reinterpret_cast<F*>(w.decays);
  F* tile_grad_B = reinterpret_cast<F*>(w.tile_grad_B);
  F* tile_grad_C = reinterpret_cast<F*>(w.tile_grad_C);
  float *tu = w.tiles, *td = w.tiles + TILE * W, *tz = w.tiles + 2 * TILE * W, *tg = w.tiles + 3 * TILE * W;
  float *tdt = w.tiles + 4 * TILE * W, *tdu = w.tiles + 5 * TILE * W, *tdd = w.tiles + 6 * TILE * W;
  float* tdz = w.tiles + 7 * TILE * W;
  load_transposed<E>(x.B, s, b, g, w.Bt);
  load_transposed<E>(x.C, s, b, g, w.Ct);
  BlockConstants<F, W> constants[MAX_BLOCKS_PER_PART];
  for (int64_t j = 0; j < blocks; ++j) constants[j] = block_constants<F, W>(x, s, plan, g, item.first + j, A + j * N);

  // Pass 1: the state entering every tile.
  for (int64_t j = 0; j < blocks; ++j) {
    const BlockConstants<F, W>& k = constants[j];
    const F* Aj = A + j * N;
    F* h = states;
    for (int64_t n = 0; n < N; ++n) h[n] = F{};
    for (int64_t tile = 0; tile < T; ++tile) {
      const int64_t t0 = tile * TILE, count = L - t0 < TILE ? L - t0 : TILE;
      for (int64_t n = 0; n < N; ++n) checkpoints[(j * T + tile) * N + n] = h[n];
      if (tile == T - 1) break;
      load_tile<E, W>(x.u, b * s.channels + k.c0, k.lanes, L, t0, count, tu);
      load_tile<E, W>(x.delta, b * s.channels + k.c0, k.lanes, L, t0, count, td);
      for (int64_t t = 0; t < count; ++t) {
        const F dt = step_size(vload<F>(td + t * W), k.bias, softplus);
        const F dtu = dt * vload<F>(tu + t * W);
        const float* Bp = w.Bt + (t0 + t) * N;
        for (int64_t n = 0; n < N; ++n) h[n] = vexp(dt * Aj[n]) * h[n] + dtu * Bp[n];
      }
    }
    for (int64_t n = 0; n < N; ++n) carry[j * N + n] = sum_A[j * N + n] = F{};
    sum_D[j] = sum_bias[j] = F{};
  }

  // Pass 2: the tiles backwards, each one's states recomputed from its checkpoint.
  for (int64_t tile = T - 1; tile >= 0; --tile) {
    const int64_t t0 = tile * TILE, count = L - t0 < TILE ? L - t0 : TILE;
    for (int64_t i = 0; i < count * N; ++i) tile_grad_B[i] = tile_grad_C[i] = F{};
    for (int64_t j = 0; j < blocks; ++j) {
      const BlockConstants<F, W>& k = constants[j];
      const F* Aj = A + j * N;
      const int64_t row0 = b * s.channels + k.c0;
      load_tile<E, W>(x.u, row0, k.lanes, L, t0, count, tu);
      load_tile<E, W>(x.delta, row0, k.lanes, L, t0, count, td);
      load_tile<E, W>(x.grad_out, row0, k.lanes, L, t0, count, tg);
      if (gated) load_tile<E, W>(x.z, row0, k.lanes, L, t0, count, tz);
      for (int64_t n = 0; n < N; ++n) states[n] = checkpoints[(j * T + tile) * N + n];
      for (int64_t t = 0; t < count; ++t) {
        const F dt = step_size(vload<F>(td + t * W), k.bias, softplus);
        vstore(tdt + t * W, dt);
        const F dtu = dt * vload<F>(tu + t * W);
        const float* Bp = w.Bt + (t0 + t) * N;
        const F* before = states + t * N;
        F* after = states + (t + 1) * N;
        F* decay = decays + t * N;
        for (int64_t n = 0; n < N; ++n) {
          decay[n] = vexp(dt * Aj[n]);
          after[n] = decay[n] * before[n] + dtu * Bp[n];
        }
      }
      F* dh_next = carry + j * N;
      F* dA = sum_A + j * N;
      F dD = sum_D[j], dbias = sum_bias[j];
      for (int64_t t = count - 1; t >= 0; --t) {
        const F u = vload<F>(tu + t * W), dt = vload<F>(tdt + t * W), grad = vload<F>(tg + t * W);
        const float* Bp = w.Bt + (t0 + t) * N;
        const float* Cp = w.Ct + (t0 + t) * N;
        const F* before = states + t * N;
        const F* after = states + (t + 1) * N;
        const F* decay = decays + t * N;
        F* gB = tile_grad_B + t * N;
        F* gC = tile_grad_C + t * N;
        F gy = grad;
        if (gated) {
          F y = k.D * u;
          for (int64_t n = 0; n < N; ++n) y += after[n] * Cp[n];
          const F z = vload<F>(tz + t * W), sz = vsigmoid(z);
          gy = grad * z * sz;
          vstore(tdz + t * W, grad * y * sz * (1.0f + z * (1.0f - sz)));
        }
        dD += gy * u;
        const F dtu = dt * u;
        F through_B = F{}, through_A = F{};
        for (int64_t n = 0; n < N; ++n) {
          const F dh = gy * Cp[n] + dh_next[n];
          gC[n] += gy * after[n];
          gB[n] += dh * dtu;
          through_B += dh * Bp[n];
          const F v = dh * decay[n] * before[n];
          through_A += v * Aj[n];
          dA[n] += v * dt;
          dh_next[n] = dh * decay[n];
        }
        vstore(tdu + t * W, gy * k.D + dt * through_B);
        F ddelta = u * through_B + through_A;
        if (softplus) {
          const F d = vload<F>(td + t * W) + k.bias;
          ddelta = d > SOFTPLUS_THRESHOLD ? ddelta : ddelta * vsigmoid(d);
        }
        dbias += ddelta;
        vstore(tdd + t * W, ddelta);
      }
      sum_D[j] = dD;
      sum_bias[j] = dbias;
      store_tile<E, W>(tdu, row0, k.lanes, L, t0, count, x.grad_u);
      store_tile<E, W>(tdd, row0, k.lanes, L, t0, count, x.grad_delta);
      if (gated) store_tile<E, W>(tdz, row0, k.lanes, L, t0, count, x.grad_z);
    }
    float* out_B = out.grad_B + (((item.part * s.batch + b) * G + g) * L + t0) * N;
    float* out_C = out.grad_C + (((item.part * s.batch + b) * G + g) * L + t0) * N;
    for (int64_t i = 0; i < count * N; ++i) {
      float sum_b = 0.0f, sum_c = 0.0f;
      for (int64_t lane = 0; lane < W; ++lane) sum_b += tile_grad_B[i][lane], sum_c += tile_grad_C[i][lane];
      out_B[i] = sum_b;
      out_C[i] = sum_c;
    }
  }

  for (int64_t j = 0; j < blocks; ++j) {
    const BlockConstants<F, W>& k = constants[j];
    for (int64_t lane = 0; lane < k.lanes; ++lane) {
      const int64_t c = b * s.channels + k.c0 + lane;
      for (int64_t n = 0; n < N; ++n) out.grad_A[c * N + n] = sum_A[j * N + n][lane];
      out.grad_D[c] = sum_D[j][lane];
      out.grad_bias[c] = sum_bias[j][lane];
    }
  }
}

typedef void (*forward_fn)(const Tensors&, const Shape&, const Plan&, const Item&, Workspace&);
typedef void (*backward_fn)(const Tensors&, const Shape&, const Plan&, const Item&, Workspace&, const Partials&);

struct Kernels {
  forward_fn forward;
  backward_fn backward;
  int64_t lanes;
};

#define DEFINE_KERNELS(NAME, ATTRIBUTES, F, W, E)                                                                \
  ATTRIBUTES void NAME##_forward(const Tensors& x, const Shape& s, const Plan& p, const Item& i, Workspace& w) { \
    forward_item<F, W, E>(x, s, p, i, w);                                                                        \
  }                                                                                                              \
  ATTRIBUTES void NAME##_backward(const Tensors& x, const Shape& s, const Plan& p, const Item& i, Workspace& w,  \
                                  const Partials& out) {                                                         \
    backward_item<F, W, E>(x, s, p, i, w, out);                                                                  \
  }

#if defined(__x86_64__) || defined(__i386__)
DEFINE_KERNELS(f32_avx512, __attribute__((target("avx512f"))), f32x16, 16, float)
DEFINE_KERNELS(bf16_avx512, __attribute__((target("avx512f"))), f32x16, 16, uint16_t)
DEFINE_KERNELS(f32_avx2, __attribute__((target("avx2,fma"))), f32x8, 8, float)
DEFINE_KERNELS(bf16_avx2, __attribute__((target("avx2,fma"))), f32x8, 8, uint16_t)
#endif
DEFINE_KERNELS(f32_base, , f32x4, 4, float)
DEFINE_KERNELS(bf16_base, , f32x4, 4, uint16_t)

Kernels select_kernels(int dtype, int isa) {
  const bool bf16 = dtype == BFLOAT16;
#if defined(__x86_64__) || defined(__i386__)
  if (isa == 2) return bf16 ? Kernels{bf16_avx512_forward, bf16_avx512_backward, 16}
                            : Kernels{f32_avx512_forward, f32_avx512_backward, 16};
  if (isa == 1) return bf16 ? Kernels{bf16_avx2_forward, bf16_avx2_backward, 8}
                            : Kernels{f32_avx2_forward, f32_avx2_backward, 8};
#endif
  return bf16 ? Kernels{bf16_base_forward, bf16_base_backward, 4} : Kernels{f32_base_forward, f32_base_backward, 4};
}

int run_forward(const Kernels& kernels, const Tensors& x, const Shape& s, int threads) {
  const Plan plan = make_plan(s, kernels.lanes);
  const int64_t items = s.batch * s.groups * plan.parts;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    Workspace w;
    const bool ready = allocate_workspace(w, s, plan, false);
    if (!ready) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic)
    for (int64_t index = 0; index < items; ++index) {
      if (ready) kernels.forward(x, s, plan, item_at(s, plan, index), w);
    }
    free_workspace(w);
  }
  return failed ? 2 : 0;
}

int run_backward(const Kernels& kernels, const Tensors& x, const Shape& s, int threads) {
  const Plan plan = make_plan(s, kernels.lanes);
  const int64_t N = s.state, L = s.length, rows = s.batch * s.groups * N;
  const int64_t items = s.batch * s.groups * plan.parts;
  Partials out;
  out.grad_B = static_cast<float*>(aligned_buffer(sizeof(float) * plan.parts * rows * L));
  out.grad_C = static_cast<float*>(aligned_buffer(sizeof(float) * plan.parts * rows * L));
  out.grad_A = static_cast<float*>(aligned_buffer(sizeof(float) * s.batch * s.channels * N));
  out.grad_D = static_cast<float*>(aligned_buffer(sizeof(float) * s.batch * s.channels));
  out.grad_bias = static_cast<float*>(aligned_buffer(sizeof(float) * s.batch * s.channels));
  int failed = !out.grad_B || !out.grad_C || !out.grad_A || !out.grad_D || !out.grad_bias;
  if (!failed) {
#pragma omp parallel num_threads(threads)
    {
      Workspace w;
      const bool ready = allocate_workspace(w, s, plan, true);
      if (!ready) {
#pragma omp atomic write
        failed = 1;
      }
#pragma omp for schedule(dynamic)
      for (int64_t index = 0; index < items; ++index) {
        if (ready) kernels.backward(x, s, plan, item_at(s, plan, index), w, out);
      }
      free_workspace(w);
      // B, C to [batch, group, state, token], each the sum over the parts in order; A, D, bias over the batch.
#pragma omp for schedule(static)
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t bg = row / N, n = row % N;
        for (int64_t t = 0; t < L; ++t) {
          float sum_b = 0.0f, sum_c = 0.0f;
          for (int64_t p = 0; p < plan.parts; ++p) {
            const int64_t at = ((p * s.batch * s.groups + bg) * L + t) * N + n;
            sum_b += out.grad_B[at];
            sum_c += out.grad_C[at];
          }
          x.grad_B[row * L + t] = sum_b;
          x.grad_C[row * L + t] = sum_c;
        }
      }
#pragma omp for schedule(static)
      for (int64_t c = 0; c < s.channels; ++c) {
        for (int64_t n = 0; n < N; ++n) {
          float sum = 0.0f;
          for (int64_t b = 0; b < s.batch; ++b) sum += out.grad_A[(b * s.channels + c) * N + n];
          x.grad_A[c * N + n] = sum;
        }
        float sum_D = 0.0f, sum_bias = 0.0f;
        for (int64_t b = 0; b < s.batch; ++b) {
          sum_D += out.grad_D[b * s.channels + c];
          sum_bias += out.grad_bias[b * s.channels + c];
        }
        x.grad_D[c] = sum_D;
        x.grad_delta_bias[c] = sum_bias;
      }
    }
  }
  free(out.grad_B);
  free(out.grad_C);
  free(out.grad_A);
  free(out.grad_D);
  free(out.grad_bias);
  return failed ? 2 : 0;
}

}  // namespace

extern "C" {

// The widest SIMD this CPU runs: 2 AVX-512, 1 AVX2 with FMA, 0 128-bit vectors.
int mambaout_scan_simd_level(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

// The scan's forward (backward = 0: writes out) or backward (writes the gradients), on dense
// tensors. Returns 0, 1 for unsupported arguments, 2 when out of memory.
int mambaout_selective_scan(const Tensors* tensors, const Shape* shape, int backward, int isa, int threads) {
  const Shape& s = *shape;
  if (isa < 0 || isa > mambaout_scan_simd_level() || (s.dtype != FLOAT32 && s.dtype != BFLOAT16)) return 1;
  if (s.batch < 0 || s.length < 0 || s.state < 1 || s.groups < 1 || s.channels % s.groups != 0) return 1;
  if (s.batch == 0 || s.channels == 0 || s.length == 0) return 0;
  const Kernels kernels = select_kernels(s.dtype, isa);
  threads = threads > 0 ? threads : 1;
  return backward ? run_backward(kernels, *tensors, s, threads) : run_forward(kernels, *tensors, s, threads);
}

}  // extern "C"
