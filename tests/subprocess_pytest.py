"""Part of the test suite run again in a subprocess, under an environment
that must be set before torch_bnext loads (a CPU variant, an emulator
schedule, AddressSanitizer)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_pytest(args, env, timeout):
    """`python -m pytest -q -x *args` from the repository root: stops at the
    first failure, whose report is at the end of the output."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def failure_report(result, stdout_tail=6000, stderr_tail=2000):
    return result.stdout[-stdout_tail:] + result.stderr[-stderr_tail:]
