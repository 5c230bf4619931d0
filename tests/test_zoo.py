"""convert_model on the zoos' own norm classes and models (timm, torchvision,
transformers): the zoo's class is the oracle for every registry entry, and
whole models built from configs (random weights, nothing downloaded) must
convert every norm layer and train as the original does."""

import copy
import importlib
import warnings

import pytest
import torch

import torch_bnext as tb
from torch_bnext import testing, zoo

REGISTERED = sorted(zoo.REGISTRY)


def zoo_class(qualified):
    module, name = qualified.rsplit(".", 1)
    package = module.split(".")[0]
    pytest.importorskip(package, reason=f"{package} is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)


def build(cls, channels, **options):
    """An instance with random affine parameters and running statistics (the
    zoos initialise them to ones/zeros, which would hide a swapped or dropped
    tensor); `options` go to the constructor."""
    name = cls.__name__
    if name == "SyncBatchNormAct":
        # timm makes it only from a BatchNormAct2d (it is not to be built
        # directly: it would have no drop and act).
        from timm.layers import BatchNormAct2d, convert_sync_batchnorm

        return convert_sync_batchnorm(build(BatchNormAct2d, channels, **options))
    if name.startswith("FrozenBatchNorm"):
        m = cls(channels, eps=1e-3, **options)
    elif name in ("LayerNorm", "LayerNorm2d", "RmsNorm", "RmsNorm2d"):
        m = cls(channels, eps=1e-5) if "timm" in cls.__module__ else cls(channels)
    else:
        m = cls(channels, eps=1e-5, **options)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in list(m.parameters()) + [getattr(m, "weight", None), getattr(m, "bias", None)]:
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + 1.0)
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(torch.randn(channels, generator=gen))
            m.running_var.copy_(torch.rand(channels, generator=gen) * 1.5 + 0.5)
    return m


def is_batch_norm(cls):
    """A Batch Norm, whose inputs are (N, C, H, W)."""
    return issubclass(cls, torch.nn.modules.batchnorm._BatchNorm) or "BatchNorm" in cls.__name__


def sample(cls, channels, dtype):
    four_d = cls.__name__.endswith("2d") or is_batch_norm(cls)
    shape = (3, channels, 5, 7) if four_d else (3, 11, channels)
    return testing.random_input(shape, dtype, seed=5)


@pytest.mark.parametrize("qualified", REGISTERED)
@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, None)],
    ids=["fp32", "bf16", "bf16-input-fp32-params"],
)
def test_each_registered_class_is_reproduced(qualified, dtypes):
    """Output (values and dtype), and in float32 the gradients of input and
    weight, against the zoo's own class."""
    cls = zoo_class(qualified)
    x_dtype, param_dtype = dtypes
    theirs = build(cls, 65)
    if param_dtype is not None:
        theirs.to(param_dtype)
    ours = tb.convert_model(copy.deepcopy(theirs), layernorm=True)
    assert type(ours) is not cls, "not converted"
    x = sample(cls, 65, x_dtype)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    assert yo.dtype == yt.dtype and yo.shape == yt.shape
    # bfloat16: the zoo's own computation rounds more often than ours (timm's
    # RmsNorm2d computes in bfloat16), so the bound is bfloat16's.
    testing.assert_close_rel(yo, yt.double(), x_dtype, qualified)
    if x_dtype == torch.float32:
        assert_same_grads(ours, theirs, (xo, yo), (xt, yt))


def assert_same_grads(ours, theirs, ours_io, theirs_io):
    """Backward from the same random gradient of the outputs: the gradients
    of the input and of every parameter equal the zoo's in float32."""
    (xo, yo), (xt, yt) = ours_io, theirs_io
    g = torch.randn(yt.shape, generator=torch.Generator().manual_seed(9))
    yo.backward(g)
    yt.backward(g)
    testing.assert_close_rel(xo.grad, xt.grad.double(), torch.float32, "grad input")
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        testing.assert_close_rel(mine[name].grad, p.grad.double(), torch.float32, f"grad {name}")


