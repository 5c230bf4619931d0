// Batch Norm CPU kernels. Two layouts, each with its own loop order:
//   channels-first (NCHW): a channel's values come in planes of S contiguous
//     elements; planes are reduced independently and merged per channel.
//   channels-last (NHWC, and (N, C) input): rows of C contiguous channels;
//     vectors run across channels and rows are split into chunks.
// Channels-first planes shorter than a cache line take the channels-last
// kernels over rows of C * S "virtual channels" (see tiny_planes).
// The partition into planes/chunks depends on the shape only, never on the
// thread count, so results are bitwise reproducible across thread settings.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "batch_norm/composite.h"
#include "batch_norm/cpu_backend.h"
#include "bnext/welford.h"
#include "common/cpu_cache.h"
#include "common/cpu_reduce.h"
#include "common/cpu_vec.h"

namespace bnext {
namespace batch_norm {
namespace {

using cpu::acc_t;
using cpu::grain_for;
using cpu::hsum;
using cpu::kLanes;
using cpu::load_acc;
using cpu::load_acc2;
using cpu::should_stream;
using cpu::store_acc;
using cpu::store_acc2;
using cpu::stream_acc2;
using cpu::stream_fence;
using cpu::stream_head;
using cpu::Vec;

// Channels-last reductions split the rows into chunks (by shape only) that
// stay in L2 while they are swept once per tile of channels; a tile is up to
// kTileVecs vectors of channels whose accumulators live in registers for the
// whole chunk. Lanes past C load zeros and are never stored.
constexpr int64_t kChunkBytes = 256 * 1024;
constexpr int kTileVecs = 4;

int64_t rows_per_chunk(int64_t C, int64_t elem_size) {
  return std::max<int64_t>(16, kChunkBytes / std::max<int64_t>(C * elem_size, 1));
}

// Calls f(c0, counts) for each tile of channels starting at c0, where
// counts[j] is the number of valid lanes of the tile's j-th vector.
template <typename scalar_t, class F>
void for_each_tile(int64_t C, const F& f) {
  constexpr int64_t L = kLanes<scalar_t>;
  for (int64_t c0 = 0; c0 < C; c0 += kTileVecs * L) {
    int64_t counts[kTileVecs];
    for (int j = 0; j < kTileVecs; ++j) {
      counts[j] = std::clamp<int64_t>(C - c0 - j * L, 0, L);
    }
    f(c0, counts);
  }
}

// Rows longer than 512 bytes are read whole instead of in tiles: tiles sweep
// each row in pieces at a stride of the row length, which for power-of-two C
// maps every row of a block to the same few L1 sets. Accumulators then live
// in an L1-resident array of C values rather than in registers. (Measured on
// 32x256x14x14 channels_last: whole rows win for float32, 1 KiB rows; tiles
// for bfloat16, 512-byte rows.)
template <typename scalar_t>
bool wide_rows(int64_t C) {
  return C * static_cast<int64_t>(sizeof(scalar_t)) > 512;
}

// f(c, n) for each vector of channels starting at c, with n valid lanes.
template <typename scalar_t, class F>
void for_each_vec(int64_t C, const F& f) {
  constexpr int64_t L = kLanes<scalar_t>;
  int64_t c = 0;
  for (; c + L <= C; c += L) f(c, L);
  if (c < C) f(c, C - c);
}

// f(rows, r, c, n) for the vectors (channels [c, c + n)) of wide rows
// [r0, r1), four rows at a time (cpu::for_each_row_group) so that the
// accumulators in L1 are loaded and stored once per four rows.
template <typename scalar_t, class F>
void for_each_row_group(int64_t C, int64_t r0, int64_t r1, const F& f) {
  cpu::for_each_row_group<4>(r0, r1, [&](auto rows, int64_t r) {
    for_each_vec<scalar_t>(C, [&](int64_t c, int64_t n) { f(rows, r, c, n); });
  });
}

// ---------------------------------------------------------------- statistics

// Partial (mean, m2) of every channel, part-major (index part * C + c), and
// each part's count, which is the same for all channels of a part.
template <typename T>
struct ChannelParts {
  ChannelParts(int64_t parts, int64_t C) : mean(parts * C), m2(parts * C), count(parts) {}
  std::vector<T> mean;
  std::vector<T> m2;
  std::vector<int64_t> count;
};

// Merges each channel's parts in part order. The merge weights depend on the
// counts only, so the loop over channels has no division and vectorises.
template <typename T>
void write_stats(const ChannelParts<T>& parts, int64_t C, Tensor& mean, Tensor& var) {
  T* mean_p = mean.mutable_data_ptr<T>();
  T* var_p = var.mutable_data_ptr<T>();
  const auto num_parts = static_cast<int64_t>(parts.count.size());
  at::parallel_for(0, C, grain_for(num_parts), [&](int64_t c0, int64_t c1) {
    int64_t seen = 0;
    for (int64_t j = 0; j < num_parts; ++j) {
      const int64_t n = parts.count[j];
      const T* pm = parts.mean.data() + j * C;
      const T* pq = parts.m2.data() + j * C;
      cpu::merge_partials<T>(mean_p + c0, var_p + c0, pm + c0, pq + c0, c1 - c0, seen, n);
      seen += n;
    }
    for (int64_t c = c0; c < c1; ++c) var_p[c] = welford_var(Welford<T>{mean_p[c], var_p[c], seen});
  });
}

template <typename scalar_t>
void stats_channels_first(const Tensor& x, const ChannelView& v, Tensor& mean, Tensor& var) {
  using T = acc_t<scalar_t>;
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  ChannelParts<T> planes(v.N, v.C);  // plane n * C + c is part n of channel c
  std::fill(planes.count.begin(), planes.count.end(), v.S);
  at::parallel_for(0, v.N * v.C, grain_for(v.S), [&](int64_t begin, int64_t end) {
    // Four planes at a time: those of one block take their horizontal sums
    // together (measured on 32x256x14x14: 0.068 -> 0.060 ms in bfloat16).
    cpu::for_each_row_group<4>(begin, end, [&](auto rows, int64_t i) {
      cpu::moments<decltype(rows)::value>(x_p + i * v.S, v.S, v.S, planes.mean.data() + i,
                                          planes.m2.data() + i);
    });
  });
  write_stats(planes, v.C, mean, var);
}

// Vectorised across channels: blocks of kRowBlock rows are reduced in two
// sweeps (sum, then squared deviations from the block mean, re-read from L1)
// and merged into the tile's running (mean, m2) with Chan's formula. Every
// lane has seen the same rows, so the merge weights are scalars.
constexpr int64_t kRowBlock = 64;

// (mean, m2) of rows [r0, r1) of wide rows, per channel, into out_mean and
// out_m2; `scratch` holds 2 * C values.
template <typename scalar_t>
BNEXT_FLATTEN void stats_wide_rows(const scalar_t* x_p, int64_t C, int64_t r0, int64_t r1,
                                   acc_t<scalar_t>* out_mean, acc_t<scalar_t>* out_m2,
                                   acc_t<scalar_t>* scratch) {
  using T = acc_t<scalar_t>;
  T* bm = scratch;
  T* bq = scratch + C;
  int64_t seen = 0;
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    const int64_t b1 = std::min(r1, b0 + kRowBlock);
    std::fill(bm, bm + 2 * C, T(0));
    for_each_row_group<scalar_t>(C, b0, b1, [&](auto rows, int64_t r, int64_t c, int64_t n) {
      auto acc = Vec<scalar_t>::loadu(bm + c, n);
      for (int j = 0; j < decltype(rows)::value; ++j) acc += load_acc(x_p + (r + j) * C + c, n);
      acc.store(bm + c, n);
    });
    const Vec<scalar_t> inv_len(T(1) / static_cast<T>(b1 - b0));
    for_each_vec<scalar_t>(C, [&](int64_t c, int64_t n) {
      (Vec<scalar_t>::loadu(bm + c, n) * inv_len).store(bm + c, n);
    });
    for_each_row_group<scalar_t>(C, b0, b1, [&](auto rows, int64_t r, int64_t c, int64_t n) {
      const auto m = Vec<scalar_t>::loadu(bm + c, n);
      auto acc = Vec<scalar_t>::loadu(bq + c, n);
      for (int j = 0; j < decltype(rows)::value; ++j) {
        const auto d = load_acc(x_p + (r + j) * C + c, n) - m;
        acc = at::vec::fmadd(d, d, acc);
      }
      acc.store(bq + c, n);
    });
    cpu::merge_partials<T>(out_mean, out_m2, bm, bq, C, seen, b1 - b0);
    seen += b1 - b0;
  }
}

// Per-chunk (mean, m2) of each of the C columns of `rows` rows at x_p.
template <typename scalar_t>
ChannelParts<acc_t<scalar_t>> channels_last_parts(const scalar_t* x_p, int64_t C, int64_t rows) {
  using T = acc_t<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t per_chunk = rows_per_chunk(C, sizeof(scalar_t));
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  ChannelParts<T> parts(chunks, C);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t r0 = ch * per_chunk;
      const int64_t r1 = std::min(rows, r0 + per_chunk);
      parts.count[ch] = r1 - r0;
      if (wide_rows<scalar_t>(C)) {
        std::vector<T> scratch(2 * C);
        stats_wide_rows(x_p, C, r0, r1, parts.mean.data() + ch * C, parts.m2.data() + ch * C,
                        scratch.data());
        continue;
      }
      for_each_tile<scalar_t>(C, [&](int64_t c0, const int64_t* counts) {
        Vec<scalar_t> m[kTileVecs], q[kTileVecs], bm[kTileVecs], bq[kTileVecs];
        for (int j = 0; j < kTileVecs; ++j) m[j] = q[j] = Vec<scalar_t>(T(0));
        int64_t seen = 0;
        for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
          const int64_t b1 = std::min(r1, b0 + kRowBlock);
          for (int j = 0; j < kTileVecs; ++j) bm[j] = bq[j] = Vec<scalar_t>(T(0));
          for (int64_t r = b0; r < b1; ++r) {
            for (int j = 0; j < kTileVecs; ++j)
              bm[j] += load_acc(x_p + r * C + c0 + j * L, counts[j]);
          }
          const Vec<scalar_t> inv_len(T(1) / static_cast<T>(b1 - b0));
          for (int j = 0; j < kTileVecs; ++j) bm[j] = bm[j] * inv_len;
          for (int64_t r = b0; r < b1; ++r) {
            for (int j = 0; j < kTileVecs; ++j) {
              const auto d = load_acc(x_p + r * C + c0 + j * L, counts[j]) - bm[j];
              bq[j] = at::vec::fmadd(d, d, bq[j]);
            }
          }
          // Every lane has seen the same rows: scalar merge weights.
          cpu::merge_partials<T>(m, q, bm, bq, kTileVecs, seen, b1 - b0);
          seen += b1 - b0;
        }
        for (int j = 0; j < kTileVecs; ++j) {
          if (counts[j] == 0) continue;
          m[j].store(parts.mean.data() + ch * C + c0 + j * L, counts[j]);
          q[j].store(parts.m2.data() + ch * C + c0 + j * L, counts[j]);
        }
      });
    }
  });
  return parts;
}

