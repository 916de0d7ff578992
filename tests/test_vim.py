"""Vision Mamba (Vim) against outputs of the official code, and the model contract.

`data/vim_reference.pt` holds outputs of the official `vim/models_mamba.py` (hustvl/Vim, commit
dd0358a) on CPU, written by `data/make_vim_reference.py`: there the official CUDA kernels are replaced
by the same repository's pure-PyTorch reference functions (see that script). Both sides are filled by
its `seeded_state_dict`, a deterministic function of the state dict's keys and shapes.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from timm.models import group_parameters
from torch import nn

from mambaout_pl.errors import CheckpointMismatchError
from mambaout_pl.models import create_model
from mambaout_pl.models.sharding import shard_units
from mambaout_pl.models.vim import VisionMamba, vim_small, vim_tiny

DATA = Path(__file__).parent / "data"
LOGITS_ATOL = 1e-5
LONG_NAMES = {
    "vim_tiny": "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_small": "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
}
# Paper rows (PAPER_FACTS.md): exact counts of the official models with 1000 classes.
PAPER_PARAMS = {"vim_tiny": 7_148_008, "vim_small": 25_796_584}


def _load_script():
    spec = importlib.util.spec_from_file_location("make_vim_reference", DATA / "make_vim_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(DATA / "vim_reference.pt", weights_only=True)


def seeded(model: nn.Module) -> nn.Module:
    """`model` filled with the weights the official models of the reference were filled with."""
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    model.load_state_dict(script.seeded_state_dict(shapes), strict=True)
    return model


def official_model(reference: dict, name: str = "base", **kwargs) -> VisionMamba:
    return seeded(VisionMamba(**reference["configs"][name]["config"], **kwargs)).eval()


def without_class_token(tokens: torch.Tensor) -> torch.Tensor:
    middle = (tokens.shape[-2] - 1) // 2
    return torch.cat([tokens[..., :middle, :], tokens[..., middle + 1 :, :]], dim=-2)


# Parity with the official code


def test_reference_is_from_the_official_commit(reference):
    assert reference["commit"] == "dd0358a"
    assert reference["official_args"]["bimamba_type"] == "v2" and reference["official_args"]["use_middle_cls_token"]


@pytest.mark.parametrize("name", ["base", "narrow"])
def test_state_dict_is_official(reference, name):
    model = VisionMamba(**reference["configs"][name]["config"])
    ours = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert ours == [(key, tuple(shape)) for key, shape in reference["configs"][name]["state_dict_shapes"]]


def test_full_size_state_dict_and_parameter_counts_are_official(reference):
    with torch.device("meta"):
        tiny, small = vim_tiny(), vim_small()
    ours = [(key, tuple(value.shape)) for key, value in tiny.state_dict().items()]
    assert ours == [(key, tuple(shape)) for key, shape in reference["full"]["tiny_state_dict_shapes"]]
    assert sum(p.numel() for p in tiny.parameters()) == reference["full"]["tiny_params"] == PAPER_PARAMS["vim_tiny"]
    assert sum(p.numel() for p in small.parameters()) == reference["full"]["small_params"] == PAPER_PARAMS["vim_small"]


@pytest.mark.parametrize("name", ["base", "narrow"])
def test_logits_and_input_gradient_match_official(reference, name):
    entry = reference["configs"][name]
    model = official_model(reference, name)
    images = entry["input"].float().requires_grad_(True)
    logits = model(images)
    logits.sum().backward()
    torch.testing.assert_close(logits, entry["logits"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(images.grad, entry["input_grad"], atol=1e-7, rtol=1e-4)
    # Not a vacuous match: the two images give different logits.
    assert (entry["logits"][0] - entry["logits"][1]).abs().max() > 100 * LOGITS_ATOL


def test_block_streams_match_official(reference):
    """Each intermediate is the block's `hidden + residual` in the official model, the class token removed."""
    entry = reference["configs"]["base"]
    model = official_model(reference)
    images = entry["input"].float()
    depth = len(model.layers)
    with torch.no_grad():
        tokens, maps = model.forward_intermediates(images, indices=list(range(depth)), output_fmt="NLC")
        grids = model.forward_intermediates(images, indices=list(range(depth)), intermediates_only=True)
        normed = model.forward_intermediates(images, indices=[-1], norm=True, intermediates_only=True)
    for ours, official in zip(maps, entry["streams"], strict=True):
        torch.testing.assert_close(ours, without_class_token(official), atol=1e-5, rtol=0)
    for grid, sequence in zip(grids, maps):
        assert grid.shape == (2, 64, 4, 4)
        torch.testing.assert_close(grid.flatten(2).transpose(1, 2), sequence, atol=0, rtol=0)
    torch.testing.assert_close(normed[0].flatten(2).transpose(1, 2), without_class_token(tokens), atol=0, rtol=0)
    torch.testing.assert_close(model.forward_head(tokens), entry["logits"], atol=LOGITS_ATOL, rtol=0)


