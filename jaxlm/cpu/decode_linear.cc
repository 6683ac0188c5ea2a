// y[N, O] = x[N, D] @ W.T with float32 sums for a decode step's rows, as XLA FFI calls (jaxlm/native.py).
//
// Why: a decode step reads every weight once for a handful of rows, so it should run at memory bandwidth.
// XLA:CPU's few-row products do not: its bfloat16 matmul reads weights far below the bandwidth (bf16
// decode was no faster than float32), and its float32 multiply-reduce is compute-bound by 8 rows
// (docs/design.md). Here W is packed once, 16 outputs per 64-byte vector, and a step streams it once
// with every row of x held in L1:
//   float32  [O/16, D, 16]        one FMA per (vector, row) (AVX-512F; or AVX2 + FMA, a block as two halves);
//   bfloat16 [O/16, D/2, 16, 2]   AVX-512 BF16's vdpbf16ps: a pair of inputs per (vector, row).
// Products of two bf16 are exact in float32, and float32 products are the matmul's: only the order of the
// float32 sums differs from XLA's. Each output is one chain of FMAs over D in order, whatever the row
// count, the row's place or the instruction set, so a row's bits never depend on the other rows (a
// server's batch changes with its load).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRowGroup = 8;  // rows of x per pass over a chunk of W (accumulators: OB x rows <= 16)

// One K step: inputs per vector lane (1 for float32, a pair for bfloat16).
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int kPer = 1;
  using Word = float;
  __attribute__((target("avx512f"))) static __m512 Mac(__m512 acc, const float* w, Word x) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_set1_ps(x), acc);
  }
};

template <>
struct Lanes<uint16_t> {
  static constexpr int kPer = 2;
  using Word = uint32_t;  // x[n, 2k], x[n, 2k + 1] as one word
  __attribute__((target("avx512f,avx512bf16"))) static __m512 Mac(__m512 acc, const uint16_t* w, Word x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_set1_epi32(x));
  }
};

// OB blocks of 16 outputs against NR rows of x; w points at the first block (each 16 * D elements).
// (One target for both types: Mac must inline, and float32's FMAs emit no BF16 instruction.)
template <typename T, int NR, int OB>
__attribute__((target("avx512f,avx512bf16"), flatten)) void Tile(const T* w, const T* x, int64_t D, float* y,
                                                                    int64_t O) {
  using L = Lanes<T>;
  __m512 acc[OB][NR];
  for (int b = 0; b < OB; ++b)
    for (int n = 0; n < NR; ++n) acc[b][n] = _mm512_setzero_ps();
  const auto* words = reinterpret_cast<const typename L::Word*>(x);
  const int64_t steps = D / L::kPer, block = 16 * D;
  for (int64_t k = 0; k < steps; ++k)
    for (int n = 0; n < NR; ++n) {
      const typename L::Word xk = words[n * steps + k];
      for (int b = 0; b < OB; ++b) acc[b][n] = L::Mac(acc[b][n], w + b * block + k * 16 * L::kPer, xk);
    }
  for (int n = 0; n < NR; ++n)
    for (int b = 0; b < OB; ++b) _mm512_storeu_ps(y + n * O + b * 16, acc[b][n]);
}

// Output blocks [b0, b1) for NR rows: four blocks at a time for one or two rows (independent sums to
// hide the instruction's latency), two beyond (register pressure).
template <typename T, int NR>
void Blocks(const T* w, const T* x, int64_t D, float* y, int64_t O, int64_t b0, int64_t b1) {
  constexpr int OB = NR <= 2 ? 4 : 2;
  int64_t b = b0;
  for (; b + OB <= b1; b += OB) Tile<T, NR, OB>(w + b * 16 * D, x, D, y + b * 16, O);
  for (; b < b1; ++b) Tile<T, NR, 1>(w + b * 16 * D, x, D, y + b * 16, O);
}