template <typename scalar_t>
void stats_channels_last(const Tensor& x, const ChannelView& v, Tensor& mean, Tensor& var) {
  write_stats(channels_last_parts(x.const_data_ptr<scalar_t>(), v.C, v.rows()), v.C, mean, var);
}

// --------------------------------------------------------------- tiny planes
// Channels-first planes shorter than a cache line (BatchNorm1d on (N, C, 3), a
// 4x4 map) cost more in per-plane overhead than in data. Each image's C * S
// values are then read as one channels-last row of C * S "virtual channels"
// (virtual channel c * S + s is position s of channel c), reduced by the
// channels-last kernels, and a channel's S virtual channels merged in order.
// (Measured, fwd+bwd: (256, 64, 3) float32 0.167 -> 0.064 ms, (32, 2048, 2, 2)
// 0.55 -> 0.21 ms, (128, 512, 4, 4) bfloat16 0.54 -> 0.38 ms; float32 planes
// of 25 values were 15% slower this way, bfloat16 ones of 24-31 faster.)

template <typename scalar_t>
bool tiny_planes(const ChannelView& v) {
  return v.layout == Layout::kChannelsFirst && v.S * static_cast<int64_t>(sizeof(scalar_t)) < 64;
}

// Per-chunk parts of virtual channels, chunk-major with C * S columns, as the
// parts of the C real channels: part (chunk, s) of channel c.
template <typename T>
std::vector<T> real_channel_parts(const std::vector<T>& virtual_parts, int64_t chunks, int64_t C,
                                  int64_t S) {
  std::vector<T> out(virtual_parts.size());
  for (int64_t ch = 0; ch < chunks; ++ch) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t s = 0; s < S; ++s) {
        out[(ch * S + s) * C + c] = virtual_parts[(ch * C + c) * S + s];
      }
    }
  }
  return out;
}