def test_other_input_size_resamples_positions_like_official_model_of_that_size(reference):
    """A 64 x 64 model on a 48 x 80 input (3 x 5 patches, class token at 7) against the official model built
    at 48 x 80 with the rule's resampled position embeddings."""
    model = official_model(reference)
    images = reference["resized"]["input"].float()
    with torch.no_grad():
        logits = model(images)
        tokens = model.forward_features(images)
    assert tokens.shape == (1, 16, 64)
    torch.testing.assert_close(logits, reference["resized"]["logits"], atol=LOGITS_ATOL, rtol=0)


def test_class_token_sits_in_the_middle():
    assert VisionMamba.class_token_index(196) == 98
    assert VisionMamba.class_token_index(16) == 8
    assert VisionMamba.class_token_index(15) == 7
    model = VisionMamba(img_size=32, embed_dim=16, depth=1, d_state=2, num_classes=3).eval()
    tokens = torch.randn(2, 197, 16)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 98])
    model.reset_classifier(3, global_pool="avg")
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), without_class_token(tokens).mean(1))


# Drop path


def test_drop_path_rates_match_official(reference):
    rates = reference["drop_path"]
    model = VisionMamba(**reference["configs"]["base"]["config"], drop_path_rate=rates["rate"])
    ours = [float(getattr(layer.drop_path, "drop_prob", 0.0)) for layer in model.layers]
    assert ours == pytest.approx(rates["blocks"])
    assert model.drop_path.drop_prob == pytest.approx(rates["final"])
    # Each block's output is dropped at linspace(0, rate, depth)[i]: the next block's rate, the model's after the last.
    outputs = [getattr(model._output_drop_path(i), "drop_prob", 0.0) for i in range(len(model.layers))]
    assert outputs == pytest.approx(torch.linspace(0, rates["rate"], len(model.layers)).tolist())


def test_official_training_scripts_drop_path_defaults():
    with torch.device("meta"):
        tiny, small = vim_tiny(), vim_small()
    assert isinstance(tiny.drop_path, nn.Identity)
    assert small.drop_path.drop_prob == pytest.approx(0.05)
    assert small.layers[-1].drop_path.drop_prob == pytest.approx(0.05 * 22 / 23)


def test_drop_path_acts_in_training_only(reference):
    entry = reference["configs"]["base"]
    images = entry["input"].float().repeat(4, 1, 1, 1)
    model = official_model(reference, drop_path_rate=0.5)
    with torch.no_grad():
        evaluated = model(images)
        torch.manual_seed(0)
        trained = model.train()(images)
        plain = official_model(reference).train()(images)
    torch.testing.assert_close(evaluated, entry["logits"].repeat(4, 1), atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(plain, evaluated, atol=LOGITS_ATOL, rtol=0)
    assert (trained - evaluated).abs().amax(dim=1).gt(1e-3).any()


def test_grad_checkpointing_gives_the_same_gradients(reference):
    images = reference["configs"]["base"]["input"].float()
    gradients = []
    for enable in (False, True):
        model = official_model(reference).train()
        model.set_grad_checkpointing(enable)
        model(images).sum().backward()
        gradients.append(model.layers[0].mixer.A_b_log.grad)
    assert gradients[0].abs().max() > 0
    torch.testing.assert_close(gradients[1], gradients[0], atol=1e-7, rtol=1e-5)


# Checkpoints, registry, export


def test_create_model_loads_an_official_checkpoint_strictly(reference, tmp_path):
    entry = reference["configs"]["base"]
    official = script.seeded_state_dict(dict(entry["state_dict_shapes"]))
    path = tmp_path / "vim_checkpoint.pth"
    torch.save({"model": official, "model_ema": {key: torch.zeros_like(v) for key, v in official.items()}}, path)
    size_args = {k: v for k, v in entry["config"].items() if k != "num_classes"}
    for name in ("vim_tiny", LONG_NAMES["vim_tiny"]):
        model = create_model(name, pretrained=path, num_classes=10, **size_args).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(entry["input"].float()), entry["logits"], atol=LOGITS_ATOL, rtol=0)

    official.pop("layers.0.mixer.A_b_log")
    torch.save({"model": official}, path)
    with pytest.raises(CheckpointMismatchError, match="A_b_log"):
        create_model("vim_tiny", pretrained=path, num_classes=10, **size_args)


