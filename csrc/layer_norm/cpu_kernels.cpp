// LayerNorm / RMSNorm CPU kernels. Rows are independent, so the forward and
// the dx part of the backward are one task per group of rows; each row is read
// once from memory for its statistics (then re-read from cache).
// Parameter gradients are column sums over rows: every chunk of rows adds into
// its own buffer and the buffers are merged in a fixed order. The chunking
// depends on the shape only, never on the thread count, so results are
// bitwise reproducible across thread settings.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "bnext/layer_norm_math.h"
#include "bnext/welford.h"
#include "common/checks.h"
#include "common/cpu_cache.h"
#include "common/cpu_reduce.h"
#include "common/cpu_vec.h"
#include "layer_norm/composite.h"
#include "layer_norm/cpu_backend.h"
#include "layer_norm/cpu_channel_kernels.h"

namespace bnext {
namespace layer_norm {
namespace {

using cpu::acc_t;
using cpu::grain_for;
using cpu::hsum;
using cpu::kLanes;
using cpu::load_acc;
using cpu::store_acc;
using cpu::Vec;

// Row chunks for the column sums: enough for 64 threads, few enough that the
// per-chunk buffers stay within ~8 MiB of floats and merging stays cheap.
int64_t num_row_chunks(int64_t M, int64_t N) {
  const int64_t by_rows = (M + 15) / 16;
  const int64_t by_memory = std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(N, 1));
  return std::max<int64_t>(1, std::min({by_rows, by_memory, int64_t(64)}));
}

int64_t chunk_begin(int64_t chunk, int64_t chunks, int64_t M) { return chunk * M / chunks; }

// x - mean; RMSNorm's mean is zero, and skipping the subtraction (and the
// zero c of its backward) changes no bit.
template <bool kCentred, class V>
inline V centred(const V& x, const V& mean) {
  if constexpr (kCentred) {
    return x - mean;
  } else {
    return x;
  }
}

// Outputs of at least half the last-level cache bypass it (common/cpu_cache.h)
// when every row starts aligned for the streaming stores.
inline bool streams_rows(const Tensor& out, int64_t N) {
  return cpu::should_stream(out) && cpu::stream_head(out.const_data_ptr()) == 0 &&
         (N * static_cast<int64_t>(out.element_size())) % cpu::kStreamAlign == 0;
}

template <typename scalar_t>
inline void store_row(scalar_t* p, const Vec<scalar_t>& v, int64_t n, bool stream) {
  if (stream && n == kLanes<scalar_t>) {
    cpu::stream_acc(p, v);
  } else {
    store_acc(p, v, n);
  }
}

// Rows handled together: the forward takes their horizontal sums at once; the
// backward's column sums load and store their running values once per group
// rather than once per row.
constexpr int kRowGroup = 4;

// ---------------------------------------------------------------- statistics

// Sums of squares of R rows of n values, row j at p + j * n. Squares are
// non-negative: no cancellation, a plain sum is accurate. The rows'
// horizontal sums are taken together (cpu::hsums).
template <int R, typename scalar_t>
void rows_sum_sq(const scalar_t* p, int64_t n, acc_t<scalar_t>* out) {
  using V = Vec<scalar_t>;
  V acc[R];
  for (int j = 0; j < R; ++j) {
    acc[j] = cpu::sum_any_order(
        p + j * n, n, [](const V& a, const V& v, int64_t) { return at::vec::fmadd(v, v, a); });
  }
  cpu::hsums<scalar_t>(acc, R, out);
}

// (mean, rstd) of R rows of n values, row j at p + j * n; RMSNorm's mean is 0.
template <int R, typename scalar_t, bool kCentred>
void rows_stats(const scalar_t* p, int64_t n, acc_t<scalar_t> eps, acc_t<scalar_t>* mean,
                acc_t<scalar_t>* rstd) {
  using T = acc_t<scalar_t>;
  if constexpr (kCentred) {
    T m2[R];
    cpu::moments<R>(p, n, n, mean, m2);
    for (int j = 0; j < R; ++j) rstd[j] = layer_norm_rstd(Welford<T>{mean[j], m2[j], n}, eps);
  } else {
    T sum_sq[R];
    rows_sum_sq<R>(p, n, sum_sq);
    for (int j = 0; j < R; ++j) {
      mean[j] = T(0);
      rstd[j] = rms_norm_rstd(sum_sq[j], n, eps);
    }
  }
}

// The per-range work of each kernel below unpacks its pointers and sizes into
// scalar locals before its loops, rather than reading them through captured
// references or a struct in memory: the vector stores are of may-alias types,
// so the compiler would otherwise reload every pointer after every store
// (measured: 12% of the backward on cache-resident rows).

// ------------------------------------------------------------------- forward

template <typename scalar_t>
struct ForwardRows {
  const scalar_t* x;
  scalar_t* y;
  acc_t<scalar_t>* mean;  // unused by RMSNorm
  acc_t<scalar_t>* rstd;
  const acc_t<scalar_t>* w;  // may be null
  const acc_t<scalar_t>* b;  // may be null
  int64_t N;
  acc_t<scalar_t> eps;
  bool stream;
};

// y = (x - mean) * rstd * w + b over rows [begin, end); RMSNorm is
// kCentred = false (mean 0, no b).
template <typename scalar_t, bool kCentred>
BNEXT_FLATTEN void forward_range(const ForwardRows<scalar_t>& a, int64_t begin, int64_t end) {
  using T = acc_t<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  const scalar_t* const x_p = a.x;
  scalar_t* const y_p = a.y;
  T* const mean_p = a.mean;
  T* const rstd_p = a.rstd;
  const T* const w_p = a.w;
  const T* const b_p = a.b;
  const int64_t N = a.N;
  const T eps = a.eps;
  const bool stream = a.stream;
  const int64_t vec_end = N - N % L;
  // Rows of one block four at a time for their statistics (their horizontal
  // sums are taken together), then normalised one by one from cache; longer
  // rows one by one, so that each is still in L1/L2.
  const auto group = [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    T m[R], s[R];
    rows_stats<R, scalar_t, kCentred>(x_p + r0 * N, N, eps, m, s);
    for (int j = 0; j < R; ++j) {
      const int64_t r = r0 + j;
      const scalar_t* x = x_p + r * N;
      scalar_t* y = y_p + r * N;
      if constexpr (kCentred) mean_p[r] = m[j];
      rstd_p[r] = s[j];
      const Vec<scalar_t> vm(m[j]);
      const Vec<scalar_t> vs(s[j]);
      auto apply = [&](int64_t i, int64_t n) {
        auto scale = w_p ? vs * Vec<scalar_t>::loadu(w_p + i, n) : vs;
        auto v = centred<kCentred>(load_acc(x + i, n), vm) * scale;
        if (b_p) v = v + Vec<scalar_t>::loadu(b_p + i, n);
        store_row(y + i, v, n, stream);
      };
      for (int64_t i = 0; i < vec_end; i += L) apply(i, L);
      if (vec_end < N) apply(vec_end, N - vec_end);
    }
  };
  if (N <= cpu::kBlock) {
    cpu::for_each_row_group<kRowGroup>(begin, end, group);
  } else {
    cpu::for_each_row_group<1>(begin, end, group);
  }
  if (stream) cpu::stream_fence();
}

template <typename scalar_t, bool kCentred>
void forward_rows(const RowProblem& p, double eps, Tensor& out, Tensor& mean, Tensor& rstd) {
  using T = acc_t<scalar_t>;
  const ForwardRows<scalar_t> a{p.x.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<scalar_t>(),
                                kCentred ? mean.mutable_data_ptr<T>() : nullptr,
                                rstd.mutable_data_ptr<T>(),
                                data_or_null<T>(p.w),
                                data_or_null<T>(p.b),
                                p.N,
                                static_cast<T>(eps),
                                streams_rows(out, p.N)};
  at::parallel_for(0, p.M, grain_for(p.N), [a](int64_t begin, int64_t end) {
    forward_range<scalar_t, kCentred>(a, begin, end);
  });
}

// ------------------------------------------------------------------ backward

template <typename scalar_t>
struct BackwardRows {
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* dx;
  const acc_t<scalar_t>* mean;  // unused by RMSNorm
  const acc_t<scalar_t>* rstd;
  const acc_t<scalar_t>* w;  // never null: ones without a weight
  int64_t N;
  bool stream;
};

// dx = a * (g + k * (x - mean) + c) with g = dy * w (layer_norm_math.h) for
// rows [begin, end), fused with the column sums dw += dy * (x - mean) * rstd
// and db += dy into this chunk's dw and db when wanted.
template <typename scalar_t, bool kCentred, bool kColumns>
BNEXT_FLATTEN void backward_range(const BackwardRows<scalar_t>& a, acc_t<scalar_t>* dw,
                                  acc_t<scalar_t>* db, int64_t begin, int64_t end) {
  using T = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  const scalar_t* const x_p = a.x;
  const scalar_t* const dy_p = a.dy;
  scalar_t* const dx_p = a.dx;
  const T* const mean_p = a.mean;
  const T* const rstd_p = a.rstd;
  const T* const w_p = a.w;
  const int64_t N = a.N;
  const bool stream = a.stream;
  const int64_t vec_end = N - N % L;
  // R rows at r0, R a compile-time constant so that the per-row coefficients
  // stay in registers across the column loop.
  auto group = [&](auto rows_c, int64_t r0) {
    constexpr int R = decltype(rows_c)::value;
    V vm[R], vs[R], va[R], vk[R], vc[R];
    for (int j = 0; j < R; ++j) {
      const int64_t r = r0 + j;
      const scalar_t* x = x_p + r * N;
      const scalar_t* dy = dy_p + r * N;
      const T s = rstd_p[r];
      vm[j] = V(kCentred ? mean_p[r] : T(0));
      vs[j] = V(s);
      // Two accumulators per sum: a single chain of dependent adds would
      // bound the loop by their latency. Padding lanes load dy = 0, so they
      // add nothing to either sum.
      V s_g[2] = {V(T(0)), V(T(0))};
      V s_gx[2] = {V(T(0)), V(T(0))};
      auto reduce = [&](int64_t i, int64_t n, int acc) {
        const auto g = load_acc(dy + i, n) * V::loadu(w_p + i, n);
        if constexpr (kCentred) s_g[acc] += g;
        s_gx[acc] = at::vec::fmadd(g, centred<kCentred>(load_acc(x + i, n), vm[j]), s_gx[acc]);
      };
      int64_t i = 0;
      for (; i + 2 * L <= vec_end; i += 2 * L) {
        reduce(i, L, 0);
        reduce(i + L, L, 1);
      }
      if (i < vec_end) reduce(i, L, 0);
      if (vec_end < N) reduce(vec_end, N - vec_end, 1);
      const auto co = row_backward_coeffs(s, hsum<scalar_t>(s_g[0] + s_g[1]),
                                          hsum<scalar_t>(s_gx[0] + s_gx[1]), N, kCentred);
      va[j] = V(co.a);
      vk[j] = V(co.k);
      vc[j] = V(co.c);
    }
    auto apply = [&](int64_t i, int64_t n) {
      const auto w = V::loadu(w_p + i, n);
      V dw_acc, db_acc;
      if constexpr (kColumns) dw_acc = V::loadu(dw + i, n);
      if constexpr (kColumns && kCentred) db_acc = V::loadu(db + i, n);
      for (int j = 0; j < R; ++j) {
        const int64_t off = (r0 + j) * N + i;
        const auto d = load_acc(dy_p + off, n);
        const auto xm = centred<kCentred>(load_acc(x_p + off, n), vm[j]);
        // Same order of operations as row_backward_dx (layer_norm_math.h).
        const auto g_c = kCentred ? d * w + vc[j] : d * w;
        store_row(dx_p + off, va[j] * at::vec::fmadd(vk[j], xm, g_c), n, stream);
        if constexpr (kColumns) dw_acc = at::vec::fmadd(d * xm, vs[j], dw_acc);
        if constexpr (kColumns && kCentred) db_acc = db_acc + d;
      }
      if constexpr (kColumns) dw_acc.store(dw + i, n);
      if constexpr (kColumns && kCentred) db_acc.store(db + i, n);
    };
    for (int64_t i = 0; i < vec_end; i += L) apply(i, L);
    if (vec_end < N) apply(vec_end, N - vec_end);
  };
  cpu::for_each_row_group<kRowGroup>(begin, end, group);
}

template <typename scalar_t, bool kCentred, bool kColumns>
void backward_rows(const RowProblem& p, const Tensor& mean, const Tensor& rstd, Tensor& dx,
                   Tensor& dw_col, Tensor& db_col) {
  using T = acc_t<scalar_t>;
  const int64_t M = p.M;
  const int64_t N = p.N;
  // Without a weight g = dy; a row of ones keeps the inner loops branch-free.
  std::vector<T> ones(p.w.defined() ? 0 : N, T(1));
  const BackwardRows<scalar_t> a{p.x.const_data_ptr<scalar_t>(),
                                 p.dy.const_data_ptr<scalar_t>(),
                                 dx.mutable_data_ptr<scalar_t>(),
                                 kCentred ? mean.const_data_ptr<T>() : nullptr,
                                 rstd.const_data_ptr<T>(),
                                 p.w.defined() ? p.w.const_data_ptr<T>() : ones.data(),
                                 N,
                                 streams_rows(dx, N)};
  const int64_t chunks = num_row_chunks(M, N);
  std::vector<T> dw_parts(kColumns ? chunks * N : 0, T(0));
  std::vector<T> db_parts(kColumns && kCentred ? chunks * N : 0, T(0));

  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      backward_range<scalar_t, kCentred, kColumns>(
          a, kColumns ? dw_parts.data() + ch * N : nullptr,
          kColumns && kCentred ? db_parts.data() + ch * N : nullptr, chunk_begin(ch, chunks, M),
          chunk_begin(ch + 1, chunks, M));
    }
    if (a.stream) cpu::stream_fence();
  });
  if constexpr (kColumns) {
    T* dw_out = dw_col.mutable_data_ptr<T>();
    T* db_out = kCentred ? db_col.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        T w_sum = T(0);
        T b_sum = T(0);
        for (int64_t ch = 0; ch < chunks; ++ch) {
          w_sum += dw_parts[ch * N + c];
          if constexpr (kCentred) b_sum += db_parts[ch * N + c];
        }
        dw_out[c] = w_sum;
        if constexpr (kCentred) db_out[c] = b_sum;
      }
    });
  }
}

}  // namespace

