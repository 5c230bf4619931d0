// Does fusing Batch Norm's two forward passes pay on this machine?
//
// The split kernels read an NCHW tensor twice (statistics, then normalise);
// a fused kernel would take one channel at a time (a 32x64x56x56 float32
// channel is 400 KB, which fits L2), read it from memory once for its
// statistics and normalise it from L2. This probe times, in one process and
// outside torch, on the same buffer:
//   rd      one read of the tensor (sum)
//   wr      one streaming write of the tensor
//   copy    read + streaming write
//   split   statistics plane by plane in memory order, then normalise in
//           memory order (what torch_bnext does)
//   fused   channel by channel: its planes' statistics, then the planes
//           normalised from cache
//   fused4  as fused, with the channel's planes read four at a time (more
//           reads in flight) and the variance from a second pass over L2
//   f4sum   the read part of fused4 alone
// Every timed call is preceded by a write of another buffer of the same size,
// so that no pass starts with the tensor in the caches.
//
// Build and run (x86-64 with AVX-512):
//   g++ -O3 -march=native -fopenmp benchmarks/probes/bn_fusion.cpp -o /tmp/bn_fusion
//   OMP_NUM_THREADS=2 /tmp/bn_fusion [N C S]      (default 32 64 3136)
// Medians of 30 calls, in ms. See benchmarks/results/cpu.md for what it showed.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

int64_t N = 32, C = 64, S = 3136;

float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// Two-pass mean and m2 of one plane (the second pass reads it from L1).
void plane_stats(const float* p, float& mean, float& m2) {
  __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= S; j += 32) {
    a = _mm512_add_ps(a, _mm512_loadu_ps(p + j));
    b = _mm512_add_ps(b, _mm512_loadu_ps(p + j + 16));
  }
  float s = hsum(_mm512_add_ps(a, b));
  for (; j < S; ++j) s += p[j];
  mean = s / S;
  const __m512 vm = _mm512_set1_ps(mean);
  a = b = _mm512_setzero_ps();
  for (j = 0; j + 32 <= S; j += 32) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(p + j), vm);
    const __m512 e = _mm512_sub_ps(_mm512_loadu_ps(p + j + 16), vm);
    a = _mm512_fmadd_ps(d, d, a);
    b = _mm512_fmadd_ps(e, e, b);
  }
  float q = hsum(_mm512_add_ps(a, b));
  for (; j < S; ++j) q += (p[j] - mean) * (p[j] - mean);
  m2 = q;
}

// y = (x - m) * k + c over one plane, streaming where aligned.
void plane_affine(const float* x, float* y, float m, float k, float c) {
  const __m512 vm = _mm512_set1_ps(m), vk = _mm512_set1_ps(k), vc = _mm512_set1_ps(c);
  int64_t j = 0;
  for (; j + 16 <= S; j += 16) {
    const __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm), vk, vc);
    if ((reinterpret_cast<uintptr_t>(y + j) & 63) == 0) {
      _mm512_stream_ps(y + j, v);
    } else {
      _mm512_storeu_ps(y + j, v);
    }
  }
  for (; j < S; ++j) y[j] = (x[j] - m) * k + c;
}

