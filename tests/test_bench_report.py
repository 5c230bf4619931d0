"""The benchmark's case selection, reliability verdicts and report files
(benchmarks/): pure logic on made-up timings, no timing of anything."""

import csv
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cases  # noqa: E402
import reliability as rel  # noqa: E402
import report  # noqa: E402
from run import MERGED_KEYS, child_arguments  # noqa: E402

MS = 1e-3
ALL_OPS = ["batchnorm", "batchrenorm", "layernorm", "rmsnorm"]


def rounds(*medians_ms, blocks=10, number=10, jitter=0.01):
    """One round per median: `blocks` blocks within +-jitter of it."""
    out = []
    for m in medians_ms:
        times = [m * MS * (1 + jitter * ((i % 3) - 1)) for i in range(blocks)]
        out.append({"times": times, "number_per_run": number})
    return out


def row(**kw):
    r = {
        "op": "batchnorm",
        "shape": [32, 64, 56, 56],
        "layout": "contiguous",
        "dtype": "float32",
        "pass": "train fwd+bwd",
        "ours_ms": 1.0,
        "native_ms": 4.0,
        "speedup": 4.0,
        "gbps": 80.0,
        "copy_gbps": 180.0,
        "pct_copy": 44.0,
        "floor_ms": 0.7,
        "max_speedup": 5.7,
        "renorm_over_bn": None,
        "reliable": True,
        "flags": [],
        "renorm_reliable": True,
        "others_cpus": 0.0,
        "native": "BatchNorm2d",
        "native_kernels": [],
    }
    r.update(kw)
    return r


# --- case selection ---------------------------------------------------------------------------


def test_full_suite_is_the_old_default_and_subset_is_smaller():
    dtypes = [torch.float32, torch.bfloat16]
    full = cases.build_cases(ALL_OPS, "cpu", dtypes, full=True)
    subset = cases.build_cases(ALL_OPS, "cpu", dtypes, full=False)
    assert len(full) == 126
    assert len(subset) == 48
    keys = {c.key for c in subset}
    assert keys <= {c.key for c in full}
    assert {c.pass_ for c in subset} == {"train fwd+bwd", "eval fwd"}
    assert {c.op for c in subset} == set(ALL_OPS)
    assert {c.layout for c in subset if c.op == "batchnorm"} == {"contiguous", "channels_last"}
    assert {c.key[3] for c in subset} == {"float32", "bfloat16"}
    assert not [c for c in subset if c.op == "batchrenorm" and c.pass_ == "eval fwd"]


def test_explicit_options_override_the_subset():
    got = cases.build_cases(
        ["batchnorm"],
        "cpu",
        [torch.float32],
        shapes=[(8, 16, 4, 4)],
        passes=["train fwd"],
        full=False,
    )
    assert [c.key for c in got] == [
        ("batchnorm", (8, 16, 4, 4), layout, "float32", "train fwd")
        for layout in ("contiguous", "channels_last")
    ]
    only_passes = cases.build_cases(["layernorm"], "cpu", [torch.float32], passes=["train fwd"])
    assert {c.shape for c in only_passes} == set(cases.LN_SHAPES["cpu"])


def test_child_arguments_drop_what_the_parent_handles():
    argv = [
        "--ops",
        "batchnorm",
        "--processes",
        "3",
        "--json",
        "a.json",
        "--out=dir",
        "--png",
        "p.png",
        "--full",
        "--no-out",
        "--rounds",
        "2",
    ]
    assert child_arguments(argv) == ["--ops", "batchnorm", "--full", "--rounds", "2", "--no-out"]


# --- reliability verdicts ---------------------------------------------------------------------


def test_quantile_and_spread():
    assert rel.quantile([4, 1, 3, 2], 0.5) == 2.5
    assert rel.quantile([1, 2, 3, 4, 5], 0.25) == 2
    assert rel.rel_spread([1.0, 1.2, 0.9]) == pytest.approx(0.3)
    assert rel.rel_spread([1.0]) == 0.0


def test_steady_measurements_are_reliable():
    assert rel.row_flags(rounds(1.0, 1.01, 0.99), rounds(4.0, 4.05, 3.98)) == []