@pytest.mark.parametrize("qualified", REGISTERED)
def test_conversion_shares_tensors_and_reverts(qualified):
    cls = zoo_class(qualified)
    theirs = build(cls, 8)
    keys = theirs.state_dict()
    params = dict(theirs.named_parameters())
    children = dict(theirs.named_children())  # timm's drop and act
    ours = tb.convert_model(theirs, layernorm=True)
    assert type(ours) is zoo.REGISTRY[qualified].ours
    for name, t in keys.items():
        assert ours.state_dict()[name] is t or ours.state_dict()[name].data_ptr() == t.data_ptr()
    assert list(ours.state_dict()) == list(keys)
    assert dict(ours.named_parameters()).keys() == params.keys()
    assert all(p is params[name] for name, p in ours.named_parameters())
    assert dict(ours.named_children()).keys() == children.keys()
    assert all(c is children[name] for name, c in ours.named_children())
    back = tb.revert_model(ours)
    assert type(back) is cls
    for name, t in back.state_dict().items():
        assert t.data_ptr() == keys[name].data_ptr()


# ------------------------------------------------ timm's norm + activation layers

NORM_ACT = [q for q in REGISTERED if q.startswith("timm.layers.norm_act.")]

# timm's ways to configure the activation (the act module ours calls is the
# timm layer's own), and the norm options that go with them.
ACT_OPTIONS = {
    "gelu": {"act_layer": "gelu"},
    "relu-inplace": {"act_layer": "relu", "inplace": True},
    "relu-not-inplace": {"act_layer": "relu", "inplace": False},
    "silu-inplace": {"act_layer": "silu", "inplace": True},
    "leaky_relu-slope": {"act_layer": "leaky_relu", "act_kwargs": {"negative_slope": 0.2}},
    "prelu": {"act_layer": torch.nn.PReLU},  # parameters of its own: state_dict keys
    "identity": {"act_layer": "identity"},
    "apply_act-false": {"apply_act": False},
    "dropout": {"drop_layer": lambda: torch.nn.Dropout(0.3)},
    "no-affine": {"affine": False, "act_layer": "gelu"},
}


def _takes_option(qualified, option):
    # timm's FrozenBatchNormAct2d has no affine argument (its weight and bias
    # are buffers, always there).
    return not (qualified.endswith("FrozenBatchNormAct2d") and "affine" in ACT_OPTIONS[option])


@pytest.mark.parametrize(
    "qualified, option",
    [(q, o) for q in NORM_ACT for o in ACT_OPTIONS if _takes_option(q, o)],
)
def test_norm_act_layers_under_each_activation_option(qualified, option):
    """In training mode, where dropout draws a mask: from the same seed it
    draws the same one after our kernel as after timm's, which draw nothing."""
    cls = zoo_class(qualified)
    theirs = build(cls, 24, **ACT_OPTIONS[option])
    ours = tb.convert_model(copy.deepcopy(theirs), layernorm=True)
    assert type(ours) is zoo.REGISTRY[qualified].ours
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = sample(cls, 24, torch.float32)
    if option == "dropout" and x.dim() == 4:
        # Dropout draws its mask in memory order, and timm's LayerNormAct2d
        # returns NCHW input's result channels_last-strided (its permute), ours
        # in the input's layout: on channels_last input the two agree.
        x = x.contiguous(memory_format=torch.channels_last)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(0)
    yo = ours(xo)
    torch.manual_seed(0)
    yt = theirs(xt)
    testing.assert_close_rel(yo, yt.double(), torch.float32, f"{qualified} {option}")
    assert_same_grads(ours, theirs, (xo, yo), (xt, yt))
    back = tb.revert_model(ours)
    assert type(back) is cls and back.act is ours.act and back.drop is ours.drop


def test_revert_hands_back_an_activation_replaced_after_conversion():
    """Swapping a model's activations (as for export) after converting it:
    timm's layer gets the current one back, not the one it held."""
    cls = zoo_class("timm.layers.norm_act.LayerNormAct")
    ours = tb.convert_model(build(cls, 8, act_layer="gelu"), layernorm=True)
    ours.act = torch.nn.Hardswish()
    back = tb.revert_model(ours)
    assert type(back) is cls and back.act is ours.act


# timm's LayerNorm and RMSNorm classes; its Batch Norm ones have no fast_norm path.
FAST_NORM = [q for q in REGISTERED if zoo.REGISTRY[q].refuse is zoo._timm_fast_norm]


