"""The float32 cases on which the emulator built with FMA contraction
(BNEXT_EMULATOR_FMA=1, tests/emulated_cuda.py) is compared with the default
build and with float64: every norm's forward and backward, through the vector
and the scalar paths. `results(ops, dtype)` runs them with the operators
`ops` (torch.ops.bnext_emu of either build, or torch.ops.bnext for the float64
reference) on inputs drawn in float32 and then cast to `dtype`, so that every
build sees the same rounded values. Run as a script, it saves the results of
this process's emulator build to the file named by its argument."""

import sys

import torch


def _inputs(shape, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 1
    dy = torch.randn(shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    return x, dy


def _params(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)


def results(ops, dtype=torch.float32):
    """{case name: output tensor} of every case, computed by `ops` in `dtype`."""
    out = {}

    def cast(*ts):
        return [t.to(dtype) for t in ts]

    # Batch Norm: NCHW planes of 14x14 (whole vectors), 7x7 (ragged) and NHWC.
    for name, shape, channels_last in [
        ("bn_nchw_14", (8, 65, 14, 14), False),
        ("bn_nchw_7", (8, 127, 7, 7), False),
        ("bn_nhwc", (8, 65, 14, 14), True),
    ]:
        x, dy = cast(*_inputs(shape, channels_last))
        w, b = cast(*_params(shape[1]))
        y, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
        gi, gw, gb = ops.batch_norm_backward(dy, x, mean, var, w, 1e-5, True)
        out.update(
            {
                f"{name}.{k}": v
                for k, v in zip(("y", "mean", "var", "dx", "dw", "db"), (y, mean, var, gi, gw, gb))
            }
        )
        rm, rv = cast(*_params(shape[1], seed=2))
        rv = rv.abs() + 0.5
        y, *_, r, d = ops.batch_renorm_train(x, rm, rv, w, b, 1e-5, 1.5, 0.5)
        out.update({f"{name}.renorm_y": y, f"{name}.renorm_r": r, f"{name}.renorm_d": d})

    # LayerNorm/RMSNorm rows: vector rows of 1024, scalar rows of 127.
    for name, shape in [("ln_1024", (65, 1024)), ("ln_127", (33, 127))]:
        x, dy = cast(*_inputs(shape))
        w, b = cast(*_params(shape[-1]))
        y, mean, rstd = ops.layer_norm_fwd(x, shape[-1:], w, b, 1e-5)
        gi, gw, gb = ops.layer_norm_bwd(dy, x, mean, rstd, w, 1e-5, [True, True])
        out.update(
            {
                f"{name}.{k}": v
                for k, v in zip(
                    ("y", "mean", "rstd", "dx", "dw", "db"), (y, mean, rstd, gi, gw, gb)
                )
            }
        )
        y, rstd = ops.rms_norm_fwd(x, shape[-1:], w, 1e-5)
        gi, gw = ops.rms_norm_bwd(dy, x, rstd, w, 1e-5, True)
        out.update(
            {f"{name}.rms_{k}": v for k, v in zip(("y", "rstd", "dx", "dw"), (y, rstd, gi, gw))}
        )

    # LayerNorm2d over the channels of NCHW and NHWC maps.
    for name, channels_last in [("ln2d_nchw", False), ("ln2d_nhwc", True)]:
        x, dy = cast(*_inputs((4, 65, 7, 7), channels_last))
        w, b = cast(*_params(65))
        y, mean, rstd = ops.layer_norm_2d_fwd(x, w, b, 1e-5)
        gi, gw, gb = ops.layer_norm_2d_bwd(dy, x, mean, rstd, w, 1e-5, [True, True])
        out.update({f"{name}.{k}": v for k, v in zip(("y", "dx", "dw", "db"), (y, gi, gw, gb))})
    return out


if __name__ == "__main__":
    from emulated_cuda import load

    torch.save(results(load()), sys.argv[1])
