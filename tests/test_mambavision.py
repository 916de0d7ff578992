"""MambaVision against NVIDIA's `mambavision` package: weights, logits, stage outputs, and the model contract.

The official package imports `selective_scan_fn` from `mamba_ssm`, a CUDA-only kernel that cannot
run here. A test double stands in for it at that boundary only: `per_token_selective_scan` below,
the scan's defining recurrence stepped one token at a time (independent of the project's scan).
Everything else of the official model runs as released.
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import group_parameters
from torch import nn

from mambaout_pl.models import FeatureBackbone, create_model, mambavision
from mambaout_pl.models.mambavision import MambaVision, MambaVisionMixer
from mambaout_pl.models.sharding import shard_units


def per_token_selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Test double of `mamba_ssm`'s CUDA `selective_scan_fn` (B, C `[batch, state, length]`), in float32."""
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    outputs = []
    for t in range(u.shape[-1]):
        step = delta[:, :, t, None]
        state = torch.exp(step * A) * state + step * B[:, None, :, t] * u[:, :, t, None]
        outputs.append((state * C[:, None, :, t]).sum(-1))
    y = torch.stack(outputs, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def _import_official():
    """`mambavision.models.mamba_vision`, imported with the test double as `mamba_ssm` (removed again afterwards)."""
    names = ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface")
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[names[-1]].selective_scan_fn = per_token_selective_scan
    try:
        import mambavision.models.mamba_vision as official
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return official


official = _import_official()

# A reduced configuration through every code path: conv levels, windowed Mamba and attention
# blocks, layer scale on both kinds of level.
SMALL = dict(
    dim=16,
    in_dim=8,
    depths=(1, 2, 3, 2),
    window_size=(8, 8, 3, 2),
    mlp_ratio=2,
    num_heads=(2, 2, 4, 4),
    drop_path_rate=0.0,
    layer_scale=1e-5,
    layer_scale_conv=1e-5,
)
# Counted from the official package's models (1000 classes).
PARAMS = {
    "mamba_vision_T": 31_794_248,
    "mamba_vision_T2": 35_104_008,
    "mamba_vision_S": 50_140_584,
    "mamba_vision_B": 97_685_288,
    "mamba_vision_B_21k": 97_685_288,
    "mamba_vision_L": 227_961_048,
    "mamba_vision_L_21k": 227_961_048,
    "mamba_vision_L2": 241_554_824,
    "mamba_vision_L2_512_21k": 241_554_824,
    "mamba_vision_L3_256_21k": 739_570_472,
    "mamba_vision_L3_512_21k": 739_570_472,
}
ATOL = 1e-5
# Weight noise of `randomize`, times 1/sqrt(fan-in).
NOISE = 0.5


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def images(height: int, width: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every tensor of the state away from its initial value, so that each one shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(1 + 0.5 * noise.abs())
            elif tensor.dim() == 1:  # biases, norms, layer scales, D
                tensor.add_(0.2 * noise)
            else:  # weights: of the order of the inputs' fan-in, so that no branch is negligible
                tensor.add_(NOISE * tensor[0].numel() ** -0.5 * noise)
    return model


def official_stage_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and each official level's output before its downsampling conv (the last level's output)."""
    outputs = {}
    hooks = [
        level.downsample.register_forward_pre_hook(lambda _, args, i=i: outputs.__setitem__(i, args[0]))
        for i, level in enumerate(model.levels[:-1])
    ]
    hooks.append(model.levels[-1].register_forward_hook(lambda _, args, out: outputs.__setitem__(3, out)))
    try:
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, [outputs[i] for i in range(len(model.levels))]


def small_pair() -> tuple[nn.Module, MambaVision]:
    """The official reduced model (randomized) and ours with its state dict loaded strictly."""
    torch.manual_seed(0)
    reference = randomize(official.MambaVision(**SMALL)).eval()
    ours = MambaVision(**SMALL).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[nn.Module, MambaVision]:
    """The official MambaVision-T (randomized) and ours loaded from its checkpoint file by `create_model`."""
    torch.manual_seed(0)
    reference = randomize(official.mamba_vision_T()).eval()
    path = tmp_path_factory.mktemp("mambavision") / "mambavision_tiny_1k.pth.tar"
    torch.save({"state_dict": reference.state_dict()}, path)
    ours = create_model("mamba_vision_T", pretrained=path).eval()
    return reference, ours


# Parity with the official package.


@pytest.mark.parametrize("size", [(224, 224), (256, 320)])
def test_official_checkpoint_gives_official_logits_and_stage_outputs(tiny_pair, size):
    """MambaVision-T from an official-format file: same logits and level outputs, at 224 and padded at 256x320."""
    reference, ours = tiny_pair
    x = images(*size)
    with torch.no_grad():
        expected_logits, expected_stages = official_stage_outputs(reference, x)
        logits = ours(x)
        stages = ours.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == (1, 1000) and expected_logits.std() > 0.1
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    height, width = size
    assert [s.shape for s in stages] == [(1, 80 * 2**i, height // (4 * 2**i), width // (4 * 2**i)) for i in range(4)]
    for stage, expected in zip(stages, expected_stages):
        torch.testing.assert_close(stage, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", [(64, 64), (72, 88)])
def test_reduced_model_matches_official(size):
    """Layer scale on both kinds of level, a batch of two; 72x88 pads the windows to other multiples."""
    reference, ours = small_pair()
    x = images(*size, batch=2)
    with torch.no_grad():
        expected_logits, expected_stages = official_stage_outputs(reference, x)
        _, stages = ours.forward_intermediates(x)
        torch.testing.assert_close(ours(x), expected_logits, atol=ATOL, rtol=0)
    for stage, expected in zip(stages, expected_stages):
        torch.testing.assert_close(stage, expected, atol=ATOL, rtol=0)


def test_query_key_norm_matches_official():
    """The official `qk_scale=True` (LayerNorm on queries and keys) is `qk_norm=True` here."""
    torch.manual_seed(0)
    reference = randomize(official.MambaVision(**SMALL, qk_scale=True)).eval()
    ours = MambaVision(**SMALL, qk_norm=True).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert any(k.endswith("mixer.q_norm.weight") for k in ours.state_dict())
    x = images(64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=ATOL, rtol=0)


def test_same_seed_gives_official_weights():
    """Same keys in the same order and, from the same seed, the same initial values (the Mamba step sizes too)."""
    torch.manual_seed(0)
    reference = official.MambaVision(**SMALL)
    torch.manual_seed(0)
    ours = MambaVision(**SMALL)
    reference_state, state = reference.state_dict(), ours.state_dict()
    assert list(state) == list(reference_state)
    for key, value in reference_state.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_and_defaults(name):
    with torch.device("meta"):
        model = create_model(name)
    assert type(model) is MambaVision
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    for key in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "url"):
        assert model.pretrained_cfg[key] == official.default_cfgs[name][key], key
    gammas = [n for n, _ in model.named_parameters() if n.rpartition(".")[2].startswith("gamma")]
    # B and L use layer scale, on their windowed blocks alone.
    assert bool(gammas) == (name not in ("mamba_vision_T", "mamba_vision_T2", "mamba_vision_S"))
    assert all(".blocks." in n and not n.startswith(("levels.0", "levels.1")) for n in gammas)


def test_drop_path_rates_and_train_mode_only():
    """Drop path rises linearly over all blocks as the official model's, and acts only in training."""
    args = dict(SMALL, drop_path_rate=0.6)
    torch.manual_seed(0)
    reference = official.MambaVision(**args)
    torch.manual_seed(0)
    ours = randomize(MambaVision(**args))
    rates = [m.drop_prob for m in ours.modules() if isinstance(m, DropPath)]
    assert rates == [m.drop_prob for m in reference.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx(torch.linspace(0, 0.6, sum(SMALL["depths"]))[1:].tolist())

    without = MambaVision(**SMALL)
    without.load_state_dict(ours.state_dict())
    x = images(64, 64, batch=4)
    ours.eval(), without.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), without(x), atol=0, rtol=0)
        ours.train(), without.train()
        torch.manual_seed(1)
        dropped = ours(x)
        assert not torch.allclose(dropped, without(x), atol=1e-4)