def test_rounds_that_disagree_are_spread():
    assert rel.row_flags(rounds(1.0, 1.5, 1.0), rounds(4.0, 4.0, 4.0)) == ["spread"]
    assert rel.row_flags(rounds(1.0, 1.0, 1.0), rounds(4.0, 4.0, 5.2)) == ["spread"]
    assert rel.row_flags(rounds(1.0, 1.2, 1.0), rounds(4.0, 4.0, 4.0)) == []  # 20% is within


def test_noisy_blocks_within_a_round_are_spread():
    noisy = [{"times": [1 * MS, 2 * MS] * 6, "number_per_run": 10}]
    assert "spread" in rel.impl_flags(noisy)


def test_times_on_scheduler_ticks_are_flagged():
    # The "214x" rows: one-call blocks of 8, 16 and 32 ms, i.e. whole 4 ms ticks.
    snapped = [{"times": [8e-3, 16e-3, 8.05e-3, 32e-3, 16e-3, 7.98e-3], "number_per_run": 1}]
    assert "tick" in rel.impl_flags(snapped, tick=4e-3)
    # Every call exactly 2 ticks (seen for ours and native alike under contention).
    stuck = [{"times": [7.996e-3, 7.998e-3, 7.993e-3, 7.999e-3], "number_per_run": 10}]
    assert "tick" in rel.impl_flags(stuck, tick=4e-3)
    # A kernel that really takes ~8 ms every call sits near one multiple: not flagged.
    genuine = [{"times": [8.05e-3, 8.06e-3, 8.07e-3, 8.04e-3, 8.05e-3], "number_per_run": 1}]
    assert rel.impl_flags(genuine, tick=4e-3) == set()
    assert not rel.tick_snapped([5e-3, 10e-3, 15e-3], tick=4e-3)
    assert not rel.tick_snapped([1e-3, 1.001e-3, 0.999e-3], tick=4e-3)  # below one tick
    assert not rel.tick_snapped([8e-3, 16e-3], tick=4e-3)  # too few blocks


def test_short_calls_need_many_calls():
    few_calls = [{"times": [10e-6] * 6, "number_per_run": 100}]
    many_calls = [{"times": [10e-6] * 6, "number_per_run": 1000}]
    assert rel.impl_flags(few_calls, "cpu") == {"short"}
    assert rel.impl_flags(many_calls, "cpu") == set()
    assert rel.impl_flags(few_calls, "cuda") == set()  # 10 us is long enough for CUDA events
    events = [{"times": [3e-6] * 1000, "number_per_run": 1}] * 3  # each 3 us call on its own
    assert rel.impl_flags(events, "cuda") == {"short"}


def test_few_blocks():
    assert rel.impl_flags(rounds(1.0, 1.0, blocks=1)) == {"few"}
    assert rel.impl_flags(rounds(1.0, 1.0, 1.0, blocks=1)) == set()
    assert rel.impl_flags([{"times": [], "number_per_run": 1}]) == {"few"}


def test_load_and_floor():
    steady = rounds(1.0, 1.0, 1.0)
    assert rel.row_flags(steady, steady, others_cpus=0.9, free_cpus=0) == ["load"]
    assert rel.row_flags(steady, steady, others_cpus=0.1, free_cpus=0) == []
    assert rel.row_flags(steady, steady, others_cpus=0.9, free_cpus=1) == []
    assert rel.row_flags(steady, steady, ours_ms=0.1, floor_ms=0.5) == ["floor"]
    assert rel.row_flags(steady, steady, ours_ms=0.45, floor_ms=0.5) == []


def test_merge_uses_reliable_processes():
    rows = [
        row(ours_ms=1.0, speedup=4.0),
        row(ours_ms=1.04, speedup=3.9),
        row(ours_ms=9.0, speedup=0.44, reliable=False, flags=["tick"]),
    ]
    m = rel.merge_rows(rows, MERGED_KEYS)
    assert m["reliable"] and m["flags"] == []
    assert m["ours_ms"] == pytest.approx(1.02)
    assert m["speedup"] == pytest.approx(3.95)
    assert m["processes_reliable"] == "2/3"