template <typename scalar_t>
void stats_tiny_planes(const Tensor& x, const ChannelView& v, Tensor& mean, Tensor& var) {
  using T = acc_t<scalar_t>;
  const auto vparts = channels_last_parts(x.const_data_ptr<scalar_t>(), v.C * v.S, v.N);
  const auto chunks = static_cast<int64_t>(vparts.count.size());
  ChannelParts<T> parts(chunks * v.S, v.C);
  parts.mean = real_channel_parts(vparts.mean, chunks, v.C, v.S);
  parts.m2 = real_channel_parts(vparts.m2, chunks, v.C, v.S);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    std::fill_n(parts.count.begin() + ch * v.S, v.S, vparts.count[ch]);
  }
  write_stats(parts, v.C, mean, var);
}

// Each of the C values of v repeated S times: per-channel coefficients for
// the virtual channels.
template <typename T>
std::vector<T> repeat_each(const T* v, int64_t C, int64_t S) {
  std::vector<T> out(C * S);
  for (int64_t c = 0; c < C; ++c) std::fill_n(out.begin() + c * S, S, v[c]);
  return out;
}

// ---------------------------------------------------------------- narrow rows
// Channels-last rows narrower than a cache line ((N, 3) features, a 3-channel
// channels_last image) fill a few lanes of each vector and pay a row's
// overhead for a handful of values. Groups of R consecutive rows are then read
// as rows of R * C virtual channels (virtual channel j * C + c is channel c of
// the group's j-th row). Chunk-major, a chunk's virtual parts are R parts of
// the real channels in row order, so they merge as they are; rows after the
// last whole group are reduced as ordinary rows, as one more part.

