"""Table, JSON/CSV and PNG output of benchmark results."""

import csv
import json
import textwrap

COLUMNS = [
    ("op", 11), ("shape", 18), ("layout", 13), ("dtype", 8), ("pass", 13),
    ("ours ms", 9), ("native ms", 9), ("speedup", 8), ("GB/s", 7), ("% copy", 6),
    ("floor ms", 8), ("max x", 6),
]


def row_values(r):
    return [
        r["op"], "x".join(map(str, r["shape"])), r["layout"], r["dtype"], r["pass"],
        f"{r['ours_ms']:.3f}", f"{r['native_ms']:.3f}", f"{r['speedup']:.2f}x",
        f"{r['gbps']:.1f}", f"{r['pct_copy']:.0f}%",
        f"{r['floor_ms']:.3f}", f"{r['max_speedup']:.1f}x",
    ]


def table(results, header_note=""):
    widths = [w for _, w in COLUMNS]
    lines = []
    if header_note:
        lines.append(header_note)
    lines.append("  ".join(name.ljust(w) for (name, _), w in zip(COLUMNS, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in results:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row_values(r), widths)))
        if r.get("native_kernels"):
            lines.append("    native kernels: " + ", ".join(r["native_kernels"]))
    renorm = [r for r in results if r.get("renorm_over_bn") is not None]
    if renorm:
        lines.append("")
        lines.append("Batch Renorm / our Batch Norm on the same input (timed alternately):")
        for r in renorm:
            lines.append(f"  {'x'.join(map(str, r['shape'])):<18}  {r['layout']:<13}  {r['dtype']:<8}  "
                         f"{r['pass']:<13}  {r['renorm_over_bn']:.2f}x")
    return "\n".join(lines)


def write_markdown(path, results, header_note=""):
    """The table as GitHub markdown (for results/*.md and the README)."""
    names = [name for name, _ in COLUMNS]
    right = {"ours ms", "native ms", "speedup", "GB/s", "% copy", "floor ms", "max x"}
    lines = [header_note, ""] if header_note else []
    lines.append("| " + " | ".join(names) + " |")
    lines.append("| " + " | ".join("---:" if n in right else "---" for n in names) + " |")
    for r in results:
        lines.append("| " + " | ".join(row_values(r)) + " |")
    renorm = [r for r in results if r.get("renorm_over_bn") is not None]
    if renorm:
        lines += ["", "Batch Renorm / our Batch Norm on the same input (timed alternately):", "",
                  "| shape | layout | dtype | pass | renorm / batchnorm |",
                  "| --- | --- | --- | --- | ---: |"]
        lines += [f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['dtype']} | {r['pass']} | "
                  f"{r['renorm_over_bn']:.2f}x |" for r in renorm]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_json(path, results, meta):
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


def write_csv(path, results):
    keys = [k for k in results[0] if k != "native_kernels"] if results else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: (("x".join(map(str, r[k]))) if k == "shape" else r[k]) for k in keys})


def write_png(path, results, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']} {'x'.join(map(str, r['shape']))} {r['layout'][:2]} {r['dtype']} {r['pass']}"
              for r in results]
    speedups = [r["speedup"] for r in results]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(results) + 1.2))
    colors = ["tab:green" if s >= 1 else "tab:red" for s in speedups]
    ax.barh(range(len(results)), speedups, color=colors)
    ax.set_yticks(range(len(results)), labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup over PyTorch native (log scale)")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
