// y[N, O] = x[N, D] @ W.T with float32 sums for a decode step's few rows, as XLA FFI calls (jaxlm/native.py).
//
// Why: a decode step reads every weight once for a handful of rows, so it should run at memory bandwidth.
// XLA:CPU's few-row products do not: its bfloat16 matmul reads weights far below the bandwidth (bf16
// decode was no faster than float32), and its float32 multiply-reduce is compute-bound by 8 rows
// (docs/design.md). Here W is packed once, 16 outputs per 64-byte vector, and a step streams it once
// with every row of x held in L1:
//   float32  [O/16, D, 16]        one FMA per (vector, row);
//   bfloat16 [O/16, D/2, 16, 2]   AVX-512 BF16's vdpbf16ps: a pair of inputs per (vector, row).
// Products of two bf16 are exact in float32, and float32 products are the matmul's: only the order of the
// float32 sums differs from XLA's.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

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

// Chunks of output blocks, taken by whichever thread comes first: the caller runs them all if the
// pool's threads are busy, and helpers that start late find nothing left (the state is shared).
template <typename T>
struct Work {
  const T* w;
  const T* x;
  float* y;
  int64_t N, D, O, blocks, chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks; done.fetch_add(1, std::memory_order_release)) {
      const int64_t b0 = c * chunk, b1 = std::min(blocks, b0 + chunk);
      for (int64_t r = 0; r < N; r += kRowGroup)
        kBlocks<T>[std::min<int64_t>(kRowGroup, N - r)](w, x + r * D, D, y + r * O, O, b0, b1);
    }
  }
};

template <typename T>
ffi::Error Linear(ffi::ThreadPool& pool, const T* x, const T* w, float* y, int64_t N, int64_t D, int64_t blocks) {
  auto work = std::make_shared<Work<T>>();
  work->w = w, work->x = x, work->y = y;
  work->N = N, work->D = D, work->blocks = blocks, work->O = 16 * blocks;
  work->chunk = std::max<int64_t>(4, (blocks + 15) / 16);  // ~16 chunks: balance without overhead
  work->chunks = (blocks + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->chunks) _mm_pause();
  return ffi::Error::Success();
}

ffi::Error LinearBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[2] != 16 || wd[3] != 2 || xd[1] != 2 * wd[1])
    return ffi::Error::InvalidArgument("jaxlm_bf16_linear: x must be [N, D] and w [O/16, D/2, 16, 2]");
  return Linear<uint16_t>(pool, reinterpret_cast<const uint16_t*>(x.typed_data()),
                          reinterpret_cast<const uint16_t*>(w.typed_data()), y->typed_data(), xd[0], xd[1], wd[0]);
}

ffi::Error LinearF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != 16 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("jaxlm_f32_linear: x must be [N, D] and w [O/16, D, 16]");
  return Linear<float>(pool, x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], wd[0]);
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

// What this CPU runs (the library is built for any x86-64 and each kernel used only where it runs):
// 2 = AVX-512 with BF16 (both kernels), 1 = AVX-512F (float32), 0 = neither.
extern "C" int JaxlmCpuLevel() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) return 0;
  return __builtin_cpu_supports("avx512bf16") ? 2 : 1;
}