def test_mixer_runs_the_projects_selective_scan(monkeypatch):
    """Every Mamba block scans with `mixers.ssm.selective_scan`, once per forward pass."""
    calls = []
    scan = mambavision.selective_scan

    def counting_scan(**kwargs):
        calls.append(kwargs["u"].shape)
        return scan(**kwargs)

    monkeypatch.setattr(mambavision, "selective_scan", counting_scan)
    model = MambaVision(**SMALL).eval()
    num_mixers = sum(isinstance(m, MambaVisionMixer) for m in model.modules())
    with torch.no_grad():
        model(images(64, 64))
    # windowed levels: depth 3 -> 2 Mamba blocks (window 3 over 4x4: 4 windows), depth 2 -> 1 (window 2 over 2x2)
    assert num_mixers == 3
    assert calls == [(4, 32, 9), (4, 32, 9), (1, 64, 4)]


def test_export_gives_the_eager_output():
    torch.manual_seed(0)
    model = randomize(MambaVision(**SMALL)).eval()
    x = images(64, 64, batch=2)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=ATOL, rtol=0)


# The model contract.


def test_intermediates_norm_stop_early_and_formats():
    _, model = small_pair()
    x = images(64, 64)
    with torch.no_grad():
        final, stages = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), atol=0, rtol=0)
        assert [s.shape[1] for s in stages] == [info["num_chs"] for info in model.feature_info]
        assert (
            [64 // s.shape[-1] for s in stages] == [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
        )

        last_two = model.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
        torch.testing.assert_close(last_two[0], stages[2], atol=0, rtol=0)
        torch.testing.assert_close(last_two[1], model.norm(stages[3]), atol=0, rtol=0)

        early_final, early = model.forward_intermediates(x, indices=[0, -3], stop_early=True, output_fmt="NHWC")
        torch.testing.assert_close(early[1], stages[1].permute(0, 2, 3, 1), atol=0, rtol=0)
        torch.testing.assert_close(early_final, stages[1], atol=0, rtol=0)
    with pytest.raises(ValueError, match="out of range for 4 levels"):
        model.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="output_fmt must be"):
        model.forward_intermediates(x, output_fmt="NLC")