// Rows per group: whole vectors of virtual channels, at least four of them;
// 1 where rows are not narrow.
template <typename scalar_t>
int64_t narrow_row_group(const ChannelView& v) {
  constexpr int64_t L = kLanes<scalar_t>;
  if (v.layout != Layout::kChannelsLast || v.C * static_cast<int64_t>(sizeof(scalar_t)) >= 64) {
    return 1;
  }
  const int64_t unit = L / std::gcd(v.C, L);
  int64_t R = unit;
  while (R * v.C < 4 * L) R += unit;
  return R;
}

// The C values of v, R times over: per-channel coefficients for a group.
template <typename T>
std::vector<T> repeat_whole(const T* v, int64_t C, int64_t R) {
  std::vector<T> out(C * R);
  for (int64_t j = 0; j < R; ++j) std::copy(v, v + C, out.begin() + j * C);
  return out;
}

template <typename T>
void append(std::vector<T>& to, const std::vector<T>& from) {
  to.insert(to.end(), from.begin(), from.end());
}

template <typename scalar_t>
void stats_narrow_rows(const Tensor& x, const ChannelView& v, int64_t R, Tensor& mean,
                       Tensor& var) {
  using T = acc_t<scalar_t>;
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const int64_t groups = v.rows() / R;
  const int64_t tail = v.rows() - groups * R;
  ChannelParts<T> parts(0, v.C);
  if (groups > 0) {
    const auto vp = channels_last_parts(x_p, R * v.C, groups);
    parts.mean = vp.mean;
    parts.m2 = vp.m2;
    for (const int64_t n : vp.count) parts.count.insert(parts.count.end(), R, n);
  }
  if (tail > 0) {
    const auto tp = channels_last_parts(x_p + groups * R * v.C, v.C, tail);
    append(parts.mean, tp.mean);
    append(parts.m2, tp.m2);
    append(parts.count, tp.count);
  }
  write_stats(parts, v.C, mean, var);
}

// ------------------------------------------------- backward reduce (two sums)

// Sums each channel's parts in part order (the loop over channels vectorises).
template <typename T>
void write_sums(const std::vector<T>& sum_dy_parts, const std::vector<T>& sum_dyx_parts, int64_t C,
                int64_t parts_per_channel, Tensor& sum_dy, Tensor& sum_dy_xmu) {
  T* a_p = sum_dy.mutable_data_ptr<T>();
  T* b_p = sum_dy_xmu.mutable_data_ptr<T>();
  at::parallel_for(0, C, grain_for(parts_per_channel), [&](int64_t c0, int64_t c1) {
    for (int64_t j = 0; j < parts_per_channel; ++j) {
      const T* pa = sum_dy_parts.data() + j * C;
      const T* pb = sum_dyx_parts.data() + j * C;
      for (int64_t c = c0; c < c1; ++c) {
        a_p[c] += pa[c];
        b_p[c] += pb[c];
      }
    }
  });
}

// sum(dy) and sum(dy * (x - mean)) over one plane of S contiguous values, in
// one sweep: each vector of dy is loaded (and widened) once for both sums.
// Two accumulators per sum hide the add latency.
template <typename scalar_t>
std::pair<acc_t<scalar_t>, acc_t<scalar_t>> plane_sums(const scalar_t* g, const scalar_t* x,
                                                       int64_t S, acc_t<scalar_t> mean) {
  using T = acc_t<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  const Vec<scalar_t> vm(mean);
  Vec<scalar_t> a0(T(0)), a1(T(0)), b0(T(0)), b1(T(0));
  int64_t j = 0;
  for (; j + 2 * L <= S; j += 2 * L) {
    // dy and x in the same lane order: their products pair up.
    const auto [g0, g1] = cpu::load_acc2_any_order(g + j);
    const auto [x0, x1] = cpu::load_acc2_any_order(x + j);
    a0 += g0;
    a1 += g1;
    b0 = at::vec::fmadd(g0, x0 - vm, b0);
    b1 = at::vec::fmadd(g1, x1 - vm, b1);
  }
  if (j < S) {  // up to two partial vectors; padding lanes load zeros
    const int64_t n0 = std::min(L, S - j);
    const auto g0 = load_acc(g + j, n0);
    a0 += g0;
    b0 = at::vec::fmadd(g0, load_acc(x + j, n0) - vm, b0);
    if (S - j > L) {
      const auto g1 = load_acc(g + j + L, S - j - L);
      a1 += g1;
      b1 = at::vec::fmadd(g1, load_acc(x + j + L, S - j - L) - vm, b1);
    }
  }
  return {hsum<scalar_t>(a0 + a1), hsum<scalar_t>(b0 + b1)};
}

