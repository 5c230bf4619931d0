"""One build runs on every x86-64 CPU: the CPU kernels are compiled once per
instruction set (torch_bnext._cpu_<variant>) and the library loads the best
one the running CPU executes (csrc/module.cpp). Each variant is run in a
subprocess, chosen as a user would (ATEN_CPU_CAPABILITY) or by
BNEXT_CPU_VARIANT, and held to the same parity checks as the rest of the
suite; the libraries are disassembled to show that no AVX-512 instruction
sits where a CPU without it could reach it."""

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
from subprocess_pytest import ROOT, failure_report, run_pytest

import torch_bnext
from torch_bnext import _build_info

PACKAGE = os.path.dirname(torch_bnext.__file__)
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
BUILT = _build_info.CPU_VARIANTS


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def runnable_variants():
    """What this CPU executes, best first, as ATen judges it."""
    aten = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    names = []
    if aten == "AVX512":
        if "avx512_bf16" in cpu_flags():
            names.append("avx512_bf16")
        names.append("avx512")
    if aten in ("AVX512", "AVX2"):
        names.append("avx2")
    return [n for n in names + ["default"] if n in BUILT]


def library(name):
    (path,) = [
        os.path.join(PACKAGE, f)
        for f in os.listdir(PACKAGE)
        if f.startswith(name + ".") and f.endswith(".so")
    ]
    return path


def fresh_environment(env, cache_dir):
    """os.environ with `env` applied. Inductor's on-disk cache does not tell
    kernels compiled for one ATEN_CPU_CAPABILITY from another's: sharing it
    with a run under another capability gave NaNs and compile errors in
    torch.compile tests (torch 2.14.1), so each subprocess gets its own."""
    environ = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY",)}
    environ.pop("BNEXT_CPU_VARIANT", None)
    environ.update(env)
    environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    return environ


def python(code, cache_dir, env=(), timeout=600, prefix=()):
    environ = fresh_environment(env, cache_dir)
    environ["PYTHONPATH"] = os.pathsep.join([ROOT, *sys.path[1:]])
    return subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
        cwd=ROOT,
    )


def test_the_best_variant_this_cpu_runs_is_loaded():
    assert torch_bnext.cpu_capability() == runnable_variants()[0]


@pytest.mark.skipif(not X86_64, reason="x86-64 builds one variant per instruction set")
def test_every_variant_is_built_on_x86_64():
    if os.environ.get("BNEXT_CPU_VARIANTS"):
        pytest.skip("BNEXT_CPU_VARIANTS chose the variants")
    assert {"default", "avx2", "avx512"} <= set(BUILT)
    for name in BUILT:
        assert os.path.exists(library(f"_cpu_{name}"))


# (environment, the variant it must load): torch's own variable first, as a
# user lowers both ATen's kernels and ours; BNEXT_CPU_VARIANT reaches the plain
# AVX-512 build on a CPU that has AVX512-BF16.
SETTINGS = [
    ({"ATEN_CPU_CAPABILITY": "default"}, "default"),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
    ({"BNEXT_CPU_VARIANT": "avx512"}, "avx512"),
    ({}, None),  # the best: what an unset environment gets
]


def _settings():
    for env, want in SETTINGS:
        want = want or runnable_variants()[0]
        ident = ",".join(f"{k}={v}" for k, v in env.items()) or "unset"
        marks = []
        if want not in runnable_variants():
            marks = [pytest.mark.skip(reason=f"this CPU or build has no {want}")]
        yield pytest.param(env, want, id=ident, marks=marks)


