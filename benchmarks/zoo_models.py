"""A training step of zoo models, the original against torch_bnext.convert_model's
conversion, side by side in one process, with each model's norm layers' share
of the step from the profiler.

    python benchmarks/zoo_models.py                     # Llama-style decoder + ConvNeXt-T
    python benchmarks/zoo_models.py --models llama --steps 5 --threads 2

llama: a transformers LlamaForCausalLM built from a config (hidden 2048, 4
layers, 16 heads, MLP 5632, vocabulary 4096; random weights), bfloat16
weights and activations, one sequence of 512 tokens. convnext: torchvision's
convnext_tiny (its LayerNorm2d and nn.LayerNorm layers), float32, batch 8,
224x224, NCHW. A step is forward, cross-entropy, backward (no optimiser:
both models would run the same one).

Timing: steps of the two models alternate (warm-up step first), medians
reported. Share: one more step of each under torch.profiler, the norm layers'
forward and backward wrapped in record_function ranges by module hooks (the
same hooks on both models), summed over the ranges.
"""

import argparse
import statistics
import sys
import time

import torch
from torch import nn


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=4096,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tokens = torch.randint(0, config.vocab_size, (1, 512))

    def step(m):
        out = m(input_ids=tokens, labels=tokens)
        out.loss.backward()

    return model, step


def _convnext():
    from torchvision.models import convnext_tiny

    torch.manual_seed(0)
    model = convnext_tiny()
    x = torch.randn(8, 3, 224, 224)
    target = torch.randint(0, 1000, (8,))

    def step(m):
        nn.functional.cross_entropy(m(x), target).backward()

    return model, step


MODELS = {"llama": _llama, "convnext": _convnext}


def _norm_modules(model):
    """The norm layers of either model: the zoos' classes and ours alike are
    named *Norm* (LlamaRMSNorm, CastingRMSNorm, LayerNorm2d, LayerNorm)."""
    return [m for m in model.modules() if "Norm" in type(m).__name__]


def _profile_ranges(modules, label):
    """Hooks that put each norm module's forward and backward into a
    record_function range named `label`; returns the handles."""
    handles = []
    for m in modules:
        state = {}

        def fwd_pre(mod, args, state=state):
            state["f"] = torch.autograd.profiler.record_function(label)
            state["f"].__enter__()

        def fwd_post(mod, args, out, state=state):
            state.pop("f").__exit__(None, None, None)

        def bwd_pre(mod, grad_out, state=state):
            state["b"] = torch.autograd.profiler.record_function(label)
            state["b"].__enter__()

        def bwd_post(mod, grad_in, grad_out, state=state):
            state.pop("b").__exit__(None, None, None)

        handles += [
            m.register_forward_pre_hook(fwd_pre),
            m.register_forward_hook(fwd_post),
            m.register_full_backward_pre_hook(bwd_pre),
            m.register_full_backward_hook(bwd_post),
        ]
    return handles


def _norm_share(model, step, label):
    """(ms in the norm layers, ms of the step) of one profiled step."""
    handles = _profile_ranges(_norm_modules(model), label)
    try:
        model.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step(model)
            total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    norm_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key == label)
    return norm_us / 1e3, total * 1e3


def run(name, steps):
    import torch_bnext

    original, step = MODELS[name]()
    import copy

    converted = torch_bnext.convert_model(copy.deepcopy(original), layernorm=True)
    report = torch_bnext.conversion_report(converted)
    times = {"original": [], "converted": []}
    pairs = (("original", original), ("converted", converted))
    for _, m in pairs:  # warm-up: allocator, caches, lazy init
        m.zero_grad(set_to_none=True)
        step(m)
    for _ in range(steps):
        for key, m in pairs:
            m.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step(m)
            times[key].append((time.perf_counter() - start) * 1e3)
    share = {key: _norm_share(m, step, f"norm:{key}") for key, m in pairs}
    orig_ms = statistics.median(times["original"])
    conv_ms = statistics.median(times["converted"])
    print(f"\n{name}: {steps} steps each, alternating, {torch.get_num_threads()} threads")
    print(report)
    print(f"{'':12}{'step ms (median)':>18}{'norm ms':>10}{'norm share':>12}  (profiled step)")
    for key, ms in (("original", orig_ms), ("converted", conv_ms)):
        norm_ms, total_ms = share[key]
        print(
            f"{key:12}{ms:>18.1f}{norm_ms:>10.1f}{norm_ms / total_ms:>11.1%}  ({total_ms:.0f} ms)"
        )
    norm_ratio = share["original"][0] / share["converted"][0]
    print(f"step speedup: {orig_ms / conv_ms:.3f}x; norm layers: {norm_ratio:.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["llama", "convnext"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models:
        run(name, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