template <typename T>
using BlocksFn = void (*)(const T*, const T*, int64_t, float*, int64_t, int64_t, int64_t);

template <typename T>
constexpr BlocksFn<T> kBlocks[kRowGroup + 1] = {nullptr,      Blocks<T, 1>, Blocks<T, 2>, Blocks<T, 3>, Blocks<T, 4>,
                                                Blocks<T, 5>, Blocks<T, 6>, Blocks<T, 7>, Blocks<T, 8>};

// AVX2 + FMA, float32: the same layout, each block of 16 outputs as two 8-lane halves. Any row count runs
// as a small matmul (a serving step's 32-64 rows, a prompt's hundreds), so W is read from memory once per
// tile of rows: for each OB blocks, D in slices of kSlice (W's slice stays in L1), the tile's rows in groups
// of NR (accumulators 2 x OB x NR <= 12). A slice after the first continues each output's chain from y.
constexpr int64_t kSlice = 128;
constexpr int64_t kAhead = 64;  // k steps (4 KB of a block) that a prefetch runs ahead of the FMAs

// (Flat arrays and unroll pragmas: GCC then keeps the accumulators in registers; as [OB][2][NR] arrays it
// also stored them to the stack at every k, which halved the speed.)
template <int NR, int OB>
__attribute__((target("avx2,fma"))) void TileAvx2(const float* w, const float* x, int64_t D, float* y, int64_t O,
                                                   int64_t k0, int64_t k1) {
  constexpr int V = 2 * OB;  // 8-lane vectors per row
  __m256 acc[V * NR];
#pragma GCC unroll 16
  for (int i = 0; i < V * NR; ++i)
    acc[i] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y + (i / V) * O + (i % V) * 8);
  for (int64_t k = k0; k < k1; ++k) {
#pragma GCC unroll 4
    for (int b = 0; b < OB; ++b)  // W streams from memory on a tile's first pass: ask for it early
      _mm_prefetch(reinterpret_cast<const char*>(w + b * 16 * D + (k + kAhead) * 16), _MM_HINT_T0);
    __m256 wk[V];
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) wk[j] = _mm256_loadu_ps(w + (j / 2) * 16 * D + k * 16 + (j % 2) * 8);
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      const __m256 xk = _mm256_broadcast_ss(x + n * D + k);
#pragma GCC unroll 16
      for (int j = 0; j < V; ++j) acc[n * V + j] = _mm256_fmadd_ps(wk[j], xk, acc[n * V + j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < V * NR; ++i) _mm256_storeu_ps(y + (i / V) * O + (i % V) * 8, acc[i]);
}

// Rows [0, N) against OB blocks at w, in groups of NR (the last group shorter).
template <int NR, int OB>
void RowsAvx2(const float* w, const float* x, int64_t N, int64_t D, float* y, int64_t O, int64_t k0, int64_t k1) {
  using TileFn = void (*)(const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t);
  static constexpr TileFn kTail[] = {nullptr, TileAvx2<1, OB>, TileAvx2<2, OB>, TileAvx2<3, OB>,
                                     TileAvx2<4, OB>, TileAvx2<5, OB>, TileAvx2<6, OB>};
  int64_t n = 0;
  for (; n + NR <= N; n += NR) TileAvx2<NR, OB>(w, x + n * D, D, y + n * O, O, k0, k1);
  if (n < N) kTail[N - n](w, x + n * D, D, y + n * O, O, k0, k1);
}

// Blocks [b0, b1) for all N rows, kRowTile rows at a time (a tile's slice of x stays in L2 while W's blocks
// pass; a long prompt's rows would not): two blocks at a time for up to 12 rows, else one block and six rows.
constexpr int64_t kRowTile = 96;