@pytest.mark.parametrize("qualified", FAST_NORM)
def test_timm_fast_norm_is_left_alone_and_reported(qualified):
    """timm's fast_norm normalises in the autocast dtype (or with apex): not
    what ours computes, so such a layer stays timm's, and the report says why."""
    cls = zoo_class(qualified)
    from timm.layers import is_fast_norm, set_fast_norm

    before = is_fast_norm()
    set_fast_norm(True)
    try:
        model = torch.nn.Sequential(build(cls, 8), build(cls, 8))
    finally:
        set_fast_norm(before)
    model[1]._fast_norm = False
    out = tb.convert_model(model, layernorm=True)
    assert type(out[0]) is cls and type(out[1]) is zoo.REGISTRY[qualified].ours
    ((converted, left, note),) = [r[1:] for r in tb.conversion_report(out) if r[0] == qualified]
    assert (converted, left) == (1, 1) and "fast_norm" in note


# ------------------------------------------ timm's Batch Norm + activation layers

BN_ACT = ["timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct"]
FROZEN = ["torchvision.ops.misc.FrozenBatchNorm2d", "timm.layers.norm_act.FrozenBatchNormAct2d"]
BN_CONFIGS = {
    "momentum-0.1": {"momentum": 0.1},
    "momentum-None": {"momentum": None},  # the cumulative average over num_batches_tracked
    "untracked": {"track_running_stats": False},  # batch statistics in eval too
}
STEPS = 3


def step_input(step, channels=16):
    """Shifted and scaled unlike the running statistics; every other step
    channels_last, which both keep."""
    fmt = "channels_last" if step % 2 else "contiguous"
    return testing.random_input((4, channels, 5, 6), torch.float32, fmt, mean=step, seed=20 + step)


def train_alike(ours, theirs, what, steps=STEPS):
    """`steps` training steps on each: outputs (and their layout), input
    gradients and the running statistics equal timm's after each step, and
    the parameters' gradients summed over the steps."""
    ours.train(), theirs.train()
    for step in range(steps):
        x = step_input(step)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        testing.assert_close_rel(yo, yt.double(), torch.float32, f"{what} step {step}")
        assert yo.stride() == yt.stride()
        g = torch.randn(yt.shape, generator=torch.Generator().manual_seed(step))
        yo.backward(g)
        yt.backward(g)
        testing.assert_close_rel(xo.grad, xt.grad.double(), torch.float32, f"{what} grad {step}")
        assert_same_buffers(ours, theirs, f"{what} step {step}")
    mine = dict(ours.named_parameters())
    assert mine.keys() == dict(theirs.named_parameters()).keys()
    for name, p in theirs.named_parameters():
        testing.assert_close_rel(mine[name].grad, p.grad.double(), torch.float32, f"{what} {name}")


def assert_same_buffers(ours, theirs, what):
    mine = dict(ours.named_buffers())
    assert mine.keys() == dict(theirs.named_buffers()).keys()
    for name, b in theirs.named_buffers():
        if b.is_floating_point():
            testing.assert_close_rel(mine[name], b.double(), torch.float32, f"{what} {name}")
        else:
            assert torch.equal(mine[name], b), f"{what} {name}"


def eval_alike(ours, theirs, what):
    ours.eval(), theirs.eval()
    x = step_input(STEPS)
    with torch.no_grad():
        testing.assert_close_rel(ours(x), theirs(x).double(), torch.float32, f"{what} eval")


@pytest.mark.parametrize("config", list(BN_CONFIGS))
@pytest.mark.parametrize("qualified", BN_ACT)
def test_batch_norm_act_running_statistics_and_eval_follow_timm(qualified, config):
    cls = zoo_class(qualified)
    theirs = build(cls, 16, act_layer="silu", **BN_CONFIGS[config])
    ours = tb.convert_model(copy.deepcopy(theirs))
    assert type(ours) is zoo.REGISTRY[qualified].ours
    assert ours.momentum == theirs.momentum
    assert ours.track_running_stats == theirs.track_running_stats
    train_alike(ours, theirs, f"{qualified} {config}")
    eval_alike(ours, theirs, f"{qualified} {config}")
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("qualified", BN_ACT)
def test_batch_norm_act_takes_convert_kwargs_and_reverts_them(qualified):
    """convert_model's kwargs go to our layer's constructor, as for torch's
    Batch Norm; revert_model hands the setting back to timm's layer."""
    cls = zoo_class(qualified)
    theirs = build(cls, 16, act_layer="relu", momentum=None)
    ours = tb.convert_model(build(cls, 16, act_layer="relu"), momentum=None)
    assert ours.momentum is None
    train_alike(ours, theirs, qualified)
    back = tb.revert_model(ours)
    assert type(back) is cls and back.momentum is None