template <typename scalar_t>
void reduce_channels_first(const Tensor& dy, const Tensor& x, const ChannelView& v,
                           const Tensor& mean, Tensor& sum_dy, Tensor& sum_dy_xmu) {
  using T = acc_t<scalar_t>;
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const scalar_t* g_p = dy.const_data_ptr<scalar_t>();
  const T* mean_p = mean.const_data_ptr<T>();
  std::vector<T> part_dy(v.N * v.C);
  std::vector<T> part_dyx(v.N * v.C);
  at::parallel_for(0, v.N * v.C, grain_for(v.S), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::tie(part_dy[i], part_dyx[i]) =
          plane_sums(g_p + i * v.S, x_p + i * v.S, v.S, mean_p[i % v.C]);
    }
  });
  write_sums(part_dy, part_dyx, v.C, v.N, sum_dy, sum_dy_xmu);
}

// sum(dy) and sum(dy * (x - mean)) of wide rows [r0, r1), per channel, added
// into a and b (zeroed by the caller).
template <typename scalar_t>
BNEXT_FLATTEN void sums_wide_rows(const scalar_t* g_p, const scalar_t* x_p,
                                  const acc_t<scalar_t>* mean_p, int64_t C, int64_t r0, int64_t r1,
                                  acc_t<scalar_t>* a, acc_t<scalar_t>* b) {
  for_each_row_group<scalar_t>(C, r0, r1, [&](auto rows, int64_t r, int64_t c, int64_t n) {
    const auto m = Vec<scalar_t>::loadu(mean_p + c, n);
    auto sa = Vec<scalar_t>::loadu(a + c, n);
    auto sb = Vec<scalar_t>::loadu(b + c, n);
    for (int j = 0; j < decltype(rows)::value; ++j) {
      const auto g = load_acc(g_p + (r + j) * C + c, n);
      sa += g;
      sb = at::vec::fmadd(g, load_acc(x_p + (r + j) * C + c, n) - m, sb);
    }
    sa.store(a + c, n);
    sb.store(b + c, n);
  });
}

// Per-chunk sum(dy) and sum(dy * (x - mean)) of each of the C columns of
// `rows` rows, chunk-major; returns the number of chunks.
template <typename scalar_t>
int64_t channels_last_sums(const scalar_t* g_p, const scalar_t* x_p, const acc_t<scalar_t>* mean_p,
                           int64_t C, int64_t rows, std::vector<acc_t<scalar_t>>& part_dy,
                           std::vector<acc_t<scalar_t>>& part_dyx) {
  using T = acc_t<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t per_chunk = rows_per_chunk(C, 2 * sizeof(scalar_t));  // dy and x
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  part_dy.assign(chunks * C, T(0));
  part_dyx.assign(chunks * C, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t r0 = ch * per_chunk;
      const int64_t r1 = std::min(rows, r0 + per_chunk);
      if (wide_rows<scalar_t>(C)) {
        sums_wide_rows(g_p, x_p, mean_p, C, r0, r1, part_dy.data() + ch * C,
                       part_dyx.data() + ch * C);
        continue;
      }
      for_each_tile<scalar_t>(C, [&](int64_t c0, const int64_t* counts) {
        Vec<scalar_t> a[kTileVecs], b[kTileVecs], mv[kTileVecs];
        for (int j = 0; j < kTileVecs; ++j) {
          a[j] = b[j] = Vec<scalar_t>(T(0));
          mv[j] = Vec<scalar_t>::loadu(mean_p + c0 + j * L, counts[j]);
        }
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = r * C + c0;
          for (int j = 0; j < kTileVecs; ++j) {
            const auto g = load_acc(g_p + off + j * L, counts[j]);
            a[j] += g;
            b[j] = at::vec::fmadd(g, load_acc(x_p + off + j * L, counts[j]) - mv[j], b[j]);
          }
        }
        for (int j = 0; j < kTileVecs; ++j) {
          a[j].store(part_dy.data() + ch * C + c0 + j * L, counts[j]);
          b[j].store(part_dyx.data() + ch * C + c0 + j * L, counts[j]);
        }
      });
    }
  });
  return chunks;
}

template <typename scalar_t>
void reduce_channels_last(const Tensor& dy, const Tensor& x, const ChannelView& v,
                          const Tensor& mean, Tensor& sum_dy, Tensor& sum_dy_xmu) {
  std::vector<acc_t<scalar_t>> part_dy, part_dyx;
  const int64_t chunks =
      channels_last_sums(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                         mean.const_data_ptr<acc_t<scalar_t>>(), v.C, v.rows(), part_dy, part_dyx);
  write_sums(part_dy, part_dyx, v.C, chunks, sum_dy, sum_dy_xmu);
}