// ------------------------------------------------------------------- backend

template <bool kCentred>
void CpuBackend::forward(const RowProblem& p, double eps, Tensor& out, Tensor& mean, Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "bnext_norm_fwd",
      [&] { forward_rows<scalar_t, kCentred>(p, eps, out, mean, rstd); });
}

template <bool kCentred>
void CpuBackend::backward(const RowProblem& p, const Tensor& mean, const Tensor& rstd, bool columns,
                          Tensor& dx, Tensor& dw_col, Tensor& db_col) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "bnext_norm_bwd", [&] {
        if (columns) {
          backward_rows<scalar_t, kCentred, true>(p, mean, rstd, dx, dw_col, db_col);
        } else {
          backward_rows<scalar_t, kCentred, false>(p, mean, rstd, dx, dw_col, db_col);
        }
      });
}

template <bool kCentred>
void CpuBackend::channel_forward(const ChannelProblem& p, double eps, Tensor& out, Tensor& mean,
                                 Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "bnext_norm_2d_fwd",
      [&] { channel_kernels::forward<scalar_t, kCentred>(p, eps, out, mean, rstd); });
}

template <bool kCentred>
void CpuBackend::channel_backward(const ChannelProblem& p, const Tensor& mean, const Tensor& rstd,
                                  bool columns, Tensor& dx, Tensor& dw_col, Tensor& db_col) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "bnext_norm_2d_bwd", [&] {
        if (columns) {
          channel_kernels::backward<scalar_t, kCentred, true>(p, mean, rstd, dx, dw_col, db_col);
        } else {
          channel_kernels::backward<scalar_t, kCentred, false>(p, mean, rstd, dx, dw_col, db_col);
        }
      });
}

TORCH_LIBRARY_IMPL(bnext, CPU, m) { register_kernels<CpuBackend>(m); }

}  // namespace layer_norm
}  // namespace bnext
