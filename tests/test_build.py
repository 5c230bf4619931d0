import os

import pytest
import torch

import torch_bnext


@pytest.mark.skipif(os.environ.get("BNEXT_EXPECT_CUDA_KERNELS") != "1",
                    reason="set by .ci/run when nvcc is present")
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