template <typename scalar_t>
void reduce_narrow_rows(const Tensor& dy, const Tensor& x, const ChannelView& v, int64_t R,
                        const Tensor& mean, Tensor& sum_dy, Tensor& sum_dy_xmu) {
  using T = acc_t<scalar_t>;
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const scalar_t* g_p = dy.const_data_ptr<scalar_t>();
  const T* mean_p = mean.const_data_ptr<T>();
  const int64_t groups = v.rows() / R;
  const int64_t tail = v.rows() - groups * R;
  std::vector<T> part_dy, part_dyx;
  int64_t parts = 0;
  if (groups > 0) {
    const auto vmean = repeat_whole(mean_p, v.C, R);
    parts += R * channels_last_sums(g_p, x_p, vmean.data(), R * v.C, groups, part_dy, part_dyx);
  }
  if (tail > 0) {
    std::vector<T> tail_dy, tail_dyx;
    const int64_t off = groups * R * v.C;
    parts += channels_last_sums(g_p + off, x_p + off, mean_p, v.C, tail, tail_dy, tail_dyx);
    append(part_dy, tail_dy);
    append(part_dyx, tail_dyx);
  }
  write_sums(part_dy, part_dyx, v.C, parts, sum_dy, sum_dy_xmu);
}

template <typename scalar_t>
void reduce_tiny_planes(const Tensor& dy, const Tensor& x, const ChannelView& v, const Tensor& mean,
                        Tensor& sum_dy, Tensor& sum_dy_xmu) {
  using T = acc_t<scalar_t>;
  const auto vmean = repeat_each(mean.const_data_ptr<T>(), v.C, v.S);
  std::vector<T> part_dy, part_dyx;
  const int64_t chunks =
      channels_last_sums(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), vmean.data(),
                         v.C * v.S, v.N, part_dy, part_dyx);
  write_sums(real_channel_parts(part_dy, chunks, v.C, v.S),
             real_channel_parts(part_dyx, chunks, v.C, v.S), v.C, chunks * v.S, sum_dy, sum_dy_xmu);
}

// ------------------------------------------- elementwise: a*g + k*(x-mean) + c
// The forward pass is the same map without g: y = scale * (x - mean) + shift.

// out = a * g + k * (x - mean) + c over one plane of S contiguous values;
// `stream`: with non-temporal stores (cpu_vec.h), from the first aligned element.
template <typename scalar_t, bool kWithGrad>
void affine_plane(const scalar_t* g, const scalar_t* x, scalar_t* out, int64_t S,
                  acc_t<scalar_t> mean, acc_t<scalar_t> a, acc_t<scalar_t> k, acc_t<scalar_t> c,
                  bool stream) {
  using T = acc_t<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  const Vec<scalar_t> vm(mean), va(a), vk(k), vc(c);
  const auto f = [&](const Vec<scalar_t>& xv) { return at::vec::fmadd(xv - vm, vk, vc); };
  const auto one = [&](int64_t j) {
    // The vector path's fused multiply-adds, so that where a plane splits
    // into scalar and vector parts changes no bit.
    T y = std::fma(static_cast<T>(x[j]) - mean, k, c);
    if constexpr (kWithGrad) y = std::fma(static_cast<T>(g[j]), a, y);
    out[j] = static_cast<scalar_t>(y);
  };
  const auto two = [&](int64_t j) {
    auto [x0, x1] = load_acc2(x + j);
    auto y0 = f(x0);
    auto y1 = f(x1);
    if constexpr (kWithGrad) {
      const auto [g0, g1] = load_acc2(g + j);
      y0 = at::vec::fmadd(g0, va, y0);
      y1 = at::vec::fmadd(g1, va, y1);
    }
    return std::pair{y0, y1};
  };
  int64_t j = 0;
  if (stream) {
    for (const int64_t head = std::min(S, stream_head(out)); j < head; ++j) one(j);
    for (; j + 2 * L <= S; j += 2 * L) {
      const auto [y0, y1] = two(j);
      stream_acc2(out + j, y0, y1);
    }
  } else {
    for (; j + 2 * L <= S; j += 2 * L) {
      const auto [y0, y1] = two(j);
      store_acc2(out + j, y0, y1);
    }
  }
  // The rest as (at most two) vectors, the last one partial.
  for (; j < S; j += L) {
    const int64_t n = std::min(L, S - j);
    auto y = f(load_acc(x + j, n));
    if constexpr (kWithGrad) y = at::vec::fmadd(load_acc(g + j, n), va, y);
    store_acc(out + j, y, n);
  }
}