def test_batch_norm_act_with_sync_becomes_our_sync_batch_norm_act():
    """As timm's convert_sync_batchnorm makes SyncBatchNormAct of it; without
    torch.distributed initialised (here) it computes what timm's layer does."""
    cls = zoo_class("timm.layers.norm_act.BatchNormAct2d")
    theirs = build(cls, 16, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.2})
    group = object()  # stands for a process group: never used without torch.distributed
    ours = tb.convert_model(copy.deepcopy(theirs), sync=True, process_group=group)
    assert type(ours) is tb.modules.zoo.SyncBatchNormAct and ours.process_group is group
    train_alike(ours, theirs, "sync=True")
    eval_alike(ours, theirs, "sync=True")
    ((converted, left, _),) = [r[1:] for r in tb.conversion_report(ours) if r[0].endswith("Act2d")]
    assert (converted, left) == (1, 0)
    assert type(tb.revert_model(ours)) is cls


def test_timm_sync_batch_norm_act_keeps_its_process_group_unless_given_one():
    cls = zoo_class("timm.layers.norm_act.SyncBatchNormAct")
    from timm.layers import BatchNormAct2d, convert_sync_batchnorm

    mine, given = object(), object()  # process groups, never used without torch.distributed
    theirs = convert_sync_batchnorm(build(BatchNormAct2d, 8), process_group=mine)
    assert type(theirs) is cls
    kept = tb.convert_model(theirs)
    assert kept.process_group is mine
    moved = tb.convert_model(tb.revert_model(kept), process_group=given)
    assert moved.process_group is given
    assert tb.revert_model(moved).process_group is given


def test_timm_sync_batch_norm_act_built_directly_has_no_drop_or_act():
    """timm's forward skips the drop and act it lacks; ours has nn.Identity ones."""
    cls = zoo_class("timm.layers.norm_act.SyncBatchNormAct")
    theirs = cls(8)
    ours = tb.convert_model(copy.deepcopy(theirs))
    assert type(ours) is tb.modules.zoo.SyncBatchNormAct
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = testing.random_input((3, 8, 4, 5), torch.float32, seed=2)
    testing.assert_close_rel(ours(x), theirs(x).double(), torch.float32, "no drop, no act")
    back = tb.revert_model(ours)
    assert type(back) is cls and not hasattr(back, "act")


@pytest.mark.parametrize("sync", [False, True], ids=["local", "sync"])
@pytest.mark.parametrize("qualified", BN_ACT)
def test_batch_norm_act_to_batch_renorm(qualified, sync):
    """norm="batchrenorm": our Batch Renorm, then timm's drop and act. With
    r_max=1 and d_max=0 Batch Renorm is Batch Norm, so timm's layer is the
    oracle for the step, the running statistics and eval."""
    cls = zoo_class(qualified)
    theirs = build(cls, 16, act_layer="silu", inplace=True)
    source = copy.deepcopy(theirs)
    ours = tb.convert_model(source, norm="batchrenorm", sync=sync, r_max=1.0, d_max=0.0)
    assert type(ours) is zoo.REGISTRY[qualified].targets[("batchrenorm", sync)]
    assert ours.act is source.act and ours.drop is source.drop
    assert (ours.r_max, ours.d_max) == (1.0, 0.0)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    train_alike(ours, theirs, f"{qualified} batchrenorm")
    eval_alike(ours, theirs, f"{qualified} batchrenorm")
    back = tb.revert_model(ours)
    assert back is source and back.momentum == theirs.momentum
    mine = {**dict(ours.named_parameters()), **dict(ours.named_buffers())}
    assert all(t is mine[k] for k, t in [*back.named_parameters(), *back.named_buffers()])


