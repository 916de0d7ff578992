"""The checks of timm's own model test-suite (`tests/test_models.py` of pytorch-image-models) on our registry.

Every check runs on all ten variants, against timm's model where timm has one: the structural
checks at full size on the meta device, the numerical ones on each variant's own layer options
(activation, ratios, downsampling, layer scale, head) with small depths and widths, and the
full-size forward passes on femto.
"""

import copy
import math

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules, set_scriptable
from timm.models import adapt_input_conv
from timm.models._features import FeatureGetterNet, FeatureListNet
from timm.optim import create_optimizer_v2
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from mambaout_pl.models import create_model, load_pretrained
from mambaout_pl.models.mambaout import GatedCNNBlock

VARIANTS = [
    "mambaout_femto",
    "mambaout_kobe",
    "mambaout_tiny",
    "mambaout_small",
    "mambaout_base",
    "mambaout_small_rw",
    "mambaout_base_short_rw",
    "mambaout_base_tall_rw",
    "mambaout_base_wide_rw",
    "mambaout_base_plus_rw",
]
RW_VARIANTS = [name for name in VARIANTS if name.endswith("_rw")]
PRETRAINED_TAGS = [name for name in timm.list_pretrained("mambaout_*") if name.split(".")[0] in VARIANTS]
# Each variant's own options with few, narrow blocks: the same code paths in milliseconds.
SMALL = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))
ATOL = 1e-4


def small_pair(name: str, **kwargs) -> tuple[nn.Module, nn.Module]:
    """Ours and timm's small `name`, built from the same seed (so with the same weights)."""
    torch.manual_seed(0)
    ours = create_model(name, **SMALL, **kwargs)
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, **SMALL, **kwargs)
    return ours, reference


def images(size: int = 64, batch: int = 1, in_chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, in_chans, size, size, generator=torch.Generator().manual_seed(1))


def assert_same_state(model: nn.Module, reference: nn.Module) -> None:
    state, reference_state = model.state_dict(), reference.state_dict()
    assert list(state) == list(reference_state)
    for key, value in reference_state.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0, msg=key)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# Structure: names, order and shapes of the parameters, the pretrained cfgs.


@pytest.mark.parametrize("name", VARIANTS)
def test_parameters_in_timms_order(name):
    """Same state-dict keys in the same order and same parameter shapes: a timm optimizer state fits."""
    with torch.device("meta"):
        ours, reference = create_model(name), timm.create_model(name, pretrained=False)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in reference.parameters()]
    assert ours.num_features == reference.num_features > 0
    assert ours.head_hidden_size == reference.head_hidden_size > 0
    assert ours.feature_info == reference.feature_info
    if name in RW_VARIANTS:
        keys = list(ours.state_dict())
        assert keys.index("stages.1.downsample.norm.weight") < keys.index("stages.1.downsample.conv.weight")


@pytest.mark.parametrize("name", VARIANTS)
def test_same_seed_gives_timms_weights(name):
    """Same initialisation as timm's, layer scale included (timm's `_rw` blocks start at 1e-5)."""
    ours, reference = small_pair(name)
    assert_same_state(ours, reference)
    gammas = [m.ls.gamma for m in ours.modules() if isinstance(m, GatedCNNBlock) and not isinstance(m.ls, nn.Identity)]
    if name in RW_VARIANTS:
        assert len(gammas) == sum(SMALL["depths"])
        assert all(torch.all(gamma == 1e-5) for gamma in gammas)
    else:
        assert not gammas