@pytest.mark.parametrize("indices", [(0, 1), (1, 3)])
def test_pruned_model_and_feature_backbone_give_the_same_stages(indices):
    _, model = small_pair()
    x = images(64, 64)
    with torch.no_grad():
        stages = model.forward_intermediates(x, intermediates_only=True)
    expected = [stages[i] for i in indices]

    torch.manual_seed(0)
    backbone = FeatureBackbone("mamba_vision_T", out_indices=indices, **SMALL).eval()
    features_only = create_model("mamba_vision_T", features_only=True, out_indices=indices, **SMALL).eval()
    for pruned in (backbone.model, features_only.model):
        assert not pruned.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert backbone.channels == [model.feature_info[i]["num_chs"] for i in indices]
    assert backbone.reductions == [model.feature_info[i]["reduction"] for i in indices]
    assert len(backbone.model.levels) == max(indices) + 1 and backbone.model.levels[-1].downsample is None
    assert isinstance(backbone.model.head, nn.Identity)
    with torch.no_grad():
        for got in (backbone(x), features_only(x)):
            assert len(got) == len(expected)
            for feature, reference in zip(got, expected):
                torch.testing.assert_close(feature, reference, atol=0, rtol=0)


def test_head_classifier_and_weight_decay_names():
    _, model = small_pair()
    x = images(64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert features.shape == (1, 128, 2, 2) and pre_logits.shape == (1, model.head_hidden_size) == (1, 128)
        torch.testing.assert_close(model.get_classifier()(pre_logits), model(x), atol=0, rtol=0)
        model.reset_classifier(7)
        assert model.num_classes == 7 and model(x).shape == (1, 7)
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), features, atol=0, rtol=0)
    with pytest.raises(ValueError, match="global_pool='' leaves the features unpooled"):
        model.reset_classifier(5, "")
    with pytest.raises(ValueError, match="Unknown global_pool 'mean'"):
        MambaVision(**SMALL, global_pool="mean")

    mixers = [name for name, m in model.named_modules() if isinstance(m, MambaVisionMixer)]
    assert model.no_weight_decay() == {f"{name}.{p}" for name in mixers for p in ("A_log", "D")}


def test_group_matcher_shard_units_and_grad_checkpointing():
    _, model = small_pair()
    groups = group_parameters(model, model.group_matcher(), return_values=False)
    order = {name: i for i, names in enumerate(groups.values()) for name in names}
    assert [order[name] for name, _ in model.named_parameters()] == sorted(order.values())
    assert order["patch_embed.conv_down.0.weight"] == 0
    assert order["levels.0.downsample.reduction.0.weight"] < order["levels.1.blocks.0.conv1.weight"]
    # a downsampling conv joins the group of the last block of its level
    assert order["levels.0.downsample.reduction.0.weight"] == order["levels.0.blocks.0.conv1.weight"]
    assert order["levels.1.downsample.reduction.0.weight"] == order["levels.1.blocks.1.conv1.weight"]
    assert order["levels.1.downsample.reduction.0.weight"] > order["levels.1.blocks.0.conv1.weight"]

    units = shard_units(model)
    blocks = [block for level in model.levels for block in level.blocks]
    assert len(units) == len(blocks) == sum(SMALL["depths"])
    assert {id(u) for u in units} == {id(b) for b in blocks}

    x = images(64, 64, batch=2)
    model.train()
    reference = model(x)
    reference.square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    output = model(x)
    output.square().mean().backward()
    torch.testing.assert_close(output, reference, atol=1e-6, rtol=0)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="need one entry per level, got 4, 3 and 4"):
        MambaVision(**dict(SMALL, window_size=(8, 8, 3)))
    with pytest.raises(ValueError, match=r"Level 2 has 64 channels, which num_heads\[2\]=3 does not divide"):
        MambaVision(**dict(SMALL, num_heads=(2, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"window_size\[3\]=0 must be a positive"):
        MambaVision(**dict(SMALL, window_size=(8, 8, 3, 0)))
    with pytest.raises(ValueError, match="pretrained must be the path of a checkpoint file"):
        create_model("mamba_vision_T", pretrained=True)
