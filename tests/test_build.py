import os

import pytest
import torch

import torch_bnext


@pytest.mark.skipif(
    os.environ.get("BNEXT_EXPECT_CUDA_KERNELS") != "1", reason="set by .ci/run when nvcc is present"
)
def test_cuda_kernels_were_compiled_in():
    assert torch_bnext.HAS_CUDA_KERNELS


def test_every_op_has_cpu_kernel_and_fake_kernel():
    qualnames = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("bnext::")]
    assert "bnext::batch_norm_train" in qualnames
    for qualname in qualnames:
        name = qualname
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), name
        if torch_bnext.HAS_CUDA_KERNELS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"), name


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_build_records_the_torch_it_compiled_against():
    from torch_bnext import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    assert _build_info.CUDA_KERNELS == torch_bnext.HAS_CUDA_KERNELS


def test_import_refuses_an_extension_built_against_another_torch(tmp_path):
    """Instead of an undefined C++ symbol: both versions and the command."""
    import shutil
    import subprocess
    import sys

    package = tmp_path / "torch_bnext"
    shutil.copytree(
        os.path.dirname(torch_bnext.__file__), package, ignore=shutil.ignore_patterns("__pycache__")
    )
    (package / "_build_info.py").write_text("TORCH_VERSION = '2.0.0+old'\nCUDA_KERNELS = False\n")
    result = subprocess.run(
        [sys.executable, "-c", "import torch_bnext"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
    )
    assert result.returncode != 0
    assert "compiled against torch 2.0.0+old" in result.stderr
    assert f"torch {torch.__version__} is running" in result.stderr
    assert "pip install --no-build-isolation ." in result.stderr


def _tracked_build_inputs():
    import subprocess

    try:
        files = subprocess.run(
            [
                "git",
                "ls-files",
                "csrc",
                "tools",
                "setup.py",
                "pyproject.toml",
                "MANIFEST.in",
                "torch_bnext",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return files


def test_sdist_carries_every_source_and_header(tmp_path):
    """`python -m build` builds its wheel from the sdist: a header missing there
    is a failed build for every user of the sdist."""
    import subprocess
    import sys
    import tarfile

    files = _tracked_build_inputs()
    assert any(f.endswith(".cuh") for f in files) and any(f.endswith(".h") for f in files)
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
        env=dict(os.environ, BNEXT_CUDA="0"),
    )
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [f for f in files if f not in names]
    assert not missing, f"missing from the sdist: {missing}"
    assert not any(n.endswith((".so", "_build_info.py")) for n in names)


def test_the_libraries_use_the_stable_python_abi():
    """One build serves every Python the torch supports (abi3): the file names
    say so, and Python finds them under any interpreter's suffix list."""
    import importlib.machinery

    package = os.path.dirname(torch_bnext.__file__)
    libraries = [f for f in os.listdir(package) if f.endswith(".so")]
    assert libraries and all(f.endswith(".abi3.so") for f in libraries), libraries
    assert ".abi3.so" in importlib.machinery.EXTENSION_SUFFIXES


@pytest.mark.slow
def test_the_wheel_is_tagged_abi3(tmp_path):
    """pip's wheel (from the same build folder, so mostly a link step) is
    tagged cpXY-abi3 for the oldest Python that this torch supports, and
    carries every library."""
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(tmp_path),
            ROOT,
        ],
        check=True,
        capture_output=True,
        timeout=1800,
        env=dict(os.environ, BNEXT_CUDA="1" if torch_bnext.HAS_CUDA_KERNELS else "0"),
    )
    (wheel,) = tmp_path.glob("*.whl")
    assert "-abi3-" in wheel.name, wheel.name
    assert wheel.name.split("-")[2].startswith("cp3"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "torch_bnext/_C.abi3.so" in names
    assert any(n.startswith("torch_bnext/_cpu_default.") for n in names)
