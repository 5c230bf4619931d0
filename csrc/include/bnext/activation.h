// The activations fused into Batch Norm's elementwise passes (batch_norm_act
// operators), written once for the CPU kernels (over at::vec::Vectorized, see
// cpu_activation.h) and the CUDA kernels (over float/double): every function
// is a template over a math policy M that supplies the value type M::V and the
// few primitives they need. Forward values and derivatives follow ATen's own
// formulas (and its choice at the kinks: relu'(0) = 0, elu'(0) = alpha,
// hardswish'(3) = 1.5), so that fused and unfused gradients agree.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace bnext {
namespace act {

// The order is the wire format of the activation argument in no schema (they
// take names, see parse_activation in batch_norm_act/checks.h); append only.
enum class Kind : int8_t {
  kIdentity,
  kRelu,
  kLeakyRelu,  // param: negative_slope
  kElu,        // param: alpha
  kSilu,
  kGelu,      // erf form (approximate="none")
  kGeluTanh,  // approximate="tanh"
  kHardswish,
  kRelu6,
};

template <Kind K>
using KindTag = std::integral_constant<Kind, K>;

// Runs f(KindTag<K>{}) for the runtime kind k, so that kernels are
// instantiated per activation and carry no switch in their inner loops.
template <class F>
decltype(auto) dispatch(Kind k, F&& f) {
  switch (k) {
    case Kind::kRelu:
      return f(KindTag<Kind::kRelu>{});
    case Kind::kLeakyRelu:
      return f(KindTag<Kind::kLeakyRelu>{});
    case Kind::kElu:
      return f(KindTag<Kind::kElu>{});
    case Kind::kSilu:
      return f(KindTag<Kind::kSilu>{});
    case Kind::kGelu:
      return f(KindTag<Kind::kGelu>{});
    case Kind::kGeluTanh:
      return f(KindTag<Kind::kGeluTanh>{});
    case Kind::kHardswish:
      return f(KindTag<Kind::kHardswish>{});
    case Kind::kRelu6:
      return f(KindTag<Kind::kRelu6>{});
    case Kind::kIdentity:
      break;
  }
  return f(KindTag<Kind::kIdentity>{});
}

// In-place mode recomputes the activation's input from its output, so it
// needs a bijection: identity, leaky_relu with a positive slope, elu with a
// positive alpha.
C10_HOST_DEVICE inline bool invertible(Kind k, double param) {
  return k == Kind::kIdentity || ((k == Kind::kLeakyRelu || k == Kind::kElu) && param > 0);
}

// Piecewise linear activations whose derivative the output alone gives
// (relu's and relu6's too, though they are not invertible): a layer with a
// residual keeps its output for backward, which the next layer keeps anyway,
// instead of the residual.
C10_HOST_DEVICE inline bool piecewise_linear(Kind k, double param) {
  return k == Kind::kIdentity || k == Kind::kRelu || k == Kind::kRelu6 ||
         (k == Kind::kLeakyRelu && param >= 0);
}

// The scalar policy (CUDA kernels, and scalar tails on the CPU).
template <typename T>
struct ScalarMath {
  using V = T;
  C10_HOST_DEVICE static V splat(T v) { return v; }
  C10_HOST_DEVICE static V exp(V v) { return std::exp(v); }
  C10_HOST_DEVICE static V exp_in_derivative(V v) { return std::exp(v); }
  C10_HOST_DEVICE static V expm1(V v) { return std::expm1(v); }
  C10_HOST_DEVICE static V log1p(V v) { return std::log1p(v); }
  C10_HOST_DEVICE static V erf(V v) { return std::erf(v); }
  C10_HOST_DEVICE static V tanh(V v) { return std::tanh(v); }
  // a > b ? then : otherwise (false for NaN, as ATen's comparisons).
  C10_HOST_DEVICE static V if_gt(V a, V b, V then, V otherwise) { return a > b ? then : otherwise; }
};

// Constants of ATen's GELU (aten/src/ATen/native/cpu/Activation.cpp).
template <typename T>
struct GeluConstants {
  static constexpr double kSqrt1_2 = 0.70710678118654752440;
  // 1 / sqrt(2 * pi): the normal density's factor.
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  // sqrt(2 / pi), the tanh approximation's scale, and its cubic coefficient.
  static constexpr double kTanhBeta = 0.79788456080286535588;
  static constexpr double kTanhKappa = 0.044715;
};

// act(u).
template <class M, Kind K>
C10_HOST_DEVICE inline typename M::V forward(KindTag<K>, typename M::V u, typename M::V param) {
  using V = typename M::V;
  const V zero = M::splat(0);
  const V one = M::splat(1);
  if constexpr (K == Kind::kIdentity) {
    return u;
  } else if constexpr (K == Kind::kRelu) {
    return M::if_gt(u, zero, u, zero);
  } else if constexpr (K == Kind::kLeakyRelu) {
    return M::if_gt(u, zero, u, u * param);
  } else if constexpr (K == Kind::kElu) {
    return M::if_gt(u, zero, u, param * M::expm1(u));
  } else if constexpr (K == Kind::kSilu) {
    return u / (one + M::exp(zero - u));
  } else if constexpr (K == Kind::kGelu) {
    using G = GeluConstants<V>;
    return u * M::splat(0.5) * (one + M::erf(u * M::splat(G::kSqrt1_2)));
  } else if constexpr (K == Kind::kGeluTanh) {
    using G = GeluConstants<V>;
    const V inner = M::splat(G::kTanhBeta) * (u + M::splat(G::kTanhKappa) * u * u * u);
    return M::splat(0.5) * u * (one + M::tanh(inner));
  } else if constexpr (K == Kind::kHardswish) {
    // ATen: x <= -3 ? 0 : x >= 3 ? x : x * (x + 3) / 6.
    const V three = M::splat(3);
    return M::if_gt(u, M::splat(-3), M::if_gt(three, u, u * (u + three) / M::splat(6), u), zero);
  } else {
    static_assert(K == Kind::kRelu6, "unhandled activation");
    const V six = M::splat(6);
    return M::if_gt(u, zero, M::if_gt(u, six, six, u), zero);
  }
}

// act'(u): the factor that turns the gradient of act(u) into that of u. Its
// exponentials are M::exp_in_derivative: a policy may trade an ulp or two
// there for speed (the fused backward evaluates act' in both of its passes).
template <class M, Kind K>
C10_HOST_DEVICE inline typename M::V derivative(KindTag<K>, typename M::V u, typename M::V param) {
  using V = typename M::V;
  const V zero = M::splat(0);
  const V one = M::splat(1);
  if constexpr (K == Kind::kIdentity) {
    return one;
  } else if constexpr (K == Kind::kRelu) {
    return M::if_gt(u, zero, one, zero);
  } else if constexpr (K == Kind::kLeakyRelu) {
    return M::if_gt(u, zero, one, param);
  } else if constexpr (K == Kind::kElu) {
    return M::if_gt(u, zero, one, param * M::exp_in_derivative(u));
  } else if constexpr (K == Kind::kSilu) {
    const V s = one / (one + M::exp_in_derivative(zero - u));
    return s * (one + u * (one - s));
  } else if constexpr (K == Kind::kGelu) {
    using G = GeluConstants<V>;
    const V cdf = M::splat(0.5) * (one + M::erf(u * M::splat(G::kSqrt1_2)));
    const V pdf = M::splat(G::kInvSqrt2Pi) * M::exp_in_derivative(M::splat(-0.5) * u * u);
    return cdf + u * pdf;
  } else if constexpr (K == Kind::kGeluTanh) {
    using G = GeluConstants<V>;
    const V kappa = M::splat(G::kTanhKappa);
    const V beta = M::splat(G::kTanhBeta);
    const V t = M::tanh(beta * (u + kappa * u * u * u));
    const V half = M::splat(0.5);
    return half * (one + t) + half * u * (one - t * t) * beta * (one + M::splat(3) * kappa * u * u);
  } else if constexpr (K == Kind::kHardswish) {
    // ATen: x < -3 ? 0 : x <= 3 ? x / 3 + 0.5 : 1.
    const V three = M::splat(3);
    return M::if_gt(u, three, one, M::if_gt(M::splat(-3), u, zero, u / three + M::splat(0.5)));
  } else {
    static_assert(K == Kind::kRelu6, "unhandled activation");
    // ATen's hardtanh backward: 0 at and beyond both ends.
    return M::if_gt(u, zero, M::if_gt(M::splat(6), u, one, zero), zero);
  }
}

// In-place mode: the activation's input from its output y (invertible kinds
// only: identity, leaky_relu and elu with a positive parameter).
template <class M, Kind K>
C10_HOST_DEVICE inline typename M::V inverse(KindTag<K>, typename M::V y, typename M::V param) {
  using V = typename M::V;
  const V zero = M::splat(0);
  if constexpr (K == Kind::kLeakyRelu) {
    return M::if_gt(y, zero, y, y / param);
  } else if constexpr (K == Kind::kElu) {
    // A half-precision output may round below -alpha, where log1p would be
    // NaN: clamp to the most negative representable input instead.
    const V t = y / param;
    const V floor = M::splat(-0.99999994);
    return M::if_gt(y, zero, y, M::log1p(M::if_gt(t, floor, t, floor)));
  } else {
    static_assert(K == Kind::kIdentity, "in-place mode needs an invertible activation");
    return y;
  }
}

// act'(u) from y = act(u): the invertible kinds and the piecewise linear
// ones (relu's y > 0 iff u > 0, as relu6's 0 < y < 6 iff 0 < u < 6, ATen's
// choices at the kinks included).
template <class M, Kind K>
C10_HOST_DEVICE inline typename M::V derivative_from_output(KindTag<K>, typename M::V y,
                                                            typename M::V param) {
  using V = typename M::V;
  const V zero = M::splat(0);
  const V one = M::splat(1);
  if constexpr (K == Kind::kLeakyRelu) {
    return M::if_gt(y, zero, one, param);
  } else if constexpr (K == Kind::kElu) {
    return M::if_gt(y, zero, one, y + param);  // alpha * exp(u) = y + alpha
  } else if constexpr (K == Kind::kRelu) {
    return M::if_gt(y, zero, one, zero);
  } else if constexpr (K == Kind::kRelu6) {
    return M::if_gt(y, zero, M::if_gt(M::splat(6), y, one, zero), zero);
  } else {
    static_assert(K == Kind::kIdentity, "no derivative from the output for this activation");
    return one;
  }
}

}  // namespace act
}  // namespace bnext
