"""Outputs too large for the last-level cache are written with streaming
(non-temporal) stores (Batch Norm's elementwise passes, LayerNorm/RMSNorm).
They must not change a single bit: a child process with BNEXT_STREAM_MIN_BYTES=0
streams every output, small ones included, and its results are compared with
this process's cached stores."""

import os
import subprocess
import sys

import pytest
import torch

import torch_bnext
from torch_bnext.testing import assert_close_rel

# Odd plane sizes start most planes unaligned (the streamed part begins after
# a scalar head); channels_last rows stream only when a row is a whole number
# of vectors (C = 32), and C = 5 exercises the fallback.
CONFIGS = [
    ((3, 5, 7, 9), "contiguous"),
    ((2, 3, 64, 64), "contiguous"),
    ((4, 32, 5, 5), "channels_last"),
    ((4, 5, 6, 6), "channels_last"),
    ((257, 64), "contiguous"),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def compute_all():
    ops = torch.ops.bnext
    results = {}
    for i, (shape, fmt) in enumerate(CONFIGS):
        for j, dtype in enumerate(DTYPES):
            g = torch.Generator().manual_seed(1000 * i + j)
            x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
            dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            if fmt == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
                dy = dy.contiguous(memory_format=torch.channels_last)
            C = shape[1]
            pdt = torch.float64 if dtype == torch.float64 else torch.float32
            w = torch.randn(C, generator=g, dtype=pdt)
            b = torch.randn(C, generator=g, dtype=pdt)
            y, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
            dx, dw, db = ops.batch_norm_backward(dy, x, mean, var, w, 1e-5, True)
            rm = torch.rand(C, generator=g, dtype=pdt)
            rv = torch.rand(C, generator=g, dtype=pdt) + 0.5
            y_eval = ops.batch_norm_infer(x, rm, rv, w, b, 1e-5)
            key = f"{shape}-{fmt}-{dtype}"
            results[key] = [t.contiguous() for t in (y, dx, dw, db, y_eval)]
    # Row norms stream whole rows when a row is a whole number of vectors
    # (N = 64, 1024) and store normally otherwise (N = 37).
    for i, (M, N) in enumerate([(9, 64), (5, 1024), (11, 37)]):
        for j, dtype in enumerate(DTYPES):
            g = torch.Generator().manual_seed(5000 + 100 * i + j)
            x = (torch.randn(M, N, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
            dy = torch.randn(M, N, generator=g, dtype=torch.float64).to(dtype)
            w = torch.randn(N, generator=g, dtype=torch.float64).to(dtype)
            b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype)
            y, mean, rstd = ops.layer_norm_fwd(x, [N], w, b, 1e-5)
            dx, dw, db = ops.layer_norm_bwd(dy, x, mean, rstd, w, 1e-5, [True, True])
            y2, rstd2 = ops.rms_norm_fwd(x, [N], w, 1e-5)
            dx2, dw2 = ops.rms_norm_bwd(dy, x, rstd2, w, 1e-5, True)
            results[f"rows-{M}x{N}-{dtype}"] = [y, dx, dw, db, y2, dx2, dw2]
    return results


def test_streaming_stores_change_no_bit(tmp_path):
    out = tmp_path / "streamed.pt"
    env = dict(os.environ, BNEXT_STREAM_MIN_BYTES="0")
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); "
        "import test_streaming_stores as t; torch.save(t.compute_all(), sys.argv[1])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(out), os.path.dirname(__file__)], env=env, check=True
    )
    streamed = torch.load(out)
    cached = compute_all()
    assert streamed.keys() == cached.keys()
    for key, tensors in cached.items():
        for i, (a, b) in enumerate(zip(tensors, streamed[key])):
            assert torch.equal(a, b), f"{key}: output {i} differs with streaming stores"


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_large_output_is_correct(fmt):
    # 4 x 64 x 128 x 128 float32 is 16 MiB: streamed under the default
    # threshold on machines with up to a 32 MiB last-level cache.
    x = torch.randn(4, 64, 128, 128) * 3 + 1
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ours = torch_bnext.BatchNorm2d(64)
    ref = torch.nn.BatchNorm2d(64).double()
    xd = x.double().requires_grad_()
    xo = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    ours(xo).backward(dy)
    ref(xd).backward(dy.double())
    assert_close_rel(ours(x.detach()), ref(xd.detach()), torch.float32, "y")
    assert_close_rel(xo.grad, xd.grad, torch.float32, "dx")
