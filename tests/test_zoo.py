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
    """An instance with random affine parameters (the zoos initialise them
    to ones/zeros, which would hide a swapped or dropped weight); `options`
    go to the constructor."""
    name = cls.__name__
    if name == "FrozenBatchNorm2d":
        m = cls(channels, eps=1e-3)
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
    elif name in ("LayerNorm", "LayerNorm2d", "RmsNorm", "RmsNorm2d"):
        m = cls(channels, eps=1e-5) if "timm" in cls.__module__ else cls(channels)
    else:
        m = cls(channels, eps=1e-5, **options)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in list(m.parameters()) + [getattr(m, "weight", None), getattr(m, "bias", None)]:
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + 1.0)
    return m


def sample(cls, channels, dtype):
    four_d = cls.__name__.endswith("2d")
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
    "silu-inplace": {"act_layer": "silu", "inplace": True},
    "prelu": {"act_layer": torch.nn.PReLU},  # parameters of its own: state_dict keys
    "apply_act-false": {"apply_act": False},
    "dropout": {"drop_layer": lambda: torch.nn.Dropout(0.3)},
    "no-affine": {"affine": False, "act_layer": "gelu"},
}


@pytest.mark.parametrize("option", list(ACT_OPTIONS))
@pytest.mark.parametrize("qualified", NORM_ACT)
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


TIMM = [q for q in REGISTERED if q.startswith("timm.")]


@pytest.mark.parametrize("qualified", TIMM)
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
        loss = out.float().square().mean()
    else:
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach()


def _norm_leaves(model):
    return [m for m in model.modules() if zoo.lookup(m) is not None]


SLOW_MODELS = {"timm-mobilenetv5_base"}  # 83M parameters: a step takes seconds on a CPU


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
    # Dropout and stochastic depth off; none of these models' norms behaves
    # differently in eval (no Batch Norm with live statistics among them).
    theirs.eval(), ours.eval()
    lo, lt = _step(ours, inputs), _step(theirs, inputs)
    testing.assert_close_rel(lo, lt.double(), torch.float32, f"{name} loss")
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
