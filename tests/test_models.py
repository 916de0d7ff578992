"""MambaOut against timm's reference implementation, the model API, and the model registry."""

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from mambaout_pl.models import (
    MambaOut,
    MixerSpec,
    UnknownModelError,
    create_model,
    list_models,
    register_model,
    registry,
)
from mambaout_pl.models import mambaout as mambaout_module

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

# Exact parameter counts from the paper (PAPER_FACTS.md).
PAPER_PARAMS = {
    "mambaout_femto": 7_304_536,
    "mambaout_kobe": 9_141_208,
    "mambaout_tiny": 26_545_096,
    "mambaout_small": 48_488_072,
    "mambaout_base": 84_813_092,
}

INPUT_SIZES = [(64, 64), (64, 96)]
ATOL = 1e-4


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_model(**kwargs) -> MambaOut:
    """A two-block-per-stage MambaOut that runs in milliseconds."""
    torch.manual_seed(0)
    args = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), num_classes=10)
    return MambaOut(**dict(args, **kwargs))


# Parity with timm


def test_training_step_matches_timm():
    """Gradients through the fused Gated CNN blocks equal those of timm's plain blocks."""
    torch.manual_seed(0)
    reference = timm.create_model("mambaout_femto", pretrained=False, num_classes=10)
    ours = create_model("mambaout_femto", num_classes=10)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 96)
    target = torch.tensor([3, 7])
    for model in (ours, reference):
        nn.functional.cross_entropy(model(x), target).backward()
    reference_grads = dict(reference.named_parameters())
    for name, parameter in ours.named_parameters():
        expected = reference_grads[name].grad
        torch.testing.assert_close(parameter.grad, expected, atol=1e-5 * expected.abs().max().item() + 1e-8, rtol=1e-4)


@pytest.mark.parametrize("act_layer", ["gelu", "silu"])
@pytest.mark.parametrize("conv_ratio", [1.0, 0.5])
def test_fused_block_matches_plain_block(act_layer, conv_ratio):
    torch.manual_seed(0)
    act = mambaout_module.get_act_layer(act_layer)
    fused = mambaout_module.GatedCNNBlock(24, conv_ratio=conv_ratio, act_layer=act)
    plain = mambaout_module.GatedCNNBlock(24, conv_ratio=conv_ratio, act_layer=act, fused=False)
    plain.load_state_dict(fused.state_dict())
    assert fused.fused_activation == act_layer and plain.fused_activation is None
    x = torch.randn(2, 7, 9, 24)
    outputs = {}
    for name, block in (("fused", fused), ("plain", plain)):
        inputs = x.clone().requires_grad_()
        out = block(inputs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs[name] = [out, inputs.grad] + [p.grad for p in block.parameters()]
    assert (
        len(outputs["fused"]) == len(outputs["plain"]) == 2 + 8
    )  # output, input grad, then norm, fc1, conv, fc2 weights and biases
    for got, expected in zip(outputs["fused"], outputs["plain"]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_bf16, plain_bf16 = fused(x), plain(x)
    assert fused_bf16.dtype == plain_bf16.dtype
    torch.testing.assert_close(fused_bf16.float(), plain_bf16.float(), atol=0.05, rtol=0.05)


def test_fused_blocks_can_be_turned_off():
    fused, plain = create_model("mambaout_femto"), create_model("mambaout_femto", fused_blocks=False)
    assert {b.fused_activation for b in fused.modules() if isinstance(b, mambaout_module.GatedCNNBlock)} == {"gelu"}
    assert {b.fused_activation for b in plain.modules() if isinstance(b, mambaout_module.GatedCNNBlock)} == {None}
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), plain.eval()(x), atol=1e-5, rtol=0)


