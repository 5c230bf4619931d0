"""The house style of csrc/, checked so that it stays: every op family has the
same rooms under the same names, and the CPU emulator reaches product code
through one seam only (README, "Layout of the code")."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# Every family: its schemas and their registration, argument checks, the ops
# written once over a backend, the CPU and CUDA registrations, autograd.
COMMON = {
    "schemas.h",
    "ops.cpp",
    "checks.h",
    "composite.h",
    "cpu_kernels.cpp",
    "cuda_kernels.cu",
    "autograd.cpp",
}
# Families with kernels of their own add their backends, the CUDA kernels and
# an ATen reference for derivatives beyond the kernels'.
KERNELS = {"cpu_backend.h", "cuda_backend.cuh", "cuda_kernels.cuh", "reference.h", "reference.cpp"}
FAMILIES = {
    # Its CPU kernels' layouts and the passes written once over a functor
    # (shared with the activation ops) sit beside them, included by
    # cpu_kernels.cpp only.
    "batch_norm": COMMON | KERNELS | {"cpu_layout.h", "cpu_passes.h"},
    # Its channel kernels (the _2d ops, normalising over dim 1) sit beside
    # the row kernels, one file per backend.
    "layer_norm": COMMON | KERNELS | {"cpu_channel_kernels.h", "cuda_channel_kernels.cuh"},
    # Batch Norm's backends with r and d folded into the per-channel
    # coefficients; its own reference is the r/d correction.
    "batch_renorm": COMMON | {"reference.h", "reference.cpp"},
    # Batch Norm's backends between collectives; not differentiable, so no
    # reference.
    "distributed": COMMON,
    # Batch Norm + activation: Batch Norm's backends with the activation in
    # their elementwise pass and backward reduce; its reference is the
    # activation composed from ATen operators.
    "batch_norm_act": COMMON | {"reference.h", "reference.cpp"},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_op_family_has_the_house_rooms(family):
    assert set(os.listdir(os.path.join(CSRC, family))) == FAMILIES[family]


def test_no_unknown_op_family():
    others = {"common", "emulator", "include", "module.cpp"}
    assert set(os.listdir(CSRC)) == set(FAMILIES) | others


def test_each_family_registers_under_one_name():
    for family in FAMILIES:
        composite = open(os.path.join(CSRC, family, "composite.h")).read()
        assert "void register_kernels(torch::Library& m)" in composite, family
        for unit, backend in (
            ("cpu_kernels.cpp", "CpuBackend"),
            ("cuda_kernels.cu", "CudaBackend"),
        ):
            text = open(os.path.join(CSRC, family, unit)).read()
            assert re.search(rf"register_kernels<(batch_norm::)?{backend}>\(m\)", text), (
                family,
                unit,
            )


def product_sources():
    """(path under csrc/, text) of every source but the emulator and its seam."""
    seam = os.path.join("common", "cuda_launch.cuh")
    for folder, _, files in os.walk(CSRC):
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), CSRC)
            if not path.startswith("emulator" + os.sep) and path != seam:
                yield path, open(os.path.join(folder, name)).read()


def test_emulator_macro_stays_behind_the_seam():
    users = [path for path, text in product_sources() if "BNEXT_EMULATE_CUDA" in text]
    assert users == []


def test_kernels_declare_shared_memory_through_the_checked_macro():
    """A plain __shared__ array would be a static the emulator cannot check
    (races, uninitialised reads, bounds); kernels use BNEXT_SHARED."""
    plain = [
        f"{path}: {line.strip()}"
        for path, text in product_sources()
        for line in text.splitlines()
        if "__shared__" in line
    ]
    assert plain == []