@pytest.mark.parametrize("name", PRETRAINED_TAGS)
def test_pretrained_tag_cfg(name):
    """A tagged name builds the tag's cfg and defaults, as timm's `create_model(name)`."""
    with torch.device("meta"):
        ours, reference = create_model(name), timm.create_model(name, pretrained=False)
    cfg = ours.pretrained_cfg
    assert cfg == reference.pretrained_cfg == timm.models.get_pretrained_cfg(name).to_dict()
    assert ours.default_cfg is cfg
    assert cfg["tag"] == name.split(".", 1)[1]
    assert ours.num_classes == reference.num_classes == cfg["num_classes"]
    assert ours.get_classifier().out_features == cfg["num_classes"]
    state = ours.state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    reduction = ours.feature_info[-1]["reduction"]
    assert tuple(cfg["pool_size"]) == tuple(size // reduction for size in cfg["input_size"][1:])


def test_pretrained_tags_keep_their_settings():
    with torch.device("meta"):
        in12k = create_model("mambaout_base_plus_rw.sw_e150_in12k")
        r384 = create_model("mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k")
        default = create_model("mambaout_base_plus_rw")
        overridden = create_model("mambaout_base_plus_rw.sw_e150_in12k", num_classes=10)
    assert in12k.num_classes == 11821 and in12k.head.fc.out_features == 11821
    assert r384.pretrained_cfg["input_size"] == (3, 384, 384)
    assert r384.pretrained_cfg["pool_size"] == (12, 12)
    assert r384.pretrained_cfg["crop_mode"] == "squash"
    assert timm.data.resolve_data_config({}, model=r384)["input_size"] == (3, 384, 384)
    assert default.pretrained_cfg["tag"] == "sw_e150_in12k_ft_in1k" and default.num_classes == 1000
    assert overridden.num_classes == 10
    with pytest.raises(ValueError, match=r"Unknown pretrained tag 'in22k' for mambaout_femto; its tags are in1k"):
        create_model("mambaout_femto.in22k")


# Forward and backward (timm's test_model_forward, test_model_backward, test_model_default_cfgs).


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_and_timm_outputs(name):
    ours, reference = small_pair(name)
    x = images()
    ours.eval(), reference.eval()
    output = ours(x)
    assert output.shape == (1, 1000) and not torch.isnan(output).any()
    torch.testing.assert_close(output, reference(x), atol=ATOL, rtol=0)
    ours.set_grad_checkpointing()
    torch.testing.assert_close(ours(x), output, atol=1e-5, rtol=1e-4)

    torch.manual_seed(0)
    model = create_model(name, num_classes=42, **SMALL).train()
    outputs = model(images(batch=2))
    outputs.mean().backward()
    assert outputs.shape == (2, 42) and not torch.isnan(outputs).any()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def check_default_cfg_forward(model_name: str, size: int, **kwargs) -> None:
    """timm's test_model_default_cfgs: unpooled features, pre-logits and the classifier removed two ways."""
    model = create_model(model_name, **kwargs).eval()
    pool = size // model.feature_info[-1]["reduction"]
    x = images(size)
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape == (1, pool, pool, model.num_features)  # NHWC, as model.output_fmt says
    assert model.output_fmt == "NHWC"
    assert pre_logits.shape == (1, model.head_hidden_size)

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model(x)
    assert outputs.shape == pre_logits.shape
    torch.testing.assert_close(outputs, pre_logits, atol=0, rtol=0)

    model.reset_classifier(0, "")
    assert model(x).shape == (1, pool, pool, model.head_hidden_size)
    headless = create_model(model_name, num_classes=0, global_pool="", **kwargs).eval()
    assert headless(x).shape == (1, pool, pool, headless.head_hidden_size)


def test_default_cfg_forward_at_default_size():
    size = create_model("mambaout_femto").pretrained_cfg["input_size"][-1]
    assert size == 224
    check_default_cfg_forward("mambaout_femto", size)


@pytest.mark.parametrize("name", VARIANTS)
def test_default_cfg_forward(name):
    check_default_cfg_forward(name, 64, **SMALL)


@pytest.mark.parametrize("name", ["mambaout_femto", "mambaout_small_rw"])
def test_reset_classifier_reset_other(name):
    """`reset_other=True` removes the head's norm and hidden layer, as timm 1.0.31's."""
    ours, reference = small_pair(name)
    x = images()
    for model in (ours, reference):
        model.eval().reset_classifier(5, reset_other=True)
        assert isinstance(model.head.norm, nn.Identity) and isinstance(model.head.pre_logits, nn.Identity)
        assert model.head_hidden_size == model.num_features == SMALL["dims"][-1]
        assert model.get_classifier().in_features == model.num_features
        assert model.num_classes == 5 and model(x).shape == (1, 5)
    torch.testing.assert_close(
        ours.forward_head(ours.forward_features(x), pre_logits=True),
        reference.forward_head(reference.forward_features(x), pre_logits=True),
        atol=ATOL,
        rtol=0,
    )
    assert [k for k in ours.state_dict() if k.startswith("head.")] == ["head.fc.weight", "head.fc.bias"]


# Intermediates and feature models (test_model_forward_intermediates, test_model_forward_features).


@pytest.mark.parametrize("name", ["mambaout_kobe", "mambaout_base_wide_rw"])
@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"indices": 2},
        {"indices": [0, -1], "output_fmt": "NHWC"},
        {"indices": [1, 2], "stop_early": True, "norm": True},
        {"indices": (1, 3), "intermediates_only": True},
    ],
)
def test_forward_intermediates_match_timm(name, arguments):
    ours, reference = small_pair(name)
    ours.eval(), reference.eval()
    x = images(64)
    got, expected = ours.forward_intermediates(x, **arguments), reference.forward_intermediates(x, **arguments)
    if not arguments.get("intermediates_only"):
        (got_final, got), (expected_final, expected) = got, expected
        torch.testing.assert_close(got_final, expected_final, atol=ATOL, rtol=0)
        if not arguments.get("stop_early"):
            torch.testing.assert_close(got_final, ours.forward_features(x), atol=0, rtol=0)
    assert len(got) == len(expected)
    for ours_feature, reference_feature in zip(got, expected):
        torch.testing.assert_close(ours_feature, reference_feature, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_intermediates_shapes(name):
    """timm's test_model_forward_intermediates, grad-checkpointing included."""
    model = create_model(name, **SMALL).eval()
    x = images(64)
    final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert [i.shape[1] for i in intermediates] == [info["num_chs"] for info in model.feature_info]
    for feature, info in zip(intermediates, model.feature_info):
        assert feature.shape[-2:] == (math.ceil(64 / info["reduction"]),) * 2
    torch.testing.assert_close(final, model.forward_features(x), atol=0, rtol=0)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("indices", [1, [1, 2], (0, 3)])
@pytest.mark.parametrize("name", ["mambaout_femto", "mambaout_small_rw"])
def test_prune_intermediate_layers_match_timm(name, indices):
    ours, reference = small_pair(name)
    ours.eval(), reference.eval()
    x = images(64)
    assert ours.prune_intermediate_layers(indices) == reference.prune_intermediate_layers(indices)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert (ours.num_features, ours.head_hidden_size, ours.num_classes) == (
        reference.num_features,
        reference.head_hidden_size,
        reference.num_classes,
    )
    got = ours.forward_intermediates(x, indices=indices, intermediates_only=True)
    expected = reference.forward_intermediates(x, indices=indices, intermediates_only=True)
    for ours_feature, reference_feature in zip(got, expected):
        torch.testing.assert_close(ours_feature, reference_feature, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "feature_args",
    [
        {},
        {"out_indices": (1, 2, 3)},
        {"out_indices": (1, 2, 3), "feature_cls": "getter"},
    ],
)
@pytest.mark.parametrize("name", VARIANTS)
def test_features_only_like_timm(name, feature_args):
    ours, reference = small_pair(name, features_only=True, **feature_args)
    ours.eval(), reference.eval()
    expected_class = FeatureGetterNet if feature_args.get("feature_cls") == "getter" else FeatureListNet
    assert type(ours) is type(reference) is expected_class
    assert ours.feature_info.channels() == reference.feature_info.channels()
    assert ours.feature_info.reduction() == reference.feature_info.reduction()
    out_indices = feature_args.get("out_indices", (0, 1, 2, 3))
    assert ours.feature_info.channels() == [SMALL["dims"][i] for i in out_indices]
    assert ours.feature_info.reduction() == [(4, 8, 16, 32)[i] for i in out_indices]
    assert ours.pretrained_cfg == reference.pretrained_cfg
    assert_same_state(ours, reference)
    x = images(64)
    got, expected = ours(x), reference(x)
    assert len(got) == len(expected) == len(out_indices)
    channel_axis = 1 if str(getattr(ours, "output_fmt", "NCHW")).endswith("NCHW") else -1
    for feature, reference_feature, channels in zip(got, expected, ours.feature_info.channels()):
        assert feature.shape[channel_axis] == channels
        torch.testing.assert_close(feature, reference_feature, atol=ATOL, rtol=0)


# TorchScript and torch.fx (test_model_forward_torchscript, test_model_forward_fx, test_model_backward_fx).


@pytest.mark.parametrize("name", VARIANTS)
def test_torchscript(name):
    """Scripted models run the plain block code (the fused function is not scriptable) and give the same logits."""
    model = create_model(name, **SMALL).eval()
    assert any(block.fused_activation for block in model.modules() if isinstance(block, GatedCNNBlock))
    scripted = torch.jit.script(model)
    x = images(64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-4)
    with set_scriptable(True):
        plain = create_model(name, **SMALL)
    assert not any(block.fused_activation for block in plain.modules() if isinstance(block, GatedCNNBlock))
    assert torch.jit.script(plain.eval())(x).shape == (1, 1000)


def fx_model(model: nn.Module, train: bool = False) -> nn.Module:
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_forward_and_backward(name):
    """Traced models call the same fused function (a leaf of the graph), so their logits are identical."""
    model = create_model(name, **SMALL).eval()
    x = images(64)
    with torch.inference_mode():
        expected = model(x)
        traced = fx_model(model)
        assert torch.equal(next(iter(traced(x).values())), expected)

    model = create_model(name, num_classes=42, **SMALL).train()
    traced = fx_model(model, train=True)
    outputs = next(iter(traced(images(64, batch=2)).values()))
    outputs.mean().backward()
    assert outputs.shape == (2, 42)
    assert all(p.grad is not None for p in traced.parameters())


@pytest.mark.parametrize("name", ["mambaout_femto", "mambaout_base_wide_rw"])
def test_fx_then_torchscript(name):
    """timm's test_model_forward_fx_torchscript: a model built scriptable, traced, then scripted."""
    with set_scriptable(True):
        model = create_model(name, **SMALL).eval()
    scripted = torch.jit.script(fx_model(model))
    x = images(64)
    with torch.inference_mode():
        torch.testing.assert_close(next(iter(scripted(x).values())), model(x), atol=1e-5, rtol=1e-4)


# Pretrained weights into other input channels (test_model_load_pretrained with in_chans != 3).


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory):
    torch.manual_seed(0)
    reference = timm.create_model("mambaout_small_rw", pretrained=False, **SMALL).eval()
    path = tmp_path_factory.mktemp("weights") / "mambaout_small_rw.pth"
    torch.save(reference.state_dict(), path)
    return path, reference


