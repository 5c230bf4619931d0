// LayerNorm / RMSNorm over dim 1 of an NCHW-like input (the _2d ops'
// ChannelProblem), CPU kernels; included by cpu_kernels.cpp only.
//
// The statistics of position (b, s) are over the C values x[b, :, s], S
// apart. Vectors run along s (contiguous), the channel loop is the inner
// one: a task is a tile of up to kMaxTileVectors vectors of positions of one
// plane b, and every pass over it reads C runs of the tile's width, which
// stay in L1/L2 between the passes (statistics, then normalisation or dx).
// Per position the arithmetic is the row kernels' (bnext/layer_norm_math.h),
// lane by lane, so the two layouts agree.
//
// A tile reads C runs in C different pages, more streams than the L2
// prefetcher tracks (32 on current x86 cores), so it would prefetch none:
// the first pass over a tile prefetches the same runs of the next tile
// (measured on 32x96x56x56 float32: the forward at 56% of the copy bandwidth
// without). Outputs of at least half the last-level cache are written with
// streaming stores where every run is aligned for them (common/cpu_cache.h).
//
// Parameter gradients are sums over all positions: each chunk of tasks adds
// vector partials per channel into its own buffer, merged in a fixed order
// and then across lanes. Chunks depend on the shape only, so results are
// bitwise reproducible across thread counts.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bnext/layer_norm_math.h"
#include "bnext/welford.h"
#include "common/checks.h"
#include "common/cpu_cache.h"
#include "common/cpu_vec.h"
#include "layer_norm/checks.h"

