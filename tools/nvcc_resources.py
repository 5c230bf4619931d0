"""Runs nvcc with ptxas's resource report (-Xptxas -v) and keeps the report.

setup.py puts this in front of nvcc (PYTORCH_NVCC) for the CUDA build, so every
build that compiles the kernels also records, per kernel and architecture, the
registers, spills, stack and shared memory ptxas gave them, in
build/resource-usage/<source>.txt. tests/test_resource_usage.py reads those
files: a kernel that spills, or a launch plan that assumes more resident blocks
than the registers allow, fails there, on a machine without a GPU.

    python tools/nvcc_resources.py REPORT_DIR NVCC [NVCC_WORDS...] -- ARGS...

The ptxas lines go to the report, not to the build log (two architectures of
every kernel would bury the warnings); everything else passes through.
"""

import os
import subprocess
import sys

SEPARATOR = "--"


def is_report_line(line, previous_was_properties):
    return line.startswith("ptxas info") or (
        previous_was_properties and "bytes stack frame" in line
    )


def split(output):
    """(report lines, other lines) of nvcc's output."""
    report, other = [], []
    properties = False
    for line in output.splitlines(keepends=True):
        if is_report_line(line, properties):
            report.append(line)
            properties = "Function properties for" in line
        else:
            other.append(line)
            properties = False
    return report, other


def source_of(args):
    """The file nvcc compiles: the one .cu argument, else what follows a `-c`
    that is not an option (torch's build passes `-c` twice)."""
    cu = [a for a in args if a.endswith(".cu")]
    if cu:
        return cu[0]
    for i, a in enumerate(args[:-1]):
        if a == "-c" and not args[i + 1].startswith("-"):
            return args[i + 1]
    return None


def report_name(source):
    rel = os.path.relpath(os.path.abspath(source), os.path.dirname(os.path.dirname(__file__)))
    return rel.replace(os.sep, "_").replace("..", "up") + ".txt"


def main(argv):
    if SEPARATOR not in argv or len(argv) < 3:
        sys.exit(__doc__)
    cut = argv.index(SEPARATOR)
    report_dir, nvcc, args = argv[0], argv[1:cut], argv[cut + 1 :]
    source = source_of(args)
    if source is None:  # linking or a query: nothing for ptxas to report
        return subprocess.call(nvcc + args)
    done = subprocess.run(nvcc + args + ["-Xptxas", "-v"], capture_output=True, text=True)
    out_report, out_other = split(done.stdout)
    err_report, err_other = split(done.stderr)
    sys.stdout.write("".join(out_other))
    sys.stderr.write("".join(err_other))
    if done.returncode == 0:
        os.makedirs(report_dir, exist_ok=True)
        path = os.path.join(report_dir, report_name(source))
        with open(path + ".tmp", "w") as f:
            f.write("".join(out_report + err_report))
        os.replace(path + ".tmp", path)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
