"""Calls where torch_bnext used to differ from torch: same outcome, same
exception type, for the same mistake."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_bnext
from torch_bnext import functional as ours_F

ops = torch.ops.bnext
# Before 2.11 torch let some mistakes through, or raised another type for them
# (2.8.0 and 2.7.1 were tried with tools/torch_range.sh); torch_bnext raises as
# the newer releases do, whatever torch it runs with.
OLDER_TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11)


def both(call):
    """(outcome of torch, outcome of ours): a result, or the exception type."""
    results = []
    for fns in ((F, nn), (ours_F, torch_bnext)):
        try:
            results.append(call(*fns))
        except Exception as exc:  # noqa: BLE001 - the type is what is compared
            results.append(type(exc))
    return results


@pytest.mark.parametrize("training, eps", [(True, 0.0), (True, -1.0), (False, -1.0)])
def test_batch_norm_eps_is_validated_like_torch(training, eps):
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    theirs, ours = both(
        lambda f, _: f.batch_norm(x, rm.clone(), rv.clone(), training=training, eps=eps)
    )
    assert ours is ValueError
    # torch_bnext follows the newer torch; older ones returned nan/inf (2.8.0
    # did, tools/torch_range.sh), which no caller wants.
    assert theirs is ValueError or OLDER_TORCH, theirs
    with pytest.raises(ValueError, match="eps"):
        torch_bnext.BatchNorm1d(3, eps=eps).train(training)(x)
    with pytest.raises(ValueError, match="eps"):
        torch_bnext.BatchRenorm1d(3, eps=eps).train(training)(x)


def test_batch_norm_eval_with_zero_eps_is_allowed_like_torch():
    x = torch.randn(4, 3)
    theirs, ours = both(lambda f, _: f.batch_norm(x, torch.zeros(3), torch.ones(3), eps=0.0))
    if theirs is ValueError:
        pytest.skip("this torch (< 2.14) rejects eps = 0 in eval too; torch_bnext follows 2.14")
    torch.testing.assert_close(ours, theirs)


def test_edge_shapes():
    for training in (True, False):
        theirs, ours = both(
            lambda f, _, training=training: f.batch_norm(
                torch.randn(0), torch.zeros(0), torch.ones(0), training=training
            )
        )
        assert ours.shape == theirs.shape == (0,)
    x = torch.randn(0, 3, dtype=torch.float64, requires_grad=True)
    w = torch.ones(3, requires_grad=True)  # float32 weight, float64 input, empty batch
    theirs, ours = both(lambda f, _: f.batch_norm(x, None, None, w, None, training=True))
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float64
    ours.sum().backward()
    assert x.grad.shape == x.shape
    # A 1-D input is an IndexError in torch's functional (it indexes dim 1).
    theirs, ours = both(lambda f, _: f.batch_norm(torch.randn(5), None, None, training=True))
    assert theirs is ours is IndexError


def test_zero_channels_raise_like_torch_instead_of_crashing():
    x = torch.randn(4, 0, 3, requires_grad=True)
    for training in (True, False):
        theirs, ours = both(lambda _, m, training=training: m.BatchNorm1d(0).train(training)(x))
        assert theirs is ours is IndexError
    g = torch.randn(4, 0, 3)
    empty = torch.empty(0)
    with pytest.raises(IndexError):  # the op that divided by C = 0
        ops.batch_norm_backward(g, x.detach(), empty, empty, None, 1e-5, True)


def test_rms_norm_keeps_the_memory_format():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(5) + 0.5
    outs = []
    for f in (F, ours_F):
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        y = f.rms_norm(xi, [5], w)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad))
    (y_t, g_t), (y_o, g_o) = outs
    assert y_o.stride() == y_t.stride() and g_o.stride() == g_t.stride()
    torch.testing.assert_close(y_o, y_t)
    torch.testing.assert_close(g_o, g_t)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_rms_norm_complex_input(dtype):
    x = torch.randn(3, 6, dtype=dtype, requires_grad=True)
    w = torch.rand(6) + 0.5
    for eps in (None, 1e-5):
        theirs, ours = both(lambda f, _, eps=eps: f.rms_norm(x, [6], w, eps))
        torch.testing.assert_close(ours, theirs)
    (g_o,) = torch.autograd.grad(ours_F.rms_norm(x, [6], w).abs().sum(), x)
    (g_t,) = torch.autograd.grad(F.rms_norm(x, [6], w).abs().sum(), x)
    torch.testing.assert_close(g_o, g_t)
    torch.testing.assert_close(
        torch_bnext.RMSNorm(6, dtype=torch.float32)(x.detach()), nn.RMSNorm(6)(x.detach())
    )


def test_error_types_match_torch():
    x = torch.randn(4, 3)
    assert both(lambda f, _: f.batch_norm(x, None, None, training=False)) == [RuntimeError] * 2
    xi = torch.randint(0, 5, (2, 4))
    assert both(lambda _, m: m.LayerNorm(4)(xi)) == [RuntimeError] * 2
    theirs, ours = both(lambda f, _: f.layer_norm(xi, [4]))
    assert ours is NotImplementedError
    assert theirs is NotImplementedError or (OLDER_TORCH and theirs is RuntimeError)


def test_rms_norm_accepts_a_float64_weight_like_torch():
    x, w = torch.randn(3, 4), torch.rand(4, dtype=torch.float64) + 0.5
    w.requires_grad_()
    theirs, ours = both(lambda f, _: f.rms_norm(x, [4], w))
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs)
    (g,) = torch.autograd.grad(ours.sum(), w)
    assert g.dtype == torch.float64


def test_convert_model_refuses_renorm_arguments_without_renorm():
    with pytest.raises(TypeError, match="norm='batchrenorm'"):
        torch_bnext.convert_model(nn.Sequential(nn.BatchNorm2d(3)), r_max=2.0)
    model = torch_bnext.convert_model(
        nn.Sequential(nn.BatchNorm2d(3)), norm="batchrenorm", r_max=2.0
    )
    assert type(model[0]) is torch_bnext.BatchRenorm2d and model[0].r_max == 2.0


def test_convert_model_lazy_and_sync_batch_norm():
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="forward pass"):
        torch_bnext.convert_model(lazy)
    lazy(torch.randn(2, 3, 4, 4))  # now initialised: it became nn.BatchNorm2d
    assert type(torch_bnext.convert_model(lazy)[0]) is torch_bnext.BatchNorm2d
    group = object()  # stands for a process group: only carried over
    torch_sync = nn.SyncBatchNorm(3, process_group=group)
    model = torch_bnext.convert_model(nn.Sequential(torch_sync))
    assert type(model[0]) is torch_bnext.SyncBatchNorm and model[0].process_group is group
    assert model[0].weight is torch_sync.weight and model[0].running_var is torch_sync.running_var
    model = torch_bnext.convert_model(
        nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm1d(3))), sync=True
    )
    assert [type(m) for m in model.modules()][1:] == [
        torch_bnext.SyncBatchNorm,
        nn.Sequential,
        torch_bnext.SyncBatchNorm,
    ]
    model = torch_bnext.convert_model(model, norm="batchrenorm", sync=True, r_max=2.0)
    assert type(model[0]) is torch_bnext.SyncBatchRenorm and model[0].r_max == 2.0
    assert model[0].process_group is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_bnext.convert_model(nn.Sequential(nn.BatchNorm2d(3)))


def test_update_stats_checks_the_batch_variance():
    rm, rv = torch.zeros(3), torch.ones(3)
    mean = torch.randn(3)
    for bad in (torch.ones(2), torch.ones(3, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="batch var"):
            ops.batch_norm_update_stats(rm, rv, None, mean, bad, 0.1, 8)
    assert (rm == 0).all() and (rv == 1).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_host_statistics_with_device_tensors_are_rejected():
    x = torch.randn(4, 6, device="cuda")
    _, mean, rstd = ops.layer_norm_fwd(x, [6], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="mean and rstd differ"):
        ops.layer_norm_bwd(torch.ones_like(x), x, mean.cpu(), rstd, None, 1e-5, [False, False])
    rm, rv = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="batch var"):
        ops.batch_norm_update_stats(
            rm, rv, None, torch.zeros(3, device="cuda"), torch.ones(3), 0.1, 8
        )
