// How Batch Norm's CPU kernels walk a canonical tensor (common/layout.h);
// shared by the statistics (cpu_kernels.cpp) and the passes over a functor
// (cpu_passes.h), included by cpu_kernels.cpp only. Two layouts, each with
// its own loop order:
//   channels-first (NCHW): a channel's values come in planes of S contiguous
//     elements; planes are reduced independently and merged per channel.
//   channels-last (NHWC, and (N, C) input): rows of C contiguous channels;
//     vectors run across channels and rows are split into chunks.
// Channels-first planes shorter than a cache line take the channels-last
// kernels over rows of C * S "virtual channels" (see tiny_planes), and
// channels-last rows narrower than a cache line over groups of rows (see
// narrow_row_group).
// The partition into planes/chunks depends on the shape only, never on the
// thread count, so results are bitwise reproducible across thread settings.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/cpu_reduce.h"
#include "common/cpu_vec.h"
#include "common/layout.h"

namespace bnext {
namespace batch_norm {
namespace cpu_kernels {

using cpu::acc_t;
using cpu::kLanes;
using cpu::Vec;

// Channels-last reductions split the rows into chunks (by shape only) that
// stay in L2 while they are swept once per tile of channels; a tile is up to
// kTileVecs vectors of channels whose accumulators live in registers for the
// whole chunk. Lanes past C load zeros and are never stored.
constexpr int64_t kChunkBytes = 256 * 1024;
constexpr int kTileVecs = 4;

inline int64_t rows_per_chunk(int64_t C, int64_t elem_size) {
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

}  // namespace cpu_kernels
}  // namespace batch_norm
}  // namespace bnext
