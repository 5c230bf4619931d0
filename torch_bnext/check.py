"""Self-check of an installed torch_bnext, on this machine's devices.

    python -m torch_bnext.check                 # every available device
    python -m torch_bnext.check --device cuda --quick

On each device: parity of every layer with torch.nn (outputs, gradients,
running statistics, num_batches_tracked) over a compact grid of shapes,
layouts and dtypes; gradcheck and gradgradcheck in float64;
torch.library.opcheck of every operator; and, where memory allows (not with
--quick), a Batch Norm over more than 2**31 elements. Prints one row per check
and exits non-zero if any failed. Errors are relative: ||ours - ref|| / ||ref||,
the reference being torch.nn in float64, held to the bounds of the test suite
(torch_bnext.testing.REL_TOL).
"""

import argparse
import copy
import math
import os
import sys
import time
import traceback
from typing import Callable

import torch
from torch import nn

import torch_bnext as tb
from torch_bnext import testing

_ops = torch.ops.bnext


class CheckFailed(AssertionError):
    pass


def expect_close(what: str, got, want, dtype) -> float:
    try:
        return testing.assert_close_rel(got, want, dtype, what)
    except AssertionError as exc:
        raise CheckFailed(str(exc)) from None


def _input(shape, dtype, device, channels_last, seed):
    fmt = "channels_last" if channels_last else "contiguous"
    return testing.random_input(shape, dtype, fmt, device, seed=seed)


def _pair_step(ours: nn.Module, ref: nn.Module, x: torch.Tensor, dtype) -> float:
    """One step of both (ref in float64): outputs, input/parameter gradients,
    buffers. Returns the worst relative error."""
    xr = x.detach().double().requires_grad_()
    xo = x.detach().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    # A seed no input uses: a gradient proportional to x would make
    # Batch Norm's grad_input vanish, and relative errors meaningless.
    gen = torch.Generator().manual_seed(12345)
    g = torch.randn(yr.shape, generator=gen, dtype=torch.float64).to(x.device)
    yo.backward(g.to(dtype))
    yr.backward(g)
    worst = expect_close("output", yo, yr, dtype)
    worst = max(worst, expect_close("grad_input", xo.grad, xr.grad, dtype))
    for (name, po), pr in zip(ours.named_parameters(), ref.parameters()):
        worst = max(worst, expect_close(f"grad {name}", po.grad, pr.grad, dtype))
    for (name, bo), br in zip(ours.named_buffers(), ref.buffers()):
        if bo.dtype == torch.long:
            if not torch.equal(bo.cpu(), br.cpu()):
                raise CheckFailed(f"{name}: {bo.item()} != {br.item()}")
        else:
            worst = max(worst, expect_close(name, bo, br, dtype))
    if x.dim() >= 4 and x.is_contiguous(
        memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    ):
        if not yo.is_contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        ):
            raise CheckFailed("the output lost the channels-last layout")
    return worst


def _modules(kind: str, shape, device, dtype) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    c = shape[1] if kind != "layernorm" and kind != "rmsnorm" else shape[-1]
    if kind == "batchnorm":
        ref = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
            len(shape)
        ](c)
    elif kind == "layernorm":
        ref = nn.LayerNorm(c)
    else:
        ref = nn.RMSNorm(c, eps=1e-5)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    ours = tb.convert_model(nn.Sequential(copy.deepcopy(ref)), layernorm=True)[0]
    param_dtype = testing.param_dtype_for(dtype)
    if kind != "batchnorm" and dtype in (torch.float16, torch.bfloat16):
        param_dtype = dtype  # torch's LayerNorm/RMSNorm want parameters of the input's dtype
    return ours.to(device, param_dtype), ref.to(device, torch.float64)