template <typename scalar_t, bool kWithGrad>
void affine_channels_first(const scalar_t* g_p, const Tensor& x, const ChannelView& v,
                           const Tensor& mean, const acc_t<scalar_t>* a_p, const Tensor& k,
                           const Tensor& c_, Tensor& out) {
  using T = acc_t<scalar_t>;
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
  const T* mean_p = mean.const_data_ptr<T>();
  const T* k_p = k.const_data_ptr<T>();
  const T* c_p = c_.const_data_ptr<T>();
  const int64_t S = v.S;
  const bool stream = should_stream(out);
  at::parallel_for(0, v.N * v.C, grain_for(S), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ch = i % v.C;
      affine_plane<scalar_t, kWithGrad>(kWithGrad ? g_p + i * S : nullptr, x_p + i * S, o_p + i * S,
                                        S, mean_p[ch], kWithGrad ? a_p[ch] : T(0), k_p[ch], c_p[ch],
                                        stream);
    }
    if (stream) stream_fence();
  });
}

// Rows [begin, end) of the channels-last map. Pointers and sizes arrive as
// scalars by value and every call in here is inlined (BNEXT_FLATTEN): left as
// references to the caller's frame they were reloaded after every vector
// store, since vector types may alias anything.
template <typename scalar_t, bool kWithGrad>
BNEXT_FLATTEN void affine_rows(const scalar_t* g_p, const scalar_t* x_p, scalar_t* o_p,
                               const acc_t<scalar_t>* mean_p, const acc_t<scalar_t>* a_p,
                               const acc_t<scalar_t>* k_p, const acc_t<scalar_t>* c_p, int64_t C,
                               int64_t begin, int64_t end, bool stream) {
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t vec_end = C - C % L;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* xr = x_p + r * C;
    scalar_t* orow = o_p + r * C;
    const scalar_t* gr = kWithGrad ? g_p + r * C : nullptr;
    // y for the channels [c, c + L) given their values.
    const auto f = [&](int64_t c, const Vec<scalar_t>& xv) {
      return at::vec::fmadd(xv - Vec<scalar_t>::loadu(mean_p + c), Vec<scalar_t>::loadu(k_p + c),
                            Vec<scalar_t>::loadu(c_p + c));
    };
    int64_t c = 0;
    for (; c + 2 * L <= vec_end; c += 2 * L) {
      auto [x0, x1] = load_acc2(xr + c);
      auto y0 = f(c, x0);
      auto y1 = f(c + L, x1);
      if constexpr (kWithGrad) {
        const auto [g0, g1] = load_acc2(gr + c);
        y0 = at::vec::fmadd(g0, Vec<scalar_t>::loadu(a_p + c), y0);
        y1 = at::vec::fmadd(g1, Vec<scalar_t>::loadu(a_p + c + L), y1);
      }
      if (stream) {
        stream_acc2(orow + c, y0, y1);
      } else {
        store_acc2(orow + c, y0, y1);
      }
    }
    for (; c < vec_end; c += L) {
      auto y = f(c, load_acc(xr + c));
      if constexpr (kWithGrad)
        y = at::vec::fmadd(load_acc(gr + c), Vec<scalar_t>::loadu(a_p + c), y);
      store_acc(orow + c, y);
    }
    if (c < C) {  // the last C - c channels, as one partial vector
      const int64_t n = C - c;
      auto y = at::vec::fmadd(load_acc(xr + c, n) - Vec<scalar_t>::loadu(mean_p + c, n),
                              Vec<scalar_t>::loadu(k_p + c, n), Vec<scalar_t>::loadu(c_p + c, n));
      if constexpr (kWithGrad) {
        y = at::vec::fmadd(load_acc(gr + c, n), Vec<scalar_t>::loadu(a_p + c, n), y);
      }
      store_acc(orow + c, y, n);
    }
  }
  if (stream) stream_fence();
}

// Rows of C values (C * S virtual channels for tiny planes), per-channel
// vectors of C values.
template <typename scalar_t, bool kWithGrad>
void affine_rows_parallel(const scalar_t* g_p, const scalar_t* x_p, scalar_t* o_p,
                          const Tensor& out, const acc_t<scalar_t>* mean_p,
                          const acc_t<scalar_t>* a_p, const acc_t<scalar_t>* k_p,
                          const acc_t<scalar_t>* c_p, int64_t C, int64_t rows) {
  // Streaming needs every row to start aligned.
  const bool stream = should_stream(out) && stream_head(o_p) == 0 &&
                      (C * static_cast<int64_t>(sizeof(scalar_t))) % cpu::kStreamAlign == 0;
  at::parallel_for(0, rows, grain_for(C), [=](int64_t begin, int64_t end) {
    affine_rows<scalar_t, kWithGrad>(g_p, x_p, o_p, mean_p, a_p, k_p, c_p, C, begin, end, stream);
  });
}