def test_fused_path_only_for_what_it_computes():
    assert mambaout_module.GatedCNNBlock(16, act_layer=nn.GELU).fused_activation == "gelu"
    assert mambaout_module.GatedCNNBlock(16, act_layer=lambda: nn.GELU(approximate="tanh")).fused_activation is None
    assert mambaout_module.GatedCNNBlock(16, act_layer=nn.ReLU).fused_activation is None
    assert (
        mambaout_module.GatedCNNBlock(16, token_mixer=MixerSpec("gated_conv", {"causal": True})).fused_activation
        is None
    )
    assert mambaout_module.GatedCNNBlock(16, token_mixer="attention").fused_activation is None


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_timm(name):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    ours = create_model(name).eval()

    assert num_params(ours) == num_params(reference)
    if name in PAPER_PARAMS:
        assert num_params(ours) == PAPER_PARAMS[name]
    ours.load_state_dict(reference.state_dict(), strict=True)

    for height, width in INPUT_SIZES:
        x = torch.randn(1, 3, height, width)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), atol=ATOL, rtol=0)
            features = ours.forward_features(x)
            torch.testing.assert_close(features, reference.forward_features(x), atol=ATOL, rtol=0)
            torch.testing.assert_close(
                ours.forward_head(features, pre_logits=True),
                reference.forward_head(features, pre_logits=True),
                atol=ATOL,
                rtol=0,
            )
            final, intermediates = ours.forward_intermediates(x)
            ref_final, ref_intermediates = reference.forward_intermediates(x)
        torch.testing.assert_close(final, ref_final, atol=ATOL, rtol=0)
        assert len(intermediates) == len(ref_intermediates) == 4
        for ours_stage, ref_stage in zip(intermediates, ref_intermediates):
            torch.testing.assert_close(ours_stage, ref_stage, atol=ATOL, rtol=0)


def test_state_dict_keys_follow_timm():
    keys = create_model("mambaout_femto").state_dict().keys()
    assert "stages.0.blocks.0.conv.weight" in keys
    assert "stem.norm1.weight" in keys
    assert "head.pre_logits.norm.weight" in keys
    rw_keys = create_model("mambaout_small_rw").state_dict().keys()
    assert "stages.0.blocks.0.ls.gamma" in rw_keys
    assert "stem.norm1.weight" not in rw_keys
    assert "head.pre_logits.norm.weight" not in rw_keys


def test_pretrained_cfg():
    model = create_model("mambaout_tiny")
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == 1.0
    assert cfg["interpolation"] == "bicubic"
    assert cfg["num_classes"] == 1000
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert data_cfg["std"] == timm.data.IMAGENET_DEFAULT_STD


# Model API


def test_block_splits_channels():
    model = create_model("mambaout_femto")
    block = model.stages[0].blocks[0]
    assert block.split_sizes == (128, 128 - 48, 48)  # hidden = int(8/3 * 48)
    assert block.conv.weight.shape == (48, 1, 7, 7)


def test_layer_scale_init_value():
    model = small_model(ls_init_value=0.5)
    gammas = [block.ls.gamma for stage in model.stages for block in stage.blocks]
    assert all(torch.all(gamma == 0.5) for gamma in gammas)


def test_reset_classifier():
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 10)

    model.reset_classifier(5)
    assert model.num_classes == 5
    assert model.get_classifier().out_features == 5
    assert model(x).shape == (2, 5)

    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)
    assert model.head_hidden_size == 4 * model.num_features

    model.reset_classifier(3, global_pool="")
    assert model(x).shape == (2, 2, 2, 3)


def test_head_options():
    x = torch.randn(2, 3, 64, 64)
    no_hidden = small_model(head_hidden_size=0).eval()
    assert no_hidden.head_hidden_size == no_hidden.num_features == 64
    assert no_hidden(x).shape == (2, 10)
    wide = small_model(head_hidden_size=100, head_fn="norm_mlp").eval()
    assert wide.head_hidden_size == 100
    assert wide.forward_head(wide.forward_features(x), pre_logits=True).shape == (2, 100)
    assert small_model(in_chans=1)(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_drop_path_active_only_in_training():
    model = small_model(drop_path_rate=0.5)
    rates = [
        block.drop_path.drop_prob if hasattr(block.drop_path, "drop_prob") else 0.0
        for stage in model.stages
        for block in stage.blocks
    ]
    assert rates == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])

    x = torch.randn(2, 3, 64, 64)
    model.train()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    second = model(x)
    assert not torch.allclose(first, second)

    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