@pytest.mark.parametrize("name", ["vim_tiny", "vim_small"])
def test_official_names_build_the_paper_models(name):
    with torch.device("meta"):
        short, long = create_model(name), create_model(LONG_NAMES[name])
    assert sum(p.numel() for p in long.parameters()) == sum(p.numel() for p in short.parameters()) == PAPER_PARAMS[name]


def test_torch_export_matches_eager():
    torch.manual_seed(0)
    model = VisionMamba(img_size=64, embed_dim=32, depth=2, d_state=8, num_classes=5).eval()
    images = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (images,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(images), model(images), atol=1e-6, rtol=0)


# The model contract


def small_vim(**kwargs) -> VisionMamba:
    torch.manual_seed(0)
    return VisionMamba(**dict(dict(img_size=32, embed_dim=16, depth=24, d_state=4, num_classes=3), **kwargs)).eval()


def test_forward_intermediates_indices_follow_timm():
    model = small_vim()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        every = model.forward_intermediates(images, indices=list(range(24)), intermediates_only=True)
        default = model.forward_intermediates(images, intermediates_only=True)
        last_two = model.forward_intermediates(images, indices=2, intermediates_only=True)
        negative = model.forward_intermediates(images, indices=[-1, 0], stop_early=True, intermediates_only=True)
        final, taken = model.forward_intermediates(images, indices=[5])
        larger = model.forward_intermediates(images.repeat(1, 1, 2, 3), indices=[0], intermediates_only=True)
    assert len(default) == 4
    for ours, index in zip(default, (5, 11, 17, 23)):
        torch.testing.assert_close(ours, every[index], atol=0, rtol=0)
    assert not torch.equal(every[4], every[5])
    torch.testing.assert_close(last_two, every[22:], atol=0, rtol=0)
    torch.testing.assert_close(negative, [every[0], every[23]], atol=0, rtol=0)
    torch.testing.assert_close(final, model.forward_features(images), atol=0, rtol=0)
    assert taken[0].shape == (2, 16, 2, 2) and larger[0].shape == (2, 16, 4, 6)
    assert [info["reduction"] for info in model.feature_info] == [16] * 24
    assert [info["module"] for info in model.feature_info][-1] == "layers.23"
    for indices in (0, 25, [24], [-25]):
        with pytest.raises(ValueError, match="blocks"):
            model.forward_intermediates(images, indices=indices)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(images, output_fmt="NHWC")


def test_prune_intermediate_layers_keeps_the_taken_features():
    model = small_vim(depth=6)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_intermediates(images, indices=[1, 3], intermediates_only=True)
        assert model.prune_intermediate_layers([1, 3]) == [1, 3]
        after = model.forward_intermediates(images, indices=[1, 3], intermediates_only=True)
    assert len(model.layers) == 4 and isinstance(model.head, nn.Identity) and model.global_pool == ""
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_timm_interface():
    model = small_vim(depth=2)
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head"
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert model.default_cfg is cfg and model.num_features == model.head_hidden_size == 16
    assert model.get_classifier() is model.head
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)
        model.reset_classifier(7)
        assert model(images).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(0)
        torch.testing.assert_close(model(images), pre_logits, atol=0, rtol=0)

    names = {name for name, _ in model.named_parameters()}
    no_decay = model.no_weight_decay()
    assert {
        "pos_embed",
        "cls_token",
        "layers.1.mixer.A_log",
        "layers.1.mixer.A_b_log",
        "layers.0.mixer.D_b",
    } <= no_decay
    assert no_decay <= names
    # Layer-wise groups as timm's ViT: the embeddings first, then one per block (the final norm with the last).
    groups = list(group_parameters(model, model.group_matcher()).values())
    assert groups[0] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert [{name.split(".")[1] for name in group if name.startswith("layers.")} for group in groups[1:]] == [
        {"0"},
        {"1"},
    ]
    assert groups[-1][-1] == "norm_f.weight" and sum(len(group) for group in groups) == len(names)
    assert shard_units(model) == list(model.layers)


def test_clear_errors():
    model = small_vim(depth=1)
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="global_pool"):
        VisionMamba(global_pool="max")
    with pytest.raises(ValueError, match="pretrained"):
        vim_tiny(pretrained=True)