void BlocksAvx2(const float* w, const float* x, int64_t N, int64_t D, float* y, int64_t O, int64_t b0, int64_t b1) {
  const int64_t ob = N <= 12 ? 2 : 1;
  for (int64_t r0 = 0; r0 < N; r0 += kRowTile) {
    const int64_t rows = std::min(kRowTile, N - r0);
    const float* xr = x + r0 * D;
    float* yr = y + r0 * O;
    for (int64_t b = b0; b < b1; b += ob) {
      const bool pair = ob == 2 && b + 1 < b1;
      const float* wb = w + b * 16 * D;
      for (int64_t k0 = 0; k0 < D; k0 += kSlice) {
        const int64_t k1 = std::min(D, k0 + kSlice);
        if (pair)
          RowsAvx2<3, 2>(wb, xr, rows, D, yr + b * 16, O, k0, k1);
        else
          RowsAvx2<6, 1>(wb, xr, rows, D, yr + b * 16, O, k0, k1);
      }
    }
  }
}

// All N rows against blocks [b0, b1) with AVX-512, kRowGroup rows at a time.
template <typename T>
void BlocksAvx512(const T* w, const T* x, int64_t N, int64_t D, float* y, int64_t O, int64_t b0, int64_t b1) {
  for (int64_t r = 0; r < N; r += kRowGroup)
    kBlocks<T>[std::min<int64_t>(kRowGroup, N - r)](w, x + r * D, D, y + r * O, O, b0, b1);
}

template <typename T>
using ChunkFn = void (*)(const T*, const T*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);

// About 16 chunks of output blocks (balance without overhead), shared by the pool's threads.
template <typename T>
ffi::Error Linear(ffi::ThreadPool& pool, ChunkFn<T> blocks_fn, const T* x, const T* w, float* y, int64_t N,
                  int64_t D, int64_t blocks) {
  const int64_t O = 16 * blocks, chunk = std::max<int64_t>(4, (blocks + 15) / 16);
  jaxlm::ParallelFor(pool, (blocks + chunk - 1) / chunk, [=](int64_t c) {
    blocks_fn(w, x, N, D, y, O, c * chunk, std::min(blocks, (c + 1) * chunk));
  });
  return ffi::Error::Success();
}

ffi::Error LinearBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[2] != 16 || wd[3] != 2 || xd[1] != 2 * wd[1])
    return ffi::Error::InvalidArgument("jaxlm_bf16_linear: x must be [N, D] and w [O/16, D/2, 16, 2]");
  return Linear<uint16_t>(pool, BlocksAvx512<uint16_t>, reinterpret_cast<const uint16_t*>(x.typed_data()),
                          reinterpret_cast<const uint16_t*>(w.typed_data()), y->typed_data(), xd[0], xd[1], wd[0]);
}

ffi::Error CheckF32(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != 16 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("jaxlm_f32_linear: x must be [N, D] and w [O/16, D, 16]");
  return ffi::Error::Success();
}

ffi::Error LinearF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  if (auto e = CheckF32(x, w); e.failure()) return e;
  return Linear<float>(pool, BlocksAvx512<float>, x.typed_data(), w.typed_data(), y->typed_data(),
                       x.dimensions()[0], x.dimensions()[1], w.dimensions()[0]);
}

ffi::Error LinearF32Avx2(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> y) {
  if (auto e = CheckF32(x, w); e.failure()) return e;
  return Linear<float>(pool, BlocksAvx2, x.typed_data(), w.typed_data(), y->typed_data(), x.dimensions()[0],
                       x.dimensions()[1], w.dimensions()[0]);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmBf16Linear, LinearBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmF32Linear, LinearF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmF32LinearAvx2, LinearF32Avx2,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// What this CPU runs (the library is built for any x86-64 and each kernel used only where it runs):
// 3 = AVX-512 with BF16 (both kernels), 2 = AVX-512F (float32), 1 = AVX2 and FMA (float32), 0 = none.
extern "C" int JaxlmCpuLevel() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return __builtin_cpu_supports("avx512bf16") ? 3 : 2;
}