def parity_checks(device: str, quick: bool) -> list[tuple[str, Callable[[], str]]]:
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    bn_shapes = [
        ((8, 3), False),
        ((4, 65, 7), False),
        ((4, 3, 9, 11), False),
        ((4, 3, 9, 11), True),
        ((2, 127, 3, 4, 5), True),
        ((1, 1, 5, 5), False),
    ]
    row_shapes = [(16, 127), (3, 5, 1024)]
    if quick:
        dtypes, bn_shapes, row_shapes = dtypes[:2], bn_shapes[1:4], row_shapes[:1]
    checks = []
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        for shape, cl in bn_shapes:

            def run(shape=shape, cl=cl, dtype=dtype):
                ours, ref = _modules("batchnorm", shape, device, dtype)
                worst = 0.0
                for step in range(2):  # two steps: the running statistics feed nothing yet
                    worst = max(
                        worst, _pair_step(ours, ref, _input(shape, dtype, device, cl, step), dtype)
                    )
                ours.eval(), ref.eval()
                x = _input(shape, dtype, device, cl, 7)
                worst = max(worst, expect_close("eval output", ours(x), ref(x.double()), dtype))
                return f"max rel err {worst:.1e}"

            layout = "channels_last" if cl else "contiguous"
            checks.append((f"BatchNorm {tuple(shape)} {layout} {name}", run))
        for kind in ("layernorm", "rmsnorm"):
            for shape in row_shapes:

                def run(shape=shape, kind=kind, dtype=dtype):
                    ours, ref = _modules(kind, shape, device, dtype)
                    x = _input(shape, dtype, device, False, 3)
                    return f"max rel err {_pair_step(ours, ref, x, dtype):.1e}"

                checks.append(
                    (
                        f"{'LayerNorm' if kind == 'layernorm' else 'RMSNorm'} "
                        f"{tuple(shape)} {name}",
                        run,
                    )
                )

        def renorm(dtype=dtype):
            return _renorm_check(device, dtype)

        checks.append((f"BatchRenorm2d vs the paper's formulas {name}", renorm))
    return checks


def _renorm_check(device, dtype) -> str:
    layer = tb.BatchRenorm2d(5, momentum=0.5, r_max=1.3, d_max=0.2).to(device)
    with torch.no_grad():
        layer.running_mean.fill_(0.7)
        layer.running_var.fill_(4.0)
    x = _input((6, 5, 4, 3), dtype, device, False, 5)
    rm, rv = layer.running_mean.double().clone(), layer.running_var.double().clone()
    y = layer(x)
    xd = x.double()
    mu, var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    sigma = (rv + layer.eps).sqrt()
    r = ((var + layer.eps).sqrt() / sigma).clamp(1 / 1.3, 1.3)
    d = ((mu - rm) / sigma).clamp(-0.2, 0.2)
    view = (1, -1, 1, 1)
    want = (xd - mu.view(view)) / (var.view(view) + layer.eps).sqrt() * r.view(view) + d.view(view)
    err = expect_close("output", y, want, dtype)
    n = xd.numel() // 5
    want_rv = 0.5 * rv + 0.5 * var * n / (n - 1)
    err = max(err, expect_close("running_var", layer.running_var, want_rv, dtype))
    return f"max rel err {err:.1e}"


def gradcheck_checks(device: str) -> list[tuple[str, Callable[[], str]]]:
    from torch.autograd import gradcheck, gradgradcheck

    def make(kind):
        def run():
            gen = torch.Generator().manual_seed(2)
            d = dict(dtype=torch.float64, device=device)
            if kind in ("batchnorm", "batchrenorm"):
                x = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64).to(device)
                w = torch.rand(3, generator=gen, dtype=torch.float64).add(0.5).to(device)
                b = torch.randn(3, generator=gen, dtype=torch.float64).to(device)
                rm, rv = torch.zeros(3, **d), torch.ones(3, **d)
                if kind == "batchnorm":
                    fn = lambda x, w, b: tb.functional.batch_norm(  # noqa: E731
                        x, None, None, w, b, training=True
                    )
                else:
                    fn = lambda x, w, b: tb.functional.batch_renorm(  # noqa: E731
                        x, rm.clone(), rv.clone(), w, b, training=True, r_max=1.0, d_max=0.0
                    )
            else:
                x = torch.randn(4, 6, generator=gen, dtype=torch.float64).to(device)
                w = torch.rand(6, generator=gen, dtype=torch.float64).add(0.5).to(device)
                b = torch.randn(6, generator=gen, dtype=torch.float64).to(device)
                if kind == "layernorm":
                    fn = lambda x, w, b: tb.functional.layer_norm(x, (6,), w, b)  # noqa: E731
                else:
                    fn = lambda x, w, b: tb.functional.rms_norm(x, (6,), w) + b  # noqa: E731
            args = tuple(t.requires_grad_() for t in (x, w, b))
            if not gradcheck(fn, args, check_forward_ad=True):
                raise CheckFailed("gradcheck")
            if not gradgradcheck(fn, args):
                raise CheckFailed("gradgradcheck")
            return "first, second order and forward mode"

        return run

    return [
        (f"gradcheck {k}", make(k)) for k in ("batchnorm", "batchrenorm", "layernorm", "rmsnorm")
    ]