@pytest.mark.parametrize("in_chans", [1, 4, 13])
def test_in_chans_adapts_first_conv(rgb_weights, in_chans):
    path, reference = rgb_weights
    model = create_model("mambaout_small_rw", pretrained=path, in_chans=in_chans, **SMALL).eval()
    rgb = reference.stem.conv1.weight.detach()
    torch.testing.assert_close(model.stem.conv1.weight, adapt_input_conv(in_chans, rgb), atol=0, rtol=0)
    assert model.stem.conv1.weight.shape == (8, in_chans, 3, 3)
    torch.testing.assert_close(model.stages[2].blocks[1].fc1.weight, reference.stages[2].blocks[1].fc1.weight)

    # On a gray image, channel c of the adapted conv acts as RGB channel c % 3 scaled by 3 / in_chans
    # (one channel: the sum of the RGB weights), so the model sees the RGB image scaled per channel.
    gray = images(64, in_chans=1)
    uses = torch.bincount(torch.arange(in_chans) % 3, minlength=3).float()
    scale = torch.ones(3) if in_chans == 1 else uses * 3 / in_chans
    with torch.no_grad():
        torch.testing.assert_close(
            model(gray.expand(-1, in_chans, -1, -1)), reference(gray * scale.view(1, 3, 1, 1)), atol=ATOL, rtol=0
        )

    fresh = create_model("mambaout_small_rw", in_chans=in_chans, num_classes=5, **SMALL)
    with pytest.warns(UserWarning, match="classifier"):
        load_pretrained(fresh, path)
    torch.testing.assert_close(fresh.stem.conv1.weight, adapt_input_conv(in_chans, rgb), atol=0, rtol=0)
    with pytest.warns(UserWarning, match="skipped head.fc.weight"):
        headless = create_model("mambaout_small_rw", pretrained=path, in_chans=in_chans, num_classes=0, **SMALL)
    assert headless.num_classes == 0


