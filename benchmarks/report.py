"""Table, JSON/CSV/markdown and PNG output of benchmark results. Rows whose
measurement is unreliable (reliability.py) carry a '?' after the speedup and
their flags in the "reliable" column."""

import csv
import json
import textwrap

COLUMNS = [
    ("op", 11),
    ("shape", 18),
    ("layout", 13),
    ("dtype", 8),
    ("pass", 13),
    ("ours ms", 9),
    ("native ms", 9),
    ("speedup", 8),
    ("GB/s", 7),
    ("% copy", 6),
    ("floor ms", 8),
    ("max x", 6),
    ("reliable", 8),
]
RIGHT = {"ours ms", "native ms", "speedup", "GB/s", "% copy", "floor ms", "max x"}
UNRELIABLE = "?"


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def reliable_text(r):
    if r.get("reliable", True):
        return "yes"
    return "no: " + ",".join(r.get("flags", [])) if r.get("flags") else "no"


def speedup_text(r):
    """The ratio, with a '?' where the measurement is unreliable: no confident number."""
    mark = "" if r.get("reliable", True) else UNRELIABLE
    return _fmt(r.get("speedup"), ".2f") + "x" + mark


def row_values(r):
    return [
        r["op"],
        "x".join(map(str, r["shape"])),
        r["layout"],
        r["dtype"],
        r["pass"],
        _fmt(r["ours_ms"], ".3f"),
        _fmt(r["native_ms"], ".3f"),
        speedup_text(r),
        _fmt(r["gbps"], ".1f"),
        _fmt(r["pct_copy"], ".0f") + "%",
        _fmt(r["floor_ms"], ".3f"),
        _fmt(r["max_speedup"], ".1f") + "x",
        reliable_text(r),
    ]


def _renorm_rows(results):
    return [r for r in results if r.get("renorm_over_bn") is not None]


def _renorm_text(r):
    return f"{r['renorm_over_bn']:.2f}x" + ("" if r.get("renorm_reliable", True) else UNRELIABLE)


def table(results, header_note="", footer=()):
    widths = [w for _, w in COLUMNS]
    lines = []
    if header_note:
        lines.append(header_note)
    lines.append("  ".join(name.ljust(w) for (name, _), w in zip(COLUMNS, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    for r in results:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row_values(r), widths)).rstrip())
        if r.get("native_kernels"):
            lines.append("    native kernels: " + ", ".join(r["native_kernels"]))
    renorm = _renorm_rows(results)
    if renorm:
        lines.append("")
        lines.append("Batch Renorm / our Batch Norm on the same input (timed alternately):")
        for r in renorm:
            lines.append(
                f"  {'x'.join(map(str, r['shape'])):<18}  {r['layout']:<13}  {r['dtype']:<8}  "
                f"{r['pass']:<13}  {_renorm_text(r)}"
            )
    if footer:
        lines.append("")
        lines.extend(footer)
    return "\n".join(lines)


def write_markdown(path, results, header_note="", footer=()):
    """The table as GitHub markdown (for results/*.md and the README)."""
    names = [name for name, _ in COLUMNS]
    lines = [header_note, ""] if header_note else []
    lines.append("| " + " | ".join(names) + " |")
    lines.append("| " + " | ".join("---:" if n in RIGHT else "---" for n in names) + " |")
    for r in results:
        lines.append("| " + " | ".join(row_values(r)) + " |")
    renorm = _renorm_rows(results)
    if renorm:
        lines += [
            "",
            "Batch Renorm / our Batch Norm on the same input (timed alternately):",
            "",
            "| shape | layout | dtype | pass | renorm / batchnorm |",
            "| --- | --- | --- | --- | ---: |",
        ]
        lines += [
            f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['dtype']} | {r['pass']} | "
            f"{_renorm_text(r)} |"
            for r in renorm
        ]
    if footer:
        lines += [""] + [f"    {line}" for line in footer]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_json(path, results, meta):
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


CSV_SKIP = {"native_kernels", "ours_stats", "native_stats"}


def write_csv(path, results):
    keys = []
    for r in results:  # every row's keys, first-seen order (merged rows add some)
        keys += [k for k in r if k not in CSV_SKIP and k not in keys]

    def cell(k, v):
        if k == "shape":
            return "x".join(map(str, v))
        if k == "flags":
            return ";".join(v)
        return v

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: cell(k, r.get(k)) for k in keys})


def write_png(path, results, title):
    """Speedup bars; unreliable rows grey and hatched, with '?' in the label.
    Returns False (draws nothing) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{'? ' if not r.get('reliable', True) else ''}{r['op']} {'x'.join(map(str, r['shape']))} "
        f"{r['layout'][:2]} {r['dtype']} {r['pass']}"
        for r in results
    ]
    speedups = [r["speedup"] for r in results]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(results) + 1.4))
    for i, (r, s) in enumerate(zip(results, speedups)):
        if r.get("reliable", True):
            ax.barh(i, s, color="tab:green" if s >= 1 else "tab:red")
        else:
            ax.barh(i, s, color="lightgrey", hatch="///", edgecolor="grey")
    ax.set_yticks(range(len(results)), labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    xlabel = "speedup over PyTorch native (log scale)"
    if any(not r.get("reliable", True) for r in results):
        xlabel += "; grey hatched '?': unreliable measurement"
    ax.set_xlabel(xlabel)
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
