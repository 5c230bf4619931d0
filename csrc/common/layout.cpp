#include "common/layout.h"

#include <ATen/ops/empty_strided.h>

namespace bnext {
namespace {

// Dense with the channel dimension innermost (channels_last / channels_last_3d
// generalised to any rank). Dimensions of size 1 carry no layout information.
bool is_channels_last_dense(const at::Tensor& x) {
  const auto sizes = x.sizes();
  const auto strides = x.strides();
  const int64_t dims = x.dim();
  int64_t expected = 1;
  if (sizes[1] != 1 && strides[1] != expected) return false;
  expected *= sizes[1];
  for (int64_t d = dims - 1; d >= 2; --d) {
    if (sizes[d] != 1 && strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return sizes[0] == 1 || strides[0] == expected;
}

}  // namespace

at::Tensor canonical(const at::Tensor& x) {
  if (x.is_contiguous() || is_channels_last_dense(x)) return x;
  return x.contiguous();
}

ChannelView channel_view(const at::Tensor& x) {
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  // With a single spatial position both layouts coincide; rows of C values
  // let the kernels vectorise across channels.
  const bool first = S > 1 && x.is_contiguous();
  return {N, C, S, first ? Layout::kChannelsFirst : Layout::kChannelsLast};
}

at::Tensor same_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  at::Tensor out = at::empty_strided(like.sizes(), like.strides(), t.options());
  out.copy_(t);
  return out;
}

at::Tensor empty_same_layout(const at::Tensor& like, at::ScalarType dtype) {
  return at::empty_strided(like.sizes(), like.strides(), like.options().dtype(dtype));
}

}  // namespace bnext