// Chan's merge of N equal-sized planes into the channel's (mean, 1/std).
void merge(const float* m, const float* q, int64_t stride, float& mean, float& k) {
  double s = 0, qq = 0;
  for (int64_t n = 0; n < N; ++n) s += m[n * stride];
  mean = static_cast<float>(s / N);
  for (int64_t n = 0; n < N; ++n) {
    const double d = m[n * stride] - mean;
    qq += q[n * stride] + d * d * S;
  }
  k = static_cast<float>(1.0 / std::sqrt(qq / (N * S) + 1e-5));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 3) {
    N = std::atoll(argv[1]);
    C = std::atoll(argv[2]);
    S = std::atoll(argv[3]);
  }
  const int64_t total = N * C * S;
  const size_t bytes = ((total * 4 + 63) / 64) * 64;
  auto* x = static_cast<float*>(std::aligned_alloc(64, bytes));
  auto* y = static_cast<float*>(std::aligned_alloc(64, bytes));
  auto* z = static_cast<float*>(std::aligned_alloc(64, bytes));
  for (int64_t i = 0; i < total; ++i) {
    x[i] = static_cast<float>(std::rand() % 1000) / 500.f;
    y[i] = z[i] = 0.f;
  }
  const auto P = [&](int64_t n, int64_t c) { return (n * C + c) * S; };
  std::vector<float> pm(N * C), pq(N * C), mean(C), sink(C);

  const auto rd = [&] {
    float r = 0;
#pragma omp parallel for schedule(static) reduction(+ : r)
    for (int64_t i = 0; i < total - 15; i += 16) r += hsum(_mm512_load_ps(x + i));
    sink[0] = r;
  };
  const auto wr = [&] {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < total - 15; i += 16) _mm512_stream_ps(y + i, _mm512_set1_ps(2.f));
  };
  const auto copy = [&] {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < total - 15; i += 16) _mm512_stream_ps(y + i, _mm512_load_ps(x + i));
  };
  const auto split = [&] {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N * C; ++i) plane_stats(x + i * S, pm[i], pq[i]);
    std::vector<float> k(C);
    for (int64_t c = 0; c < C; ++c) merge(pm.data() + c, pq.data() + c, C, mean[c], k[c]);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N * C; ++i) plane_affine(x + i * S, y + i * S, mean[i % C], k[i % C], 0.1f);
  };
  const auto fused = [&] {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      std::vector<float> m(N), q(N);
      for (int64_t n = 0; n < N; ++n) plane_stats(x + P(n, c), m[n], q[n]);
      float mu, k;
      merge(m.data(), q.data(), 1, mu, k);
      for (int64_t n = 0; n < N; ++n) plane_affine(x + P(n, c), y + P(n, c), mu, k, 0.1f);
    }
  };
  // Sum of a channel, its planes read four at a time.
  const auto channel_sum4 = [&](int64_t c) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    float tail = 0;
    for (int64_t n = 0; n + 4 <= N; n += 4) {
      const float *p0 = x + P(n, c), *p1 = x + P(n + 1, c), *p2 = x + P(n + 2, c), *p3 = x + P(n + 3, c);
      int64_t j = 0;
      for (; j + 16 <= S; j += 16) {
        a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p0 + j));
        a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p1 + j));
        a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p2 + j));
        a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p3 + j));
      }
      for (; j < S; ++j) tail += p0[j] + p1[j] + p2[j] + p3[j];
    }
    return hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + tail;
  };
  const auto f4sum = [&] {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < C; ++c) mean[c] = channel_sum4(c);
  };
  const auto fused4 = [&] {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      const float mu = channel_sum4(c) / static_cast<float>(N * S);
      const __m512 vm = _mm512_set1_ps(mu);
      __m512 acc = _mm512_setzero_ps();
      float qt = 0;
      for (int64_t n = 0; n < N; ++n) {
        const float* p = x + P(n, c);
        int64_t j = 0;
        for (; j + 16 <= S; j += 16) {
          const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(p + j), vm);
          acc = _mm512_fmadd_ps(d, d, acc);
        }
        for (; j < S; ++j) qt += (p[j] - mu) * (p[j] - mu);
      }
      const float k = 1.f / std::sqrt((hsum(acc) + qt) / static_cast<float>(N * S) + 1e-5f);
      for (int64_t n = 0; n < N; ++n) plane_affine(x + P(n, c), y + P(n, c), mu, k, 0.1f);
    }
  };
  const auto evict = [&] {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < total - 15; i += 16) _mm512_store_ps(z + i, _mm512_set1_ps(1.f));
  };
  const auto time = [&](auto f) {
    std::vector<double> v;
    for (int r = 0; r < 30; ++r) {
      evict();
      const auto t0 = std::chrono::steady_clock::now();
      f();
      const auto t1 = std::chrono::steady_clock::now();
      v.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::printf("N=%lld C=%lld S=%lld, %d threads (ms)\n", static_cast<long long>(N),
              static_cast<long long>(C), static_cast<long long>(S), omp_get_max_threads());
  for (int rep = 0; rep < 3; ++rep) {
    std::printf("rd %.3f  wr %.3f  copy %.3f  split %.3f  fused %.3f  fused4 %.3f  f4sum %.3f\n",
                time(rd), time(wr), time(copy), time(split), time(fused), time(fused4), time(f4sum));
  }
  std::free(x);
  std::free(y);
  std::free(z);
}