@pytest.mark.parametrize("env,want", list(_settings()))
def test_each_variant_passes_the_self_check(env, want, tmp_path):
    """The installed-library self-check (parity with torch.nn over dtypes,
    layouts and odd channel counts, gradcheck, gradgradcheck, opcheck), run
    on the variant the environment selects."""
    code = (
        "import sys, torch_bnext as tb, torch_bnext.check as c;"
        f"assert tb.cpu_capability() == {want!r}, tb.cpu_capability();"
        "sys.exit(c.main(['--device', 'cpu', '--quick']))"
    )
    result = python(code, tmp_path, env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"CPU kernels {want}" in result.stdout
    assert "passed: 0 failure(s)" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("env,want", list(_settings())[:3])
def test_each_variant_passes_the_cpu_parity_tests(env, want, tmp_path):
    """The whole CPU parity suites of Batch Norm and LayerNorm/RMSNorm under
    each lowered variant."""
    suites = ["tests/test_batch_norm.py", "tests/test_layer_norm.py", "tests/test_batch_renorm.py"]
    result = run_pytest(["-m", "not slow", *suites], fresh_environment(env, tmp_path), 1800)
    assert result.returncode == 0, failure_report(result)


# AVX-512 in AT&T syntax: its registers (zmm, xmm16-31/ymm16-31, the k masks),
# masking and embedded broadcast, and instructions AVX-512 alone has.
AVX512 = re.compile(
    r"%zmm|%[xy]mm(?:1[6-9]|2\d|3[01])\b|%k[0-7]\b|\{1to\d+\}|vpternlog|vpermt2|vpermi2"
    r"|vcvtne2?ps2bf16|vpcompress|vpexpand|vscalef|vrndscale|vgetexp|vfixupimm"
)
YMM = re.compile(r"%ymm")


def _disassembly(path):
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", path],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    assert len(out) > 10_000  # a disassembly, not an empty section list
    return out


def _offending(text, pattern, limit=5):
    lines = [line.strip() for line in text.splitlines() if pattern.search(line)]
    return len(lines), lines[:limit]


@pytest.mark.skipif(not X86_64, reason="x86-64 instruction sets")
@pytest.mark.parametrize("name", ["_C", "_cpu_default", "_cpu_avx2", "_cpu_avx512"])
def test_no_avx512_instruction_outside_the_avx512_variants(name):
    if name.startswith("_cpu_") and name[5:] not in BUILT:
        pytest.skip(f"{name} was not built")
    text = _disassembly(library(name))
    if name == "_cpu_avx512":
        # The check itself: it must see AVX-512 where there is some.
        assert _offending(text, AVX512)[0] > 100
        return
    count, sample = _offending(text, AVX512)
    assert count == 0, f"{count} AVX-512 instructions in {name}, e.g. {sample}"
    if name == "_cpu_default":
        count, sample = _offending(text, YMM)
        assert count == 0, f"{count} AVX instructions in {name}, e.g. {sample}"


QEMU = shutil.which("qemu-x86_64")
SMOKE = (
    "import torch, torch_bnext as tb;"
    "x = torch.randn(8, 3, 5, 7);"
    "m = tb.BatchNorm2d(3); r = torch.nn.BatchNorm2d(3);"
    "y = m(x.requires_grad_()); y.sum().backward();"
    "assert torch.allclose(y, r(x), atol=1e-5);"
    "l = tb.LayerNorm(7)(x); assert torch.allclose(l, torch.nn.LayerNorm(7)(x), atol=1e-5);"
    "print('variant', tb.cpu_capability())"
)


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None or not X86_64, reason="qemu-user (qemu-x86_64) is not installed")
@pytest.mark.parametrize(
    "cpu,want", [("EPYC-Rome", "avx2"), ("Nehalem", "default")], ids=["avx2-cpu", "sse4-cpu"]
)
def test_runs_on_an_emulated_cpu_without_avx512(cpu, want, tmp_path):
    """qemu-user runs this very build on a CPU model without AVX-512 (AMD Zen 2)
    or without AVX at all (Nehalem): a kernel compiled for more dies there
    with SIGILL."""
    result = python(SMOKE, tmp_path, prefix=[QEMU, "-cpu", cpu], timeout=900)
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr[-3000:]}"
    assert f"variant {want}" in result.stdout