@pytest.mark.parametrize("qualified", BN_ACT)
def test_untracked_batch_norm_act_to_batch_renorm_raises_as_torch_s_does(qualified):
    cls = zoo_class(qualified)
    untracked = torch.nn.Sequential(build(cls, 8, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False") as theirs_error:
        tb.convert_model(untracked, norm="batchrenorm")
    with pytest.raises(ValueError, match="track_running_stats=False") as torch_error:
        tb.convert_model(torch.nn.BatchNorm2d(8, track_running_stats=False), norm="batchrenorm")
    assert str(theirs_error.value).split(" with ")[1] == str(torch_error.value).split(" with ")[1]


@pytest.mark.parametrize("qualified", FROZEN)
def test_frozen_layers_load_a_batch_norm_checkpoint(qualified):
    """As the zoos' frozen layers do: num_batches_tracked is dropped, strictly."""
    cls = zoo_class(qualified)
    theirs = build(cls, 8)
    ours = tb.convert_model(copy.deepcopy(theirs))
    state = build(torch.nn.BatchNorm2d, 8).state_dict()
    assert "num_batches_tracked" in state
    theirs.load_state_dict(state)
    ours.load_state_dict(state)
    assert "num_batches_tracked" in state  # the caller's dict is left as it was
    for name, t in ours.state_dict().items():
        assert torch.equal(t, state[name]), name
    x = testing.random_input((3, 8, 4, 5), torch.float32, seed=4)
    testing.assert_close_rel(ours(x), theirs(x).double(), torch.float32, f"{qualified} loaded")


@pytest.mark.parametrize("qualified", FROZEN)
def test_frozen_layers_are_left_alone_under_batch_renorm(qualified):
    """No batch statistics to renormalise: kept as the zoo's, and reported."""
    cls = zoo_class(qualified)
    out = tb.convert_model(torch.nn.Sequential(build(cls, 8)), norm="batchrenorm")
    assert type(out[0]) is cls
    ((converted, left, note),) = [r[1:] for r in tb.conversion_report(out) if r[0] == qualified]
    assert (converted, left) == (0, 1) and "norm='batchnorm'" in note


def test_a_subclass_and_an_unknown_norm_are_left_alone_and_reported():
    class MyRMSNorm(torch.nn.Module):  # looks like one; its semantics are unknown
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight

    class MyLayerNorm(tb.LayerNorm.__mro__[1]):  # a subclass of nn.LayerNorm
        pass

    model = torch.nn.Sequential(MyRMSNorm(), MyLayerNorm(4), torch.nn.LayerNorm(4))
    out = tb.convert_model(model, layernorm=True)
    assert type(out[0]) is MyRMSNorm and type(out[1]) is MyLayerNorm
    assert type(out[2]) is tb.LayerNorm
    rows = {name: (conv, left, note) for name, conv, left, note in tb.conversion_report(out)}
    assert rows["torch.nn.LayerNorm"][:2] == (1, 0)
    mine = [r for n, r in rows.items() if n.endswith("MyRMSNorm")]
    assert mine and mine[0][:2] == (0, 1) and "not verified" in mine[0][2]
    sub = [r for n, r in rows.items() if n.endswith("MyLayerNorm")]
    assert sub and sub[0][:2] == (0, 1) and "subclass" in sub[0][2]
    assert "MyRMSNorm" in str(tb.conversion_report(out))


# ---------------------------------------------------------------- models


def _timm(name, **kwargs):
    def make():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, **kwargs)

    return make


def _torchvision(name, **kwargs):
    def make():
        tv = pytest.importorskip("torchvision")
        return getattr(tv.models, name)(**kwargs)

    return make


def _frozen_resnet():
    tv = pytest.importorskip("torchvision")
    return tv.models.resnet18(norm_layer=tv.ops.misc.FrozenBatchNorm2d)


def _frozen_regnet():
    timm = pytest.importorskip("timm")
    model = timm.create_model("regnetx_002", pretrained=False)
    return timm.layers.freeze_batch_norm_2d(model)  # FrozenBatchNormAct2d throughout


def _causal_lm(config_name, **extra):
    def make():
        transformers = pytest.importorskip("transformers")
        config = getattr(transformers, config_name)(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **extra,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoModelForCausalLM.from_config(config)

    return make


def _t5():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=97,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


IMAGE = ("image", (2, 3, 64, 64))
VIT = ("image", (2, 3, 224, 224))
TOKENS = ("tokens", (2, 12))
MODELS = {
    "torchvision-convnext_tiny": (_torchvision("convnext_tiny"), IMAGE),
    "torchvision-resnet18-frozen_bn": (_frozen_resnet, IMAGE),
    "timm-vit_tiny_patch16_224": (_timm("vit_tiny_patch16_224"), VIT),
    "timm-convnext_atto": (_timm("convnext_atto"), IMAGE),
    # LayerNormAct2d (SiLU and Identity acts), and the same net with RmsNormAct2d.
    "timm-test_efficientnet_ln": (_timm("test_efficientnet_ln"), IMAGE),
    "timm-test_efficientnet_ln-rmsnorm2d": (
        _timm("test_efficientnet_ln", norm_layer="rmsnorm2d"),
        IMAGE,
    ),
    # Gemma 3n's vision encoder: RmsNormAct2d (GELU and Identity acts) and RmsNorm2d.
    "timm-mobilenetv5_base": (_timm("mobilenetv5_base"), IMAGE),
    # BatchNormAct2d: SiLU (inplace) and Identity acts; ReLU (inplace) and
    # Identity; LeakyReLU (inplace, slopes 1e-3 and 1e-2) and Identity.
    "timm-efficientnet_b0": (_timm("efficientnet_b0"), IMAGE),
    "timm-regnetx_002": (_timm("regnetx_002"), IMAGE),
    "timm-tresnet_m": (_timm("tresnet_m"), IMAGE),
    "timm-regnetx_002-frozen_bn": (_frozen_regnet, IMAGE),
    "llama": (_causal_lm("LlamaConfig"), TOKENS),
    "mistral": (_causal_lm("MistralConfig"), TOKENS),
    "qwen2": (_causal_lm("Qwen2Config"), TOKENS),
    "qwen3": (_causal_lm("Qwen3Config", head_dim=16), TOKENS),
    "gemma": (_causal_lm("GemmaConfig", head_dim=16), TOKENS),
    "phi3": (_causal_lm("Phi3Config", pad_token_id=0), TOKENS),
    "t5": (_t5, ("seq2seq", (2, 12))),
}


def _inputs(kind, shape):
    gen = torch.Generator().manual_seed(11)
    if kind == "image":
        return {"x": torch.randn(shape, generator=gen)}
    ids = torch.randint(1, 97, shape, generator=gen)
    if kind == "seq2seq":
        return {"input_ids": ids, "labels": torch.randint(1, 97, shape, generator=gen)}
    return {"input_ids": ids, "labels": ids}


def _step(model, inputs):
    """One training step's loss (backward run)."""
    if "x" in inputs:
        out = model(inputs["x"])
        loss = out.to(torch.promote_types(out.dtype, torch.float32)).square().mean()
    else:
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach()


def _norm_leaves(model):
    return [m for m in model.modules() if zoo.lookup(m) is not None]


def assert_batch_norm_model_alike(ours, theirs, exact, name):
    """After a training step: every gradient and running statistic of ours is
    as close to timm's model computed in float64 (`exact`) as timm's own
    float32 one is. Compared with each other instead, some would be noise
    against noise: where training-mode Batch Norm makes the exact value zero
    (the gradient of a bias ahead of a 1x1 convolution and a Batch Norm; the
    running mean of a normalised input mixed by a 1x1 convolution), each
    float32 result is rounding noise alone (EfficientNet has such layers)."""

    def as_accurate(mine, timm_s, exact_s, what):
        err, timm_err = testing.rel_err(mine, exact_s), testing.rel_err(timm_s, exact_s)
        # float32's bound where timm's is as accurate as that, room for noise
        # of another summation order where it is not.
        bound = max(10 * testing.REL_TOL[torch.float32], 5 * timm_err)
        assert err <= bound, f"{name} {what}: {err:.3g} from float64, timm's {timm_err:.3g}"

    theirs_p, exact_p = dict(theirs.named_parameters()), dict(exact.named_parameters())
    for pname, p in ours.named_parameters():
        assert (p.grad is None) == (theirs_p[pname].grad is None), pname
        if p.grad is not None:
            as_accurate(p.grad, theirs_p[pname].grad, exact_p[pname].grad, f"grad {pname}")
    theirs_b, exact_b = dict(theirs.named_buffers()), dict(exact.named_buffers())
    assert dict(ours.named_buffers()).keys() == theirs_b.keys()
    for bname, b in ours.named_buffers():
        if b.is_floating_point():
            as_accurate(b, theirs_b[bname], exact_b[bname], bname)
        else:
            assert torch.equal(b, theirs_b[bname]), bname


SLOW_MODELS = {"timm-mobilenetv5_base"}  # 83M parameters: a step takes seconds on a CPU
# Batch Norm with live statistics: the step runs in training mode (batch
# statistics, running statistics updated), then an eval forward.
BATCH_NORM_MODELS = {"timm-efficientnet_b0", "timm-regnetx_002", "timm-tresnet_m"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n for n in MODELS]
)
def test_model_converts_every_norm_and_trains_alike(name):
    make, (kind, shape) = MODELS[name]
    torch.manual_seed(0)
    theirs = make()
    ours = tb.convert_model(copy.deepcopy(theirs), layernorm=True)
    # Every norm layer converted: none of the registry's classes or torch's left.
    left = [(n, c, k, why) for n, c, k, why in tb.conversion_report(ours) if k]
    assert not left, left
    assert _norm_leaves(theirs) and not _norm_leaves(ours)
    inputs = _inputs(kind, shape)
    # Batch Norm models train (their dropout and drop-path rates are 0 by
    # default); the others run in eval, dropout and stochastic depth off, as
    # their norms compute the same in either mode.
    training = name in BATCH_NORM_MODELS
    theirs.train(training), ours.train(training)
    exact = copy.deepcopy(theirs).double() if training else None
    # From the same random state: dropout, where there is some, draws alike.
    torch.manual_seed(1)
    lo = _step(ours, inputs)
    torch.manual_seed(1)
    lt = _step(theirs, inputs)
    testing.assert_close_rel(lo, lt.double(), torch.float32, f"{name} loss")
    if training:
        torch.manual_seed(1)
        _step(exact, {"x": inputs["x"].double()})
        assert_batch_norm_model_alike(ours, theirs, exact, name)
        theirs.eval(), ours.eval()
        with torch.no_grad():
            yo, yt = ours(inputs["x"]), theirs(inputs["x"])
        # Two float32 results through a deep net, compared with each other.
        testing.assert_close_rel(yo, yt.double(), torch.float32, f"{name} eval", 10)
    else:
        params = dict(theirs.named_parameters())
        for pname, p in ours.named_parameters():
            if p.grad is not None:
                testing.assert_close_rel(
                    p.grad, params[pname].grad.double(), torch.float32, f"{name} grad {pname}", 10
                )
    # state_dict round trip and revert.
    state = ours.state_dict()
    assert list(state) == list(theirs.state_dict())
    back = tb.revert_model(ours)
    assert [type(m) for m in back.modules()] == [type(m) for m in theirs.modules()]
    fresh = make()
    fresh.load_state_dict(state)


@pytest.mark.parametrize("name", ["llama", "gemma", "qwen3"])
def test_llm_under_bf16_autocast(name):
    make, (kind, shape) = MODELS[name]
    torch.manual_seed(0)
    theirs = make().eval()
    ours = tb.convert_model(copy.deepcopy(theirs), layernorm=True)
    inputs = _inputs(kind, shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lo, lt = _step(ours, inputs), _step(theirs, inputs)
    testing.assert_close_rel(lo, lt.double(), torch.bfloat16, f"{name} bf16 loss")
    params = dict(theirs.named_parameters())
    for pname, p in ours.named_parameters():
        if p.grad is not None and "norm" in pname:
            testing.assert_close_rel(
                p.grad, params[pname].grad.double(), torch.bfloat16, f"{name} grad {pname}", 4
            )


@pytest.mark.slow
def test_converted_decoder_layer_compiles_without_graph_breaks():
    transformers = pytest.importorskip("transformers")
    model = tb.convert_model(_causal_lm("LlamaConfig")(), layernorm=True).eval()
    layer = model.model.layers[0]
    hidden = torch.randn(2, 12, 64, requires_grad=True)
    position_ids = torch.arange(12)[None].expand(2, -1)
    embeddings = model.model.rotary_emb(hidden, position_ids)
    assert isinstance(layer.input_layernorm, tb.modules.zoo.CastingRMSNorm)
    del transformers

    def run(h):
        out = layer(h, position_embeddings=embeddings, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    y = compiled(hidden)
    torch.testing.assert_close(y, run(hidden), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert hidden.grad is not None


def test_sync_batch_norm_act_is_a_top_level_name():
    """Issue 20 names the sync variant beside BatchNormAct2d and InPlaceABNSync."""
    assert tb.SyncBatchNormAct is tb.modules.zoo.SyncBatchNormAct
    assert "SyncBatchNormAct" in tb.__all__
    assert issubclass(tb.SyncBatchNormAct, tb.SyncBatchNorm)