def test_merge_marks_majority_unreliable_and_disagreeing_processes():
    rows = [row(reliable=False, flags=["spread"]), row(reliable=False, flags=["load"]), row()]
    m = rel.merge_rows(rows, MERGED_KEYS)
    assert not m["reliable"]
    assert m["flags"] == ["load", "majority", "spread"]
    apart = [row(ours_ms=1.0), row(ours_ms=1.6), row(ours_ms=1.1)]
    m = rel.merge_rows(apart, MERGED_KEYS)
    assert not m["reliable"] and m["flags"] == ["processes"]
    assert m["ours_ms"] == 1.1


# --- report -----------------------------------------------------------------------------------


def test_table_marks_unreliable_ratio():
    good = row()
    bad = row(op="rmsnorm", shape=[64, 1024], speedup=214.0, reliable=False, flags=["load", "tick"])
    text = report.table([good, bad], "note")
    good_line, bad_line = [
        line for line in text.splitlines() if line.startswith(("batchnorm", "rmsnorm"))
    ]
    assert "4.00x " in good_line and "4.00x?" not in good_line and good_line.endswith("yes")
    assert "214.00x?" in bad_line and bad_line.endswith("no: load,tick")


def test_files_carry_the_verdict(tmp_path):
    renorm = row(op="batchrenorm", renorm_over_bn=1.05, renorm_reliable=False)
    results = [row(), row(reliable=False, flags=["spread", "tick"]), renorm]
    footer = rel.summary(results)
    report.write_csv(tmp_path / "r.csv", results)
    with open(tmp_path / "r.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["reliable"] for r in got] == ["True", "False", "True"]
    assert got[1]["flags"] == "spread;tick"
    assert got[0]["shape"] == "32x64x56x56"
    report.write_json(tmp_path / "r.json", results, {"device": "cpu"})
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["reliable"] for r in results] == [True, False, True]
    report.write_markdown(tmp_path / "r.md", results, "note", footer)
    md = (tmp_path / "r.md").read_text()
    assert "| reliable |" in md and "4.00x? | " in md and "| no: spread,tick |" in md
    assert "1.05x? |" in md
    assert "1 of 3 rows are unreliable" in md


def test_summary_explains_counts_and_load():
    results = [
        row(),
        row(reliable=False, flags=["spread"]),
        row(reliable=False, flags=["spread", "load"]),
    ]
    busy = {
        "load1_start": 1.3,
        "others_cpus_start": 0.8,
        "cpus": 2,
        "threads": 2,
        "others_cpus_run": 0.9,
    }
    lines = rel.summary(results, busy)
    assert lines[0].startswith("WARNING: 2 of 3 rows are unreliable")
    assert lines[1].split()[:2] == ["2", "spread:"] and lines[2].split()[:2] == ["1", "load:"]
    assert "0.80 CPUs at the start" in lines[-1] and "0.90 CPUs on average" in lines[-1]
    assert "load average 1.30" in lines[-1]
    quiet = {
        "load1_start": 0.1,
        "others_cpus_start": 0.0,
        "cpus": 2,
        "threads": 2,
        "others_cpus_run": 0.05,
    }
    assert rel.summary([row()], quiet) == []
    # The load average lags a job that just ended: measured CPU use decides where there is one.
    assert rel.load_warning(dict(quiet, load1_start=1.5)) is None
    no_meter = dict(quiet, load1_start=1.5, others_cpus_start=None, others_cpus_run=None)
    assert "load average was 1.50" in rel.load_warning(no_meter)
    # 1 thread on 2 CPUs leaves one free: another process on the other CPU does not compete.
    assert rel.load_warning(dict(busy, threads=1)) is None


def test_png_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert report.write_png(tmp_path / "s.png", [row()], "t") is False
    assert not (tmp_path / "s.png").exists()


def test_cpu_meter_reads_proc_stat():
    m = rel.CpuMeter().start()
    others = m.stop()
    if os.path.exists("/proc/stat"):
        assert others is not None and others >= 0
    assert rel.kernel_tick() > 0


def test_load_state_samples_the_cpus():
    state = rel.load_state(threads=2, sample_s=0.05)
    assert state["cpus"] >= 1 and state["threads"] == 2
    if os.path.exists("/proc/stat"):
        assert state["others_cpus_start"] is not None and state["others_cpus_start"] >= 0