namespace bnext {
namespace layer_norm {
namespace channel_kernels {

using cpu::acc_t;
using cpu::kLanes;
using cpu::load_acc;
using cpu::store_acc;
using cpu::Vec;

// Vectors of positions per tile: long enough runs per channel for the
// prefetchers, few enough that the accumulators stay in registers.
constexpr int kMaxTileVectors = 8;
// The bytes a tile's C runs may take, so that the second pass over them hits
// L2 rather than memory.
constexpr int64_t kTileBytes = int64_t(256) << 10;

// The tiling of a ChannelProblem: planes of `tiles` tiles of up to `vectors`
// vectors of positions.
struct Tiling {
  int64_t vectors;
  int64_t width;  // positions per tile
  int64_t tiles;  // per plane
  int64_t tasks;  // B * tiles
};

template <typename scalar_t>
Tiling tiling(const ChannelProblem& p) {
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t run_bytes = std::max<int64_t>(p.C, 1) * L * int64_t(sizeof(scalar_t));
  int64_t vectors = std::clamp<int64_t>(kTileBytes / run_bytes, 1, kMaxTileVectors);
  // No wider than a plane: a 7x7 plane is one tile of 4 vectors, not 8.
  vectors = std::min(vectors, (p.S + L - 1) / L);
  const int64_t width = vectors * L;
  const int64_t tiles = (p.S + width - 1) / width;
  return {vectors, width, tiles, p.B * tiles};
}

// One tile: NV vectors of positions starting at s0 of plane b, the last one
// holding `last` (<= L) real positions; padding lanes load zeros and are
// never stored.
struct Tile {
  int64_t offset;  // of x[b, 0, s0]
  int64_t stat;    // of mean[b, s0]
  int64_t last;
  int64_t next;  // bytes of the next tile's runs in this plane to prefetch (0: none)
};

// Prefetches `bytes` from p into L2, a cache line at a time.
inline void prefetch_run(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
}

// store_acc, streamed when the output streams and the vector is whole.
template <typename scalar_t>
inline void store_out(scalar_t* p, const Vec<scalar_t>& v, int64_t n, bool stream) {
  if (stream && n == kLanes<scalar_t>) {
    cpu::stream_acc(p, v);
  } else {
    store_acc(p, v, n);
  }
}

// Whether `out` (B, C, S) is written with streaming stores: large, and every
// tile's runs start aligned.
template <typename scalar_t>
bool streams_tiles(const Tensor& out, int64_t S, int64_t width) {
  const int64_t size = static_cast<int64_t>(sizeof(scalar_t));
  return cpu::should_stream(out) && cpu::stream_head(out.const_data_ptr<scalar_t>()) == 0 &&
         (S * size) % cpu::kStreamAlign == 0 && (width * size) % cpu::kStreamAlign == 0;
}

template <typename scalar_t>
constexpr int64_t lanes_of(int v, int NV, int64_t last) {
  return v == NV - 1 ? last : kLanes<scalar_t>;
}

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* x;
  scalar_t* y;
  acc_t<scalar_t>* mean;  // unused by RMSNorm
  acc_t<scalar_t>* rstd;
  const acc_t<scalar_t>* w;  // may be null
  const acc_t<scalar_t>* b;  // may be null
  int64_t C;
  int64_t S;
  acc_t<scalar_t> eps;
  bool stream;
};

// The statistics of a tile's positions (written to mean/rstd and returned as
// vectors), then y = (x - mean) * (rstd * w) + b, as the row kernels.
template <typename scalar_t, bool kCentred, int NV>
BNEXT_FLATTEN void forward_tile(const ForwardArgs<scalar_t>& a, const Tile& t) {
  using T = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  const scalar_t* const x = a.x + t.offset;
  scalar_t* const y = a.y + t.offset;
  const int64_t C = a.C;
  const int64_t S = a.S;
  const int64_t last = t.last;
  const int64_t next = t.next;
  const bool stream = a.stream;
  const T* const w_p = a.w;
  const T* const b_p = a.b;

  V mean[NV], acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = V(T(0));
  if constexpr (kCentred) {
    // Two passes, the second over the deviations: no cancellation when
    // |mean| >> std, and the runs are still in cache.
    for (int64_t c = 0; c < C; ++c) {
      prefetch_run(x + c * S + NV * L, next);
      for (int v = 0; v < NV; ++v)
        acc[v] += load_acc(x + c * S + v * L, lanes_of<scalar_t>(v, NV, last));
    }
    const V count(static_cast<T>(C));
    for (int v = 0; v < NV; ++v) {
      mean[v] = acc[v] / count;
      acc[v] = V(T(0));
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int v = 0; v < NV; ++v) {
        const V d = load_acc(x + c * S + v * L, lanes_of<scalar_t>(v, NV, last)) - mean[v];
        acc[v] = at::vec::fmadd(d, d, acc[v]);
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      prefetch_run(x + c * S + NV * L, next);
      for (int v = 0; v < NV; ++v) {
        const V e = load_acc(x + c * S + v * L, lanes_of<scalar_t>(v, NV, last));
        acc[v] = at::vec::fmadd(e, e, acc[v]);
      }
    }
  }
  // Per position, the row kernels' formula (layer_norm_math.h).
  V rstd[NV];
  for (int v = 0; v < NV; ++v) {
    T m[L], s[L];
    const int64_t n = lanes_of<scalar_t>(v, NV, last);
    if constexpr (kCentred) mean[v].store(m);
    acc[v].store(s);
    for (int64_t l = 0; l < L; ++l) {
      if (l >= n) {
        s[l] = T(0);  // padding: any finite value
        continue;
      }
      s[l] = kCentred ? layer_norm_rstd(Welford<T>{m[l], s[l], C}, a.eps)
                      : rms_norm_rstd(s[l], C, a.eps);
    }
    rstd[v] = V::loadu(s);
    if constexpr (kCentred) mean[v].store(a.mean + t.stat + v * L, n);
    rstd[v].store(a.rstd + t.stat + v * L, n);
  }
  for (int64_t c = 0; c < C; ++c) {
    const T wc = w_p ? w_p[c] : T(1);
    for (int v = 0; v < NV; ++v) {
      const int64_t n = lanes_of<scalar_t>(v, NV, last);
      const V scale = w_p ? rstd[v] * V(wc) : rstd[v];
      V out = load_acc(x + c * S + v * L, n);
      if constexpr (kCentred) out = out - mean[v];
      out = out * scale;
      if (b_p) out = out + V(b_p[c]);
      store_out(y + c * S + v * L, out, n, stream);
    }
  }
}

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* dx;
  const acc_t<scalar_t>* mean;  // unused by RMSNorm
  const acc_t<scalar_t>* rstd;
  const acc_t<scalar_t>* w;  // never null: ones without a weight
  int64_t C;
  int64_t S;
  bool stream;
};

// dx of a tile's positions, and with kColumns the per-channel vector
// partials of sum(dy * (x - mean) * rstd) and sum(dy) added into dw, db
// (C vectors each).
template <typename scalar_t, bool kCentred, bool kColumns, int NV>
BNEXT_FLATTEN void backward_tile(const BackwardArgs<scalar_t>& a, const Tile& t, Vec<scalar_t>* dw,
                                 Vec<scalar_t>* db) {
  using T = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t off = t.offset;
  const scalar_t* const x = a.x + off;
  const scalar_t* const dy = a.dy + off;
  scalar_t* const dx = a.dx + off;
  const T* const w_p = a.w;
  const int64_t C = a.C;
  const int64_t S = a.S;
  const int64_t last = t.last;
  const int64_t next = t.next;
  const bool stream = a.stream;

  V mean[NV], rstd[NV], s_g[NV], s_gx[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t n = lanes_of<scalar_t>(v, NV, last);
    // Padding lanes load 0 for both: finite coefficients, no contribution.
    mean[v] = kCentred ? V::loadu(a.mean + t.stat + v * L, n) : V(T(0));
    rstd[v] = V::loadu(a.rstd + t.stat + v * L, n);
    s_g[v] = V(T(0));
    s_gx[v] = V(T(0));
  }
  for (int64_t c = 0; c < C; ++c) {
    prefetch_run(x + c * S + NV * L, next);
    prefetch_run(dy + c * S + NV * L, next);
    const V wc(w_p[c]);
    for (int v = 0; v < NV; ++v) {
      const int64_t n = lanes_of<scalar_t>(v, NV, last);
      const V g = load_acc(dy + c * S + v * L, n) * wc;
      V xm = load_acc(x + c * S + v * L, n);
      if constexpr (kCentred) {
        xm = xm - mean[v];
        s_g[v] += g;
      }
      s_gx[v] = at::vec::fmadd(g, xm, s_gx[v]);
    }
  }
  V ca[NV], ck[NV], cc[NV];
  for (int v = 0; v < NV; ++v) {
    T r[L], sg[L], sgx[L], oa[L], ok[L], oc[L];
    rstd[v].store(r);
    s_g[v].store(sg);
    s_gx[v].store(sgx);
    for (int64_t l = 0; l < L; ++l) {
      const auto co = row_backward_coeffs(r[l], sg[l], sgx[l], C, kCentred);
      oa[l] = co.a;
      ok[l] = co.k;
      oc[l] = co.c;
    }
    ca[v] = V::loadu(oa);
    ck[v] = V::loadu(ok);
    cc[v] = V::loadu(oc);
  }
  for (int64_t c = 0; c < C; ++c) {
    const V wc(w_p[c]);
    V dw_acc(T(0)), db_acc(T(0));
    for (int v = 0; v < NV; ++v) {
      const int64_t n = lanes_of<scalar_t>(v, NV, last);
      const V d = load_acc(dy + c * S + v * L, n);
      V xm = load_acc(x + c * S + v * L, n);
      if constexpr (kCentred) xm = xm - mean[v];
      // Same order of operations as row_backward_dx (layer_norm_math.h).
      const V g_c = kCentred ? d * wc + cc[v] : d * wc;
      store_out(dx + c * S + v * L, ca[v] * at::vec::fmadd(ck[v], xm, g_c), n, stream);
      if constexpr (kColumns) {
        dw_acc = at::vec::fmadd(d * xm, rstd[v], dw_acc);
        if constexpr (kCentred) db_acc = db_acc + d;
      }
    }
    if constexpr (kColumns) {
      dw[c] = dw[c] + dw_acc;
      if constexpr (kCentred) db[c] = db[c] + db_acc;
    }
  }
}

// Calls f(std::integral_constant<int, NV>) for a tile of `vectors` vectors,
// NV being that count as a compile-time constant.
template <class F>
void with_tile_vectors(int64_t vectors, const F& f) {
  switch (vectors) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 5:
      return f(std::integral_constant<int, 5>{});
    case 6:
      return f(std::integral_constant<int, 6>{});
    case 7:
      return f(std::integral_constant<int, 7>{});
    default:
      return f(std::integral_constant<int, kMaxTileVectors>{});
  }
}