def test_head_dropout_active_only_in_training():
    model = small_model(drop_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


def test_grad_checkpointing_matches(monkeypatch):
    model = small_model().train()
    x = torch.randn(2, 3, 64, 64)

    def outputs_and_grads():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_out, plain_grads = outputs_and_grads()

    calls = []
    original = mambaout_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(mambaout_module, "checkpoint", counting_checkpoint)
    model.set_grad_checkpointing(True)
    ckpt_out, ckpt_grads = outputs_and_grads()

    assert len(calls) == 5  # one per block
    torch.testing.assert_close(ckpt_out, plain_out)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)

    calls.clear()
    with torch.no_grad():
        model.eval()(x)
    assert not calls


def test_layer_decay_optimizer():
    model = create_model("mambaout_femto")
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    scales = {group["lr_scale"] for group in optimizer.param_groups}
    assert len(scales) > 10
    assert max(scales) == pytest.approx(1.0)

    def scale_of(param):
        return next(g["lr_scale"] for g in optimizer.param_groups if any(p is param for p in g["params"]))

    assert scale_of(model.stem.conv1.weight) == min(scales)
    assert scale_of(model.head.fc.weight) == pytest.approx(1.0)
    assert scale_of(model.stages[1].downsample.conv.weight) == scale_of(model.stages[1].blocks[0].fc1.weight)
    assert scale_of(model.stages[0].blocks[0].fc1.weight) < scale_of(model.stages[0].blocks[1].fc1.weight)

    model(torch.randn(1, 3, 64, 64)).sum().backward()
    optimizer.step()


def test_feature_info_and_intermediates():
    model = create_model("mambaout_femto").eval()
    assert [f["num_chs"] for f in model.feature_info] == [48, 96, 192, 288]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["module"] for f in model.feature_info] == ["stages.0", "stages.1", "stages.2", "stages.3"]

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_intermediates(x, intermediates_only=True)
        for feature, info in zip(features, model.feature_info):
            assert feature.shape == (2, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
            assert feature.is_contiguous()

        final, last_two = model.forward_intermediates(x, indices=2)
        assert [f.shape[1] for f in last_two] == [192, 288]
        torch.testing.assert_close(final, model.forward_features(x))

        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early, features[:2])

        nhwc = model.forward_intermediates(x, indices=[-1], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], features[3].permute(0, 2, 3, 1))

    with pytest.raises(ValueError):
        model.forward_intermediates(x, indices=[4])


def test_prune_intermediate_layers():
    model = create_model("mambaout_femto").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert model.prune_intermediate_layers([1, 2]) == [1, 2]
    assert len(model.stages) == 3
    assert not any(name.startswith("head") for name, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, indices=[1, 2], intermediates_only=True), expected)


def test_init_weights():
    torch.manual_seed(0)
    model = create_model("mambaout_tiny")
    weight = model.stages[2].blocks[0].fc1.weight
    assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert weight.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert torch.all(model.stages[2].blocks[0].fc1.bias == 0)
    assert torch.all(model.stages[0].blocks[0].conv.bias == 0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="head_fn"):
        small_model(head_fn="linear")
    with pytest.raises(ValueError, match="downsample"):
        small_model(downsample="pool")
    with pytest.raises(ValueError, match="global_pool"):
        small_model(global_pool="token")


# Registry


def test_list_models():
    assert set(VARIANTS) <= set(list_models())
    assert list_models() == sorted(list_models())
    assert list_models("mambaout_base*") == [
        "mambaout_base",
        "mambaout_base_plus_rw",
        "mambaout_base_short_rw",
        "mambaout_base_tall_rw",
        "mambaout_base_wide_rw",
    ]


