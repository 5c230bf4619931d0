// How the kernels see an (N, C, *) tensor: N images, C channels, S spatial
// positions, in one of the two dense layouts they have fast paths for.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace bnext {

enum class Layout {
  kChannelsFirst,  // element (n, c, s) at (n * C + c) * S + s
  kChannelsLast,   // element (n, c, s) at (n * S + s) * C + c
};

struct ChannelView {
  int64_t N;
  int64_t C;
  int64_t S;
  Layout layout;
  int64_t rows() const { return N * S; }  // channels-last rows of C values
};

// `x` itself when it is already dense in one of the two layouts (so
// channels_last inputs stay channels_last), otherwise a contiguous copy.
at::Tensor canonical(const at::Tensor& x);

// The view of a tensor returned by canonical().
ChannelView channel_view(const at::Tensor& x);

// `t` (same shape as the canonical `like`) laid out exactly as `like`.
at::Tensor same_layout(const at::Tensor& t, const at::Tensor& like);

// A new uninitialised tensor with the shape and strides of the canonical `like`.
at::Tensor empty_same_layout(const at::Tensor& like, at::ScalarType dtype);

}  // namespace bnext
