"""A few small calls of every CUDA kernel path, for compute-sanitizer
(memcheck, racecheck, synccheck, initcheck) in benchmarks/gpu_check.sh: small
so that the sanitizer's slowdown (10-100x) stays within seconds.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_subset.py
"""

import torch

import torch_bnext as tb


def main():
    dev = "cuda"
    torch.manual_seed(0)
    # Scalar and 16-byte vector loads (S or C a multiple of the vector), one
    # block row or several partials (64 x 2 x 8 x 8: two per channel).
    for fmt, shape in (
        (torch.contiguous_format, (3, 5, 7, 9)),
        (torch.channels_last, (3, 5, 7, 9)),
        (torch.contiguous_format, (65, 3)),
        (torch.contiguous_format, (4, 8, 4, 4)),
        (torch.channels_last, (4, 16, 3, 3)),
        (torch.contiguous_format, (64, 2, 8, 8)),
        (torch.contiguous_format, (96, 16)),
    ):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device=dev, dtype=dtype)
            if len(shape) == 4:
                x = x.contiguous(memory_format=fmt)
            x.requires_grad_()
            for layer in (
                tb.BatchNorm2d(shape[1]) if len(shape) == 4 else tb.BatchNorm1d(shape[1]),
                tb.BatchRenorm2d(shape[1]) if len(shape) == 4 else tb.BatchRenorm1d(shape[1]),
            ):
                layer = layer.to(dev)
                layer(x).float().square().sum().backward()
                layer.eval()
                layer(x.detach())
    # Rows for groups of 1 to 32 lanes and for a block each, vector and scalar
    # loads, a misaligned view, and 300 rows: column sums fused into dx (merged
    # from several partial rows), long rows at the fused register budget
    # (12288) and over it (16388), and float64, whose column sums (in several
    # parts) are separate kernels.
    for n, rows, dtype in (
        (7, 33, torch.float32),
        (64, 33, torch.bfloat16),
        (127, 33, torch.float32),
        (1024, 33, torch.float32),
        (4096, 5, torch.bfloat16),
        (5000, 33, torch.float32),
        (256, 300, torch.float32),
        (12288, 5, torch.float32),
        (16388, 5, torch.float32),
        (256, 300, torch.float64),
    ):
        x = torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True)
        for layer in (tb.LayerNorm(n), tb.RMSNorm(n)):
            layer.to(dev, dtype)(x).float().square().sum().backward()
    base = torch.randn(33 * 64 + 1, device=dev)
    x = base[1:].view(33, 64).requires_grad_()
    tb.LayerNorm(64).to(dev)(x).square().sum().backward()
    torch.cuda.synchronize()
    print("sanitize_subset: done")


if __name__ == "__main__":
    main()