def test_create_model_passes_arguments():
    model = create_model("mambaout_femto", num_classes=7, drop_path_rate=0.1)
    assert isinstance(model, MambaOut)
    assert model.num_classes == 7
    assert model.stages[3].blocks[2].drop_path.drop_prob == pytest.approx(0.1)
    assert isinstance(create_model("mambaout_femto.in1k"), MambaOut)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="'mambaout_fento'") as excinfo:
        create_model("mambaout_fento")
    assert isinstance(excinfo.value, ValueError)
    message = str(excinfo.value)
    assert "mambaout_femto" in message
    assert "list_models" in message


def test_timm_fallback():
    model = create_model("resnet18", num_classes=3)
    assert isinstance(model, timm.models.ResNet)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_timm_prefixed_names_pass_through(monkeypatch):
    calls = []

    def fake_create_model(name, **kwargs):
        calls.append((name, kwargs))
        return nn.Identity()

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    create_model("hf-hub:timm/mambaout_femto.in1k", num_classes=3)
    create_model("resnet18.a1_in1k")
    assert calls == [
        ("hf-hub:timm/mambaout_femto.in1k", {"pretrained": False, "num_classes": 3}),
        ("resnet18.a1_in1k", {"pretrained": False}),
    ]


def test_dotted_class_path():
    linear = create_model("torch.nn.Linear", in_features=4, out_features=2)
    assert isinstance(linear, nn.Linear)
    assert linear.out_features == 2

    tiny = create_model(f"{__name__}.TinyNet", width=3)
    assert isinstance(tiny, TinyNet)
    assert tiny.width == 3

    with pytest.raises(UnknownModelError, match="NoSuchNet"):
        create_model("torch.nn.NoSuchNet")


class TinyNet(nn.Module):
    def __init__(self, width: int = 2):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))


def test_register_user_models(isolated_registry):
    @register_model
    def my_backbone(width: int = 8) -> nn.Module:
        return nn.Linear(width, width)

    @register_model("my_classifier")
    class MyClassifier(nn.Module):
        def __init__(self, num_classes: int = 4):
            super().__init__()
            self.fc = nn.Linear(2, num_classes)

    assert {"my_backbone", "my_classifier"} <= set(list_models("my_*"))
    assert create_model("my_backbone", width=5).in_features == 5
    assert isinstance(create_model("my_classifier", num_classes=3), MyClassifier)
    assert create_model("my_classifier", num_classes=3).fc.out_features == 3

    with pytest.warns(UserWarning, match="already registered"):
        register_model(name="my_backbone")(lambda: nn.Identity())
    assert isinstance(create_model("my_backbone"), nn.Identity)


def test_pretrained_tags_reach_functions_taking_pretrained_cfg(isolated_registry, tmp_path):
    calls = []

    @register_model
    def tagged_net(pretrained_cfg=None, width: int = 2) -> nn.Module:
        calls.append(("tagged", pretrained_cfg))
        return nn.Linear(width, 1)

    @register_model
    def timm_style_net(pretrained: bool = False, **kwargs) -> nn.Module:
        calls.append(("timm_style", pretrained))
        return nn.Linear(2, 1)

    create_model("tagged_net.my_tag", width=3)
    create_model("tagged_net")
    create_model("tagged_net.my_tag", pretrained_cfg="other_tag")
    torch.manual_seed(0)
    weights = nn.Linear(2, 1)
    torch.save(weights.state_dict(), tmp_path / "net.pth")
    loaded = create_model("timm_style_net.any_tag", pretrained=str(tmp_path / "net.pth"))
    assert calls == [("tagged", "my_tag"), ("tagged", None), ("tagged", "other_tag"), ("timm_style", False)]
    torch.testing.assert_close(loaded.weight, weights.weight, atol=0, rtol=0)


def test_create_model_rejects_boolean_pretrained():
    with pytest.raises(ValueError, match="path"):
        create_model("mambaout_femto", pretrained=True)