// Task `task` of the tiling (plane-major), and how many vectors it has.
template <typename scalar_t>
Tile tile_of(const Tiling& g, const ChannelProblem& p, int64_t task, int64_t* vectors) {
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t b = task / g.tiles;
  const int64_t s0 = (task % g.tiles) * g.width;
  const int64_t width = std::min(g.width, p.S - s0);
  *vectors = (width + L - 1) / L;
  // The next tile of this plane, if any: the runs the next task reads when
  // the thread goes on in order.
  const int64_t next = std::min(g.width, std::max<int64_t>(p.S - s0 - width, 0));
  return {b * p.C * p.S + s0, b * p.S + s0, width - (*vectors - 1) * L,
          next * static_cast<int64_t>(sizeof(scalar_t))};
}

template <typename scalar_t, bool kCentred>
void forward(const ChannelProblem& p, double eps, Tensor& out, Tensor& mean, Tensor& rstd) {
  using T = acc_t<scalar_t>;
  const Tiling g = tiling<scalar_t>(p);
  const ForwardArgs<scalar_t> a{p.x.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<scalar_t>(),
                                kCentred ? mean.mutable_data_ptr<T>() : nullptr,
                                rstd.mutable_data_ptr<T>(),
                                data_or_null<T>(p.w),
                                data_or_null<T>(p.b),
                                p.C,
                                p.S,
                                static_cast<T>(eps),
                                streams_tiles<scalar_t>(out, p.S, g.width)};
  at::parallel_for(0, g.tasks, cpu::grain_for(p.C * g.width), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      int64_t vectors;
      const Tile t = tile_of<scalar_t>(g, p, task, &vectors);
      with_tile_vectors(
          vectors, [&](auto nv) { forward_tile<scalar_t, kCentred, decltype(nv)::value>(a, t); });
    }
    if (a.stream) cpu::stream_fence();
  });
}