def test_features_only_loads_weights_before_wrapping(rgb_weights):
    """test_model_features_pretrained: weights load into the model a feature wrapper then holds."""
    path, reference = rgb_weights
    features = create_model("mambaout_small_rw", pretrained=path, features_only=True, out_indices=(1, 2, 3), **SMALL)
    expected = reference.forward_intermediates(
        images(64), indices=(1, 2, 3), output_fmt="NHWC", intermediates_only=True
    )
    with torch.no_grad():
        for got, want in zip(features.eval()(images(64)), expected):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_timm_optimizer_state_resumes_on_our_model():
    """An AdamW state saved while training timm's model continues on ours exactly as on timm's."""
    ours, reference = small_pair("mambaout_base_wide_rw", num_classes=3)
    x, target = images(64, batch=2), torch.tensor([0, 2])
    optimizers = [create_optimizer_v2(m, "adamw", lr=1e-2, weight_decay=0.05) for m in (ours, reference)]

    def step(model, optimizer):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model.train()(x), target).backward()
        optimizer.step()

    step(reference, optimizers[1])
    ours.load_state_dict(reference.state_dict())
    optimizers[0].load_state_dict(copy.deepcopy(optimizers[1].state_dict()))  # as read back from a file
    for model, optimizer in zip((ours, reference), optimizers):
        step(model, optimizer)
    for (name, got), expected in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)
