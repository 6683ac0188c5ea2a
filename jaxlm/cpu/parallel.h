// The CPU kernels' one way to use XLA's thread pool (decode_linear.cc, decode_attention.cc).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace jaxlm {

// fn(c) for every chunk c in [0, chunks), each taken by whichever thread comes first: the caller runs them
// all if the pool's threads are busy, and helpers that start late find nothing left (the state is shared).
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t chunks, Fn fn) {
  struct State {
    Fn fn;
    int64_t chunks;
    std::atomic<int64_t> next{0}, done{0};
    State(Fn f, int64_t n) : fn(f), chunks(n) {}
    void Run() {
      for (int64_t c; (c = next.fetch_add(1)) < chunks; done.fetch_add(1, std::memory_order_release)) fn(c);
    }
  };
  auto state = std::make_shared<State>(fn, chunks);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Run(); });
  state->Run();
  while (state->done.load(std::memory_order_acquire) < chunks) _mm_pause();
}

}  // namespace jaxlm