// Chunks of tasks for the column sums: enough for 64 threads, with per-chunk
// buffers (C vectors per sum) of at most ~8 MiB in all.
inline int64_t num_task_chunks(int64_t tasks, int64_t buffer_values) {
  const int64_t by_tasks = (tasks + 3) / 4;
  const int64_t by_memory = std::max<int64_t>(1, (int64_t(1) << 21) / buffer_values);
  return std::max<int64_t>(1, std::min({by_tasks, by_memory, int64_t(64)}));
}

template <typename scalar_t, bool kCentred, bool kColumns>
void backward(const ChannelProblem& p, const Tensor& mean, const Tensor& rstd, Tensor& dx,
              Tensor& dw_col, Tensor& db_col) {
  using T = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  const Tiling g = tiling<scalar_t>(p);
  // Without a weight g = dy; ones keep the inner loops branch-free.
  std::vector<T> ones(p.w.defined() ? 0 : p.C, T(1));
  const BackwardArgs<scalar_t> a{p.x.const_data_ptr<scalar_t>(),
                                 p.dy.const_data_ptr<scalar_t>(),
                                 dx.mutable_data_ptr<scalar_t>(),
                                 kCentred ? mean.const_data_ptr<T>() : nullptr,
                                 rstd.const_data_ptr<T>(),
                                 p.w.defined() ? p.w.const_data_ptr<T>() : ones.data(),
                                 p.C,
                                 p.S,
                                 streams_tiles<scalar_t>(dx, p.S, g.width)};
  const auto run = [&](int64_t begin, int64_t end, V* dw, V* db) {
    for (int64_t task = begin; task < end; ++task) {
      int64_t vectors;
      const Tile t = tile_of<scalar_t>(g, p, task, &vectors);
      with_tile_vectors(vectors, [&](auto nv) {
        backward_tile<scalar_t, kCentred, kColumns, decltype(nv)::value>(a, t, dw, db);
      });
    }
    if (a.stream) cpu::stream_fence();
  };
  if constexpr (!kColumns) {
    at::parallel_for(0, g.tasks, cpu::grain_for(p.C * g.width),
                     [&](int64_t begin, int64_t end) { run(begin, end, nullptr, nullptr); });
    return;
  }
  const int64_t sums = kCentred ? 2 : 1;
  const int64_t chunks = num_task_chunks(g.tasks, sums * p.C * L);
  std::vector<V> dw_parts(chunks * p.C, V(T(0)));
  std::vector<V> db_parts(kCentred ? chunks * p.C : 0, V(T(0)));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      run(ch * g.tasks / chunks, (ch + 1) * g.tasks / chunks, dw_parts.data() + ch * p.C,
          kCentred ? db_parts.data() + ch * p.C : nullptr);
    }
  });
  T* const dw_out = dw_col.mutable_data_ptr<T>();
  T* const db_out = kCentred ? db_col.mutable_data_ptr<T>() : nullptr;
  for (int64_t c = 0; c < p.C; ++c) {
    V w_sum(T(0)), b_sum(T(0));
    for (int64_t ch = 0; ch < chunks; ++ch) {
      w_sum = w_sum + dw_parts[ch * p.C + c];
      if constexpr (kCentred) b_sum = b_sum + db_parts[ch * p.C + c];
    }
    dw_out[c] = cpu::hsum<scalar_t>(w_sum);
    if constexpr (kCentred) db_out[c] = cpu::hsum<scalar_t>(b_sum);
  }
}

}  // namespace channel_kernels
}  // namespace layer_norm
}  // namespace bnext
