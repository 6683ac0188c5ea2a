// out[B, H, K] = softmax(q . k / sqrt(K)) . v over positions 0..positions[b] of cache row slots[b], in float32:
// a serving step's attention (each row a request at its own length in its own slot), as an XLA FFI call
// (jaxlm/cpu/native.py; taken where the kernel record's slot attention says "native").
//
// Why: XLA:CPU runs this attention as small batched products (per row and head, [1, K] x [K, C] then
// [1, C] x [C, K]) several times below memory bandwidth, and at a serving step's 32-64 rows over a few hundred
// positions it was nearly half the step (docs/design.md). Here each (row, head) reads its keys once, then its
// values once, straight from the cache (no gather of the rows a step runs); scores, an exact softmax (not an
// online one: the row's length is known) and the weighted sum run in AVX2 + FMA. Each (row, head) is
// computed alone, so a row's bits never depend on the other rows, how many there are or its slot.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// e^x, Cephes' single-precision polynomial (as in avx_mathfun); x is clamped where e^x leaves float32's
// normal range (the scores here are <= 0 after subtracting their max).
__attribute__((target("avx2,fma"))) inline __m256 Exp(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365f)), _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) inline float Sum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// s[j] = (q . k[j]) * scale for j < P, four keys at a time (independent chains; each key's sum is the same
// chain whichever group it is in). K is a multiple of 8.
__attribute__((target("avx2,fma"))) void Scores(const float* q, const float* k, int64_t P, int64_t K, float scale,
                                                float* s) {
  int64_t j = 0;
  for (; j + 4 <= P; j += 4) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const float* kj = k + j * K;
    for (int64_t d = 0; d < K; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kj + d), a0);
      a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kj + K + d), a1);
      a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kj + 2 * K + d), a2);
      a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kj + 3 * K + d), a3);
    }
    s[j] = Sum(a0) * scale, s[j + 1] = Sum(a1) * scale, s[j + 2] = Sum(a2) * scale, s[j + 3] = Sum(a3) * scale;
  }
  for (; j < P; ++j) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < K; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + j * K + d), a);
    s[j] = Sum(a) * scale;
  }
}

// s[j] = e^(s[j] - max s) for j < P (zeros from P to the next multiple of 8); returns their sum.
__attribute__((target("avx2,fma"))) float Softmax(float* s, int64_t P) {
  const int64_t P8 = (P + 7) / 8 * 8;
  float m = s[0];
  for (int64_t j = 1; j < P; ++j) m = std::max(m, s[j]);
  std::fill(s + P, s + P8, m);
  __m256 total = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  for (int64_t j = 0; j < P8; j += 8) {
    _mm256_storeu_ps(s + j, Exp(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv)));
  }
  std::fill(s + P, s + P8, 0.0f);
  for (int64_t j = 0; j < P8; j += 8) total = _mm256_add_ps(total, _mm256_loadu_ps(s + j));
  return Sum(total);
}

// out[d0, d0 + 8 NV) = sum_j p[j] v[j, d0 ...] / l.
template <int NV>
__attribute__((target("avx2,fma"))) void Weighted(const float* p, const float* v, int64_t P, int64_t K, int64_t d0,
                                                  float l, float* out) {
  __m256 acc[NV];
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < P; ++j) {
    const __m256 pj = _mm256_broadcast_ss(p + j);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * K + d0 + 8 * i), acc[i]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / l);
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + d0 + 8 * i, _mm256_mul_ps(acc[i], inv));
}

void WeightedAll(const float* p, const float* v, int64_t P, int64_t K, float l, float* out) {
  using Fn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, float, float*);
  static constexpr Fn kBy[] = {nullptr,     Weighted<1>, Weighted<2>, Weighted<3>, Weighted<4>,
                               Weighted<5>, Weighted<6>, Weighted<7>, Weighted<8>};
  for (int64_t d0 = 0; d0 < K; d0 += 64) kBy[std::min<int64_t>(8, (K - d0) / 8)](p, v, P, K, d0, l, out);
}

ffi::Error AttendRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                      ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::S32> positions,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || kd[1] != qd[1] || kd[3] != qd[2] || qd[2] % 8 ||
      !std::equal(kd.begin(), kd.end(), v.dimensions().begin(), v.dimensions().end()) || slots.element_count() != qd[0] || positions.element_count() != qd[0])
    return ffi::Error::InvalidArgument(
        "jaxlm_attend_rows: q must be [B, H, K] (K a multiple of 8), k and v [N, H, S, K], slots and positions [B]");
  const int64_t B = qd[0], H = qd[1], K = qd[2], N = kd[0], S = kd[2];
  const int32_t* slot = slots.typed_data();
  for (int64_t b = 0; b < B; ++b)
    if (slot[b] < 0 || slot[b] >= N) return ffi::Error::InvalidArgument("jaxlm_attend_rows: a slot out of range");
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* pos = positions.typed_data();
  float* o = out->typed_data();
  const int64_t per = 4;  // (row, head) pairs per chunk
  jaxlm::ParallelFor(pool, (B * H + per - 1) / per, [=](int64_t c) {
    std::vector<float> s(S + 8);
    for (int64_t i = c * per; i < std::min(B * H, (c + 1) * per); ++i) {
      const int64_t b = i / H, h = i % H, P = std::clamp<int64_t>(pos[b] + 1, 1, S);
      const int64_t at = (slot[b] * H + h) * S * K;
      Scores(qp + i * K, kp + at, P, K, scale, s.data());
      const float l = Softmax(s.data(), P);
      WeightedAll(s.data(), vp + at, P, K, l, o + i * K);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmAttendRows, AttendRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