def opcheck_checks(device: str) -> list[tuple[str, Callable[[], str]]]:
    def run():
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(4, 3, 5, 2, generator=gen).to(device)
        v = lambda: torch.rand(3, generator=gen).add(0.5).to(device)  # noqa: E731
        lx = torch.randn(6, 8, generator=gen).to(device)
        lw = torch.rand(8, generator=gen).add(0.5).to(device)
        mean, var = _ops.batch_norm_stats(x)
        samples = [
            (_ops.batch_norm_train.default, (x, v(), v(), 1e-5)),
            (_ops.batch_norm_infer.default, (x, v(), v(), v(), v(), 1e-5)),
            (_ops.batch_norm_stats.default, (x,)),
            (_ops.batch_norm_elemt.default, (x, mean, v(), v())),
            (_ops.batch_norm_backward_reduce.default, (torch.randn_like(x), x, mean)),
            (_ops.batch_norm_backward_elemt.default, (torch.randn_like(x), x, mean, v(), v(), v())),
            (
                _ops.batch_norm_backward.default,
                (torch.randn_like(x), x, mean, var, v(), 1e-5, True),
            ),
            (_ops.batch_renorm_train.default, (x, v(), v(), v(), v(), 1e-5, 1.5, 0.5)),
            (_ops.layer_norm_fwd.default, (lx, [8], lw, lw, 1e-5)),
            (_ops.rms_norm_fwd.default, (lx, [8], lw, 1e-5)),
        ]
        for op, args in samples:
            torch.library.opcheck(op, args)
        return f"{len(samples)} operators"

    return [("torch.library.opcheck", run)]


def _free_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


def large_check(device: str) -> tuple[str, Callable[[], str]]:
    """Batch Norm over 2**31 + 2**20 bfloat16 elements: int64 indexing reaches the end."""

    def run():
        c, per = 4, (2**31 + 2**20) // 4
        shape = (per // 4096, c, 64, 64)
        need = 3 * math.prod(shape) * 2 + (1 << 30)
        if _free_memory_bytes(device) < need:
            return f"SKIP (needs {need / 2**30:.0f} GiB free)"
        x = torch.empty(shape, dtype=torch.bfloat16, device=device)
        x.view(-1)[: x.numel() // 2].fill_(1.0)
        x.view(-1)[x.numel() // 2 :].fill_(3.0)
        layer = tb.BatchNorm2d(c, momentum=1.0).to(device)
        with torch.no_grad():
            y = layer(x)
        # Samples in the first half are all 1, in the second all 3 (per is a multiple of 2).
        mean = layer.running_mean.cpu()
        if not torch.allclose(mean, torch.full((c,), 2.0), rtol=0, atol=1e-3):
            raise CheckFailed(f"mean over 2**31 elements: {mean.tolist()} != 2")
        last = y.view(-1)[-4:].float().cpu()
        if not torch.allclose(last, torch.ones(4), rtol=0, atol=2e-2):
            raise CheckFailed(f"last outputs {last.tolist()} != 1 (int64 indexing)")
        return f"{x.numel()} elements"

    return ("BatchNorm2d over 2**31+ elements (bfloat16)", run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        action="append",
        help="default: cpu, and cuda when a GPU is visible",
    )
    p.add_argument("--quick", action="store_true", help="a smaller grid, no 2**31 case")
    args = p.parse_args(argv)
    devices = args.device or testing.DEVICES
    if "cuda" in devices and not (torch.cuda.is_available() and tb.HAS_CUDA_KERNELS):
        print("cuda: no GPU visible or torch_bnext built without CUDA kernels", file=sys.stderr)
        return 2
    print(
        f"torch_bnext self-check: torch {torch.__version__}, devices {devices}, "
        f"CPU kernels {tb.cpu_capability()}"
        f"{', quick' if args.quick else ''}"
    )
    failures, start = 0, time.perf_counter()
    for device in devices:
        checks = (
            parity_checks(device, args.quick) + gradcheck_checks(device) + opcheck_checks(device)
        )
        if not args.quick:
            checks.append(large_check(device))
        for name, run in checks:
            t0 = time.perf_counter()
            try:
                detail, status = run(), "ok"
                if detail.startswith("SKIP"):
                    status, detail = "skip", detail[5:]
            except Exception as exc:  # noqa: BLE001 - every failure is reported, then counted
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                failures += 1
                if os.environ.get("BNEXT_CHECK_TRACEBACK"):
                    traceback.print_exc()
            print(f"{device:<5} {status:<5} {time.perf_counter() - t0:6.2f}s  {name:<52} {detail}")
    total = time.perf_counter() - start
    print(f"{'FAILED' if failures else 'passed'}: {failures} failure(s), {total:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