template <bool kWithGrad>
Tensor affine(const Tensor& g, const Tensor& x, const Tensor& mean, const Tensor& a,
              const Tensor& k, const Tensor& c_) {
  Tensor out = empty_same_layout(x, x.scalar_type());
  if (x.numel() == 0) return out;
  const ChannelView v = channel_view(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_affine", [&] {
    using T = acc_t<scalar_t>;
    const scalar_t* g_p = kWithGrad ? g.const_data_ptr<scalar_t>() : nullptr;
    const T* a_p = kWithGrad ? a.const_data_ptr<T>() : nullptr;
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
    const T* mean_p = mean.const_data_ptr<T>();
    const T* k_p = k.const_data_ptr<T>();
    const T* c_p = c_.const_data_ptr<T>();
    // rows of `width` virtual channels whose per-channel vectors are
    // expand(p) for each real one.
    const auto virtual_rows = [&](int64_t width, int64_t rows, const auto& expand) {
      const auto vm = expand(mean_p);
      const auto vk = expand(k_p);
      const auto vc = expand(c_p);
      const auto va = kWithGrad ? expand(a_p) : std::vector<T>();
      affine_rows_parallel<scalar_t, kWithGrad>(g_p, x_p, o_p, out, vm.data(), va.data(), vk.data(),
                                                vc.data(), width, rows);
    };
    if (tiny_planes<scalar_t>(v)) {
      virtual_rows(v.C * v.S, v.N, [&](const T* p) { return repeat_each(p, v.C, v.S); });
    } else if (v.layout == Layout::kChannelsFirst) {
      affine_channels_first<scalar_t, kWithGrad>(g_p, x, v, mean, a_p, k, c_, out);
    } else if (const int64_t R = narrow_row_group<scalar_t>(v); R > 1) {
      const int64_t groups = v.rows() / R;
      virtual_rows(R * v.C, groups, [&](const T* p) { return repeat_whole(p, v.C, R); });
      const int64_t off = groups * R * v.C;  // the rows after the last group
      affine_rows_parallel<scalar_t, kWithGrad>(kWithGrad ? g_p + off : nullptr, x_p + off,
                                                o_p + off, out, mean_p, a_p, k_p, c_p, v.C,
                                                v.rows() - groups * R);
    } else {
      affine_rows_parallel<scalar_t, kWithGrad>(g_p, x_p, o_p, out, mean_p, a_p, k_p, c_p, v.C,
                                                v.rows());
    }
  });
  return out;
}

}  // namespace

// ------------------------------------------------------------------- backend

std::tuple<Tensor, Tensor> CpuBackend::stats(const Tensor& x) {
  const auto opmath = opmath_dtype(x.scalar_type());
  Tensor mean = at::zeros({x.size(1)}, x.options().dtype(opmath));
  Tensor var = at::zeros({x.size(1)}, x.options().dtype(opmath));
  if (x.numel() == 0) return {mean, var};
  const ChannelView v = channel_view(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_stats", [&] {
    if (tiny_planes<scalar_t>(v)) {
      stats_tiny_planes<scalar_t>(x, v, mean, var);
    } else if (v.layout == Layout::kChannelsFirst) {
      stats_channels_first<scalar_t>(x, v, mean, var);
    } else if (const int64_t R = narrow_row_group<scalar_t>(v); R > 1) {
      stats_narrow_rows<scalar_t>(x, v, R, mean, var);
    } else {
      stats_channels_last<scalar_t>(x, v, mean, var);
    }
  });
  return {mean, var};
}

Tensor CpuBackend::elemt(const Tensor& x, const Tensor& mean, const Tensor& scale,
                         const Tensor& shift) {
  return affine<false>(Tensor(), x, mean, Tensor(), scale, shift);
}

std::tuple<Tensor, Tensor> CpuBackend::backward_reduce(const Tensor& dy, const Tensor& x,
                                                       const Tensor& mean) {
  Tensor sum_dy = at::zeros({x.size(1)}, mean.options());
  Tensor sum_dy_xmu = at::zeros({x.size(1)}, mean.options());
  if (x.numel() == 0) return {sum_dy, sum_dy_xmu};
  const ChannelView v = channel_view(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_reduce", [&] {
    if (tiny_planes<scalar_t>(v)) {
      reduce_tiny_planes<scalar_t>(dy, x, v, mean, sum_dy, sum_dy_xmu);
    } else if (v.layout == Layout::kChannelsFirst) {
      reduce_channels_first<scalar_t>(dy, x, v, mean, sum_dy, sum_dy_xmu);
    } else if (const int64_t R = narrow_row_group<scalar_t>(v); R > 1) {
      reduce_narrow_rows<scalar_t>(dy, x, v, R, mean, sum_dy, sum_dy_xmu);
    } else {
      reduce_channels_last<scalar_t>(dy, x, v, mean, sum_dy, sum_dy_xmu);
    }
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor CpuBackend::backward_elemt(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                  const Tensor& a, const Tensor& k, const Tensor& c) {
  return affine<true>(dy, x, mean, a, k, c);
}

TORCH_LIBRARY_IMPL(bnext, CPU, m) { register_kernels<CpuBackend>(m); }

}  // namespace batch_norm
}  // namespace bnext
