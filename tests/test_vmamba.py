"""VMamba against the official code (MzeroMiko/VMamba `vmamba.py`), and the model contract.

`data/vmamba_reference.pt` holds the official models' outputs on CPU for reduced versions of the
published configurations, filled with `seeded_state_dict` weights (written by
`data/make_vmamba_reference.py`, which this file imports for the same weights), plus the official
parameter counts and key/shape digests of the six published models.
"""

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from timm.models import group_parameters

from mambaout_pl.models import FeatureBackbone, create_model, load_pretrained
from mambaout_pl.models import vmamba as vmamba_module
from mambaout_pl.models.sharding import shard_units
from mambaout_pl.models.vmamba import SS2D, VSSM, SS2Dv0, VSSBlock, checkpoint_filter_fn
from mambaout_pl.models.weights import CheckpointMismatchError

DATA = Path(__file__).parent / "data"
TOLERANCE = 1e-5


def _load_recipe():
    spec = importlib.util.spec_from_file_location("make_vmamba_reference", DATA / "make_vmamba_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()
REFERENCE = torch.load(DATA / "vmamba_reference.pt", weights_only=True)
CASES = REFERENCE["cases"]

# /work/shared/PAPER_FACTS.md: counted from the official code (the reference file records them too).
PUBLISHED_PARAMS = {
    "vanilla_vmamba_tiny": 22_893_448,
    "vanilla_vmamba_small": 44_417_416,
    "vanilla_vmamba_base": 76_254_056,
    "vmamba_tiny_s1l8": 30_249_064,
    "vmamba_small_s2l15": 50_147_752,
    "vmamba_base_s2l15": 88_557_800,
}
# The official training configs (classification/configs/vssm/*.yaml).
PUBLISHED_DROP_PATH = {
    "vanilla_vmamba_tiny": 0.2,
    "vanilla_vmamba_small": 0.3,
    "vanilla_vmamba_base": 0.5,
    "vmamba_tiny_s1l8": 0.2,
    "vmamba_small_s2l15": 0.3,
    "vmamba_base_s2l15": 0.6,
}
SMALL = dict(depths=(1, 1, 1, 1), dims=16, num_classes=10)


def seeded_model(case: str, **overrides) -> VSSM:
    """Our model of a reference case, with the case's seeded weights, in eval mode."""
    model = VSSM(**dict(CASES[case]["model_args"], **overrides))
    model.load_state_dict(recipe.seeded_state_dict({k: v.shape for k, v in model.state_dict().items()}), strict=True)
    return model.eval()


def test_reference_records_the_official_commit():
    assert REFERENCE["official_commit"] == "2ed52ea"
    assert REFERENCE["weights_seed"] == recipe.WEIGHTS_SEED


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_published_models_match_the_official_sizes_and_keys(name):
    with torch.device("meta"):
        model = create_model(name)
    official = REFERENCE["published"][name]
    assert official["params"] == PUBLISHED_PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert recipe.shape_digest(model.state_dict()) == official["digest"]  # names, order and shapes
    assert model.num_classes == 1000 and model.pretrained_cfg["url"].endswith(".pth")


@pytest.mark.parametrize("name", list(PUBLISHED_DROP_PATH))
def test_published_drop_path_rates(name):
    with torch.device("meta"):
        model = create_model(name)
    blocks = [block for layer in model.layers for block in layer.blocks]
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in blocks]
    expected = torch.linspace(0, PUBLISHED_DROP_PATH[name], len(blocks)).tolist()
    assert rates == pytest.approx(expected, abs=1e-7)
    with torch.device("meta"):
        assert create_model(name, drop_path_rate=0.0).layers[-1].blocks[-1].drop_path.__class__ is torch.nn.Identity


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_is_the_officials(case):
    model = VSSM(**CASES[case]["model_args"])
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == CASES[case]["state_dict_shapes"]


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_official(case):
    model = seeded_model(case)
    for output in CASES[case]["outputs"]:
        images = recipe.seeded_input(output["shape"], output["seed"])
        with torch.no_grad():
            logits = model(images)
            stages = model.forward_intermediates(images, intermediates_only=True)
        torch.testing.assert_close(logits, output["logits"], rtol=0, atol=TOLERANCE)
        if output["stages"] is not None:
            assert len(stages) == len(output["stages"]) == 4
            for ours, official in zip(stages, output["stages"]):
                torch.testing.assert_close(ours, official, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_official(case):
    model = seeded_model(case)
    first = CASES[case]["outputs"][0]
    model(recipe.seeded_input(first["shape"], first["seed"])).sum().backward()
    parameters = dict(model.named_parameters())
    for name, official in CASES[case]["grads"].items():
        scale = official.abs().max().item()
        torch.testing.assert_close(parameters[name].grad, official, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("case", list(CASES))
def test_old_official_key_names_load(case, tmp_path):
    model = seeded_model(case)
    renamed = dict(CASES[case]["old_keys"])  # verified against the official loading hooks
    old = {}
    for key, value in model.state_dict().items():
        if key.endswith((".x_proj.weight", ".dt_projs.weight")):
            value = value.view(4, -1, value.shape[-1])
        old[renamed.get(key, key)] = value
    assert set(old) != set(model.state_dict())
    converted = checkpoint_filter_fn(old, model)
    assert list(converted) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(converted[key], value), key
    torch.save({"model": old}, tmp_path / "official.pth")  # the release files' layout
    fresh = load_pretrained(VSSM(**CASES[case]["model_args"]), tmp_path / "official.pth", strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_drop_path_only_in_training():
    model = seeded_model("v05_noz", drop_path_rate=0.5)
    without = seeded_model("v05_noz", drop_path_rate=0.0)
    images = recipe.seeded_input([2, 3, 32, 32], 7)
    with torch.no_grad():
        evaluated = model(images)
        assert torch.equal(evaluated, without(images))
        model.train()
        torch.manual_seed(0)
        trained = model(images)
        torch.manual_seed(1)
        trained_again = model(images)
    assert not torch.allclose(trained, evaluated, atol=1e-3)
    assert not torch.allclose(trained, trained_again, atol=1e-3)


@pytest.mark.parametrize(
    "name, widths", [("vmamba_tiny_s1l8", (16, 32, 64, 128)), ("vanilla_vmamba_tiny", (8, 16, 32, 64))]
)
def test_feature_backbone(name, widths):
    backbone = FeatureBackbone(name, depths=(1, 1, 1, 1), dims=list(widths))
    assert backbone.channels == list(widths)
    assert backbone.reductions == [4, 8, 16, 32]
    features = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [(1, c, 64 // r, 96 // r) for c, r in zip(widths, (4, 8, 16, 32))]
    sum(f.mean() for f in features).backward()
    unused = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert not unused  # the classifier and its norm are gone (DDP needs every parameter used)

    two = FeatureBackbone(name, out_indices=(0, 2), depths=(1, 1, 1, 1), dims=list(widths))
    assert two.channels == [widths[0], widths[2]] and len(two.model.layers) == 3
    assert isinstance(two.model.layers[-1].downsample, torch.nn.Identity)
    assert [f.shape[1] for f in two(torch.randn(1, 3, 64, 64))] == [widths[0], widths[2]]


def test_features_only():
    model = create_model("vmamba_tiny_s1l8", features_only=True, out_indices=(1, 3), **SMALL)
    assert [f.shape[1:] for f in model(torch.randn(1, 3, 64, 64))] == [(32, 8, 8), (128, 2, 2)]


@pytest.mark.parametrize("case", ["v0", "v05_noz"])
def test_forward_intermediates_contract(case):
    model = seeded_model(case)
    images = recipe.seeded_input([1, 3, 64, 64], 8)
    with torch.no_grad():
        final, stages = model.forward_intermediates(images)
        assert torch.equal(final, model.forward_features(images))
        assert torch.equal(model.forward_head(final), model(images))
        nhwc = model.forward_intermediates(images, indices=2, output_fmt="NHWC", intermediates_only=True)
        early = model.forward_intermediates(images, indices=[1], stop_early=True, intermediates_only=True)
    assert [s.shape[1] for s in stages] == [info["num_chs"] for info in model.feature_info]
    assert [64 // s.shape[-1] for s in stages] == [info["reduction"] for info in model.feature_info]
    assert all(torch.equal(a.permute(0, 2, 3, 1), b) for a, b in zip(stages[2:], nhwc))
    assert torch.equal(early[0], stages[1])
    assert model.forward_head(final, pre_logits=True).shape == (1, model.num_features)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(images, indices=[4])


def test_classifier_interface():
    model = VSSM(**SMALL, forward_type="v05_noz", norm_layer="ln2d", ssm_d_state=1)
    assert model.get_classifier() is model.classifier.head
    assert model.pretrained_cfg["first_conv"] == "patch_embed.0"
    assert model.get_submodule(model.pretrained_cfg["classifier"]) is model.get_classifier()
    model.reset_classifier(3, "max")
    images = torch.randn(2, 3, 32, 32)
    assert model(images).shape == (2, 3)
    model.reset_classifier(0, "")
    assert model(images).shape == (2, 1, 1, 128)  # per position, channels last
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "mean")


def test_no_weight_decay_and_groups():
    model = VSSM(**SMALL, forward_type="v0", mlp_ratio=0.0, downsample_version="v1")
    names = model.no_weight_decay()
    assert names == {n for n, _ in model.named_parameters() if n.endswith((".A_logs", ".Ds"))}
    assert len(names) == 2 * 4
    groups = list(group_parameters(model, model.group_matcher()).values())
    assert len(groups) == 6 and "patch_embed.0.weight" in groups[0] and "classifier.head.weight" in groups[-1]
    assert groups[1][-1] == "layers.0.downsample.2.weight"  # with its stage's last block
    assert [type(u) for u in shard_units(model)] == [VSSBlock] * 4


def test_official_initialisation():
    torch.manual_seed(0)
    model = VSSM(**dict(SMALL, dims=32), forward_type="v05_noz", norm_layer="ln2d", ssm_d_state=1, ssm_ratio=2.0)
    vanilla = VSSM(**dict(SMALL, dims=32), forward_type="v0", mlp_ratio=0.0)
    for op in (model.layers[0].blocks[0].op, vanilla.layers[0].blocks[0].op):
        steps = torch.nn.functional.softplus(op.dt_projs_bias)
        assert steps.min() >= 1e-4 and steps.max() <= 0.1
        assert torch.equal(op.A_logs, torch.log(torch.arange(1, op.d_state + 1.0)).expand_as(op.A_logs))
        assert torch.equal(op.Ds, torch.ones_like(op.Ds))
    # `VSSM` re-initialises every linear layer, the grouped projections included, as the official model
    assert 0.015 < model.layers[0].blocks[0].op.dt_projs.weight.std() < 0.025
    # the stacked projections of 'v0' keep their own init: nn.Linear's and Mamba's
    vanilla_op = vanilla.layers[0].blocks[0].op
    assert 0.5 * vanilla_op.d_inner**-0.5 < vanilla_op.x_proj_weight.abs().max() <= vanilla_op.d_inner**-0.5
    assert vanilla_op.dt_projs_weight.abs().max() > 0.5 * vanilla_op.dt_rank**-0.5
    zeros = VSSM(**SMALL, forward_type="v05", ssm_init="v2").layers[0].blocks[0].op.A_logs
    assert torch.equal(zeros, torch.zeros_like(zeros))


def test_load_official_checkpoint_layout(tmp_path):
    model = seeded_model("v05_noz")
    path = tmp_path / "vssm1_tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    args = CASES["v05_noz"]["model_args"]
    loaded = create_model("vmamba_tiny_s1l8", pretrained=path, **args).eval()
    images = recipe.seeded_input([1, 3, 32, 32], 9)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))

    torch.save({"model": {**model.state_dict(), "extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointMismatchError, match="extra.weight"):
        create_model("vmamba_tiny_s1l8", pretrained=path, **args)
    fresh = VSSM(**dict(CASES["v05_noz"]["model_args"], num_classes=5))
    torch.save({"model": model.state_dict()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_pretrained(fresh, path)  # another number of classes: all but the classifier
    assert torch.equal(fresh.patch_embed[0].weight, model.patch_embed[0].weight)


@pytest.mark.parametrize("case", ["v0", "v05_noz"])
def test_torch_export_matches_eager(case):
    model = seeded_model(case, depths=[1, 1, 1, 1])
    images = recipe.seeded_input([1, 3, 32, 32], 10)
    program = torch.export.export(model, (images,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), model(images), rtol=0, atol=TOLERANCE)


def test_grad_checkpointing_keeps_gradients():
    model = seeded_model("v05", depths=[1, 1, 1, 1], drop_path_rate=0.0).train()
    images = recipe.seeded_input([1, 3, 32, 32], 11)
    model(images).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).sum().backward()
    for grad, reference in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(grad, reference)


def test_odd_sizes_patch_merging():
    model = seeded_model("v0", depths=[1, 1, 1, 1])
    with torch.no_grad():
        stages = model.forward_intermediates(torch.randn(1, 3, 36, 52), intermediates_only=True)
    assert [tuple(s.shape[-2:]) for s in stages] == [(9, 13), (5, 7), (3, 4), (2, 2)]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(forward_type="v2"), "forward_type"),
        (dict(forward_type="v0", norm_layer="ln2d"), "channels-last"),
        (dict(norm_layer="bn"), "norm_layer"),
        (dict(downsample_version="v4"), "downsample_version"),
        (dict(patchembed_version="v3"), "patchembed_version"),
        (dict(ssm_init="v3"), "ssm_init"),
        (dict(forward_type="v0", ssm_init="v1"), "ssm_init"),
        (dict(depths=(1, 1), dims=(8, 16, 32)), "one entry per stage"),
        (dict(global_pool="mean"), "global_pool"),
    ],
)
def test_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        VSSM(**dict(SMALL, **arguments))


def test_mixer_classes():
    assert isinstance(seeded_model("v0").layers[0].blocks[0].op, SS2Dv0)
    gated = seeded_model("v05").layers[0].blocks[0].op
    assert isinstance(gated, SS2D) and gated.gate and gated.in_proj.out_features == 2 * gated.d_inner
    assert not seeded_model("v05_noz").layers[0].blocks[0].op.gate
    assert set(vmamba_module.FORWARD_TYPES) == {case for case in CASES}
