"""A few small calls of every CUDA kernel path, for compute-sanitizer
(memcheck, racecheck) in benchmarks/gpu_check.sh: small so that the
sanitizer's slowdown (10-100x) stays within seconds.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_subset.py
"""

import torch

import torch_bnext as tb


def main():
    dev = "cuda"
    torch.manual_seed(0)
    for fmt, shape in ((torch.contiguous_format, (3, 5, 7, 9)), (torch.channels_last, (3, 5, 7, 9)),
                       (torch.contiguous_format, (65, 3))):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device=dev, dtype=dtype)
            if len(shape) == 4:
                x = x.contiguous(memory_format=fmt)
            x.requires_grad_()
            for layer in (tb.BatchNorm2d(shape[1]) if len(shape) == 4 else tb.BatchNorm1d(shape[1]),
                          tb.BatchRenorm2d(shape[1]) if len(shape) == 4 else tb.BatchRenorm1d(shape[1])):
                layer = layer.to(dev)
                layer(x).float().square().sum().backward()
                layer.eval()
                layer(x.detach())
    for n in (7, 127, 1024, 5000):
        x = torch.randn(33, n, device=dev, requires_grad=True)
        for layer in (tb.LayerNorm(n), tb.RMSNorm(n)):
            layer.to(dev)(x).square().sum().backward()
    torch.cuda.synchronize()
    print("sanitize_subset: done")


if __name__ == "__main__":
    main()
