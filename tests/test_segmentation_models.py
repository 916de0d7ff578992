"""Segmentation networks: multi-scale backbones, UperNet, the segmentor, Hub round trip, inference modes, size."""

from __future__ import annotations

import inspect
import json

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mambaout_pl.models import (
    FeatureBackbone,
    UperNetHead,
    UperNetSegmentor,
    create_model,
    segment,
    slide_inference,
    whole_inference,
)

SMALL = dict(backbone="mambaout_femto", num_classes=5, channels=32, aux_channels=16)


def small_segmentor(**kwargs) -> UperNetSegmentor:
    torch.manual_seed(0)
    return UperNetSegmentor(**{**SMALL, **kwargs}).eval()


# --------------------------------------------------------------------------------------------
# backbones


def test_our_backbone_gives_the_stage_outputs_of_forward_intermediates():
    torch.manual_seed(0)
    reference = create_model("mambaout_femto").eval()
    backbone = FeatureBackbone("mambaout_femto").eval()
    backbone.model.load_state_dict(reference.state_dict(), strict=False)
    images = torch.randn(1, 3, 64, 96)
    features = backbone(images)
    expected = reference.forward_intermediates(images, intermediates_only=True)
    assert backbone.channels == [48, 96, 192, 288] and backbone.reductions == [4, 8, 16, 32]
    for feature, stage in zip(features, expected):
        torch.testing.assert_close(feature, stage)
    assert not any(name.startswith("head.fc") for name, _ in backbone.model.named_parameters())  # head pruned


def test_timm_channels_last_backbone_is_permuted_to_nchw():
    torch.manual_seed(0)
    backbone = FeatureBackbone("test_mambaout").eval()  # timm's MambaOut: NHWC features
    assert backbone.channels_last
    reference = timm.create_model("test_mambaout", features_only=True).eval()
    reference.load_state_dict(backbone.model.state_dict())
    images = torch.randn(1, 3, 64, 96)
    for feature, nhwc, channels in zip(backbone(images), reference(images), backbone.channels):
        assert feature.shape[1] == channels
        torch.testing.assert_close(feature, nhwc.permute(0, 3, 1, 2))


def test_timm_backbone_takes_the_last_four_levels_by_default():
    backbone = FeatureBackbone("test_resnet")  # five levels, the first at stride 2
    assert backbone.reductions == [4, 8, 16, 32]
    shapes = [tuple(feature.shape) for feature in backbone(torch.randn(1, 3, 64, 64))]
    assert shapes == [(1, c, 64 // r, 64 // r) for c, r in zip(backbone.channels, backbone.reductions)]


def test_timm_backbone_loads_a_local_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_convnext")
    torch.save(source.state_dict(), tmp_path / "convnext.pth")
    backbone = FeatureBackbone("test_convnext", pretrained=str(tmp_path / "convnext.pth"))
    torch.testing.assert_close(backbone.model.stem_0.weight, source.stem[0].weight)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        FeatureBackbone("test_convnext", pretrained=str(tmp_path / "missing.pth"))


def test_plain_backbone_gets_a_simple_feature_pyramid():
    torch.manual_seed(0)
    backbone = FeatureBackbone("vit_tiny_patch16_224", img_size=64).eval()  # four blocks, all at stride 16
    assert backbone.pyramid is not None and backbone.reductions == [4, 8, 16, 32]
    images = torch.randn(1, 3, 64, 64)
    plain = backbone.model(images)
    features = backbone(images)
    assert [tuple(f.shape) for f in features] == [(1, 192, 64 // r, 64 // r) for r in (4, 8, 16, 32)]
    torch.testing.assert_close(features[2], plain[2])  # the stride-16 level passes through
    torch.testing.assert_close(features[3], nn.functional.max_pool2d(plain[3], 2))
    unchanged = FeatureBackbone("vit_tiny_patch16_224", img_size=64, simple_pyramid=False)
    assert unchanged.pyramid is None and unchanged.reductions == [16, 16, 16, 16]


def test_out_indices_out_of_range_are_named():
    with pytest.raises(ValueError, match=r"out_indices=\[0, 4\].*4 stages of 'mambaout_femto'"):
        FeatureBackbone("mambaout_femto", out_indices=(0, 4))


# --------------------------------------------------------------------------------------------
# heads and segmentor


def test_upernet_head_fuses_every_level_at_the_finest_resolution():
    head = UperNetHead([8, 16, 24, 32], num_classes=7, channels=16)
    features = [torch.randn(2, c, 32 // 2**i, 48 // 2**i) for i, c in enumerate([8, 16, 24, 32])]
    assert head(features).shape == (2, 7, 32, 48)
    # Each level reaches the output: a change in the coarsest map changes the logits.
    head.eval()
    changed = [*features[:-1], features[-1] + 1.0]
    assert not torch.allclose(head(features), head(changed))


def test_segmentor_outputs_stage_norms_and_auxiliary_head():
    model = small_segmentor()
    images = torch.randn(2, 3, 64, 96)
    logits, aux_logits = model.forward_heads(images)
    assert logits.shape == (2, 5, 16, 24)  # stride 4
    assert aux_logits.shape == (2, 5, 4, 6)  # stage 3, stride 16
    assert model(images).shape == (2, 5, 64, 96)
    assert all(type(norm).__name__ == "LayerNorm2d" for norm in model.stage_norms)
    plain = small_segmentor(stage_norm=False, aux_head=False)
    assert plain.aux_head is None and plain.forward_heads(images)[1] is None
    assert all(isinstance(norm, nn.Identity) for norm in plain.stage_norms)
    fcn = small_segmentor(decode_head="fcn")
    assert fcn.forward_heads(images)[0].shape == (2, 5, 2, 3)  # last stage, stride 32
    with pytest.raises(ValueError, match="decode_head='psp'"):
        small_segmentor(decode_head="psp")


def test_segmentor_takes_the_backbone_weights_from_pretrained(tmp_path):
    torch.manual_seed(2)
    classifier = create_model("mambaout_femto")
    torch.save(classifier.state_dict(), tmp_path / "femto.pth")
    model = small_segmentor(pretrained=str(tmp_path / "femto.pth"))
    expected = classifier.state_dict()
    loaded = model.backbone.model.state_dict()
    assert len(loaded) > 100
    for key, value in loaded.items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert "pretrained" not in model._hub_mixin_config


def test_save_pretrained_and_from_pretrained_rebuild_the_same_network(tmp_path):
    torch.manual_seed(3)
    classifier = create_model("mambaout_femto", kernel_size=5)
    torch.save(classifier.state_dict(), tmp_path / "femto.pth")
    model = small_segmentor(
        pretrained=str(tmp_path / "femto.pth"), backbone_args={"kernel_size": 5}, pool_scales=(1, 3)
    )
    model.save_pretrained(tmp_path / "export")
    (tmp_path / "femto.pth").unlink()  # the config must not need the ImageNet file any more
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "pretrained" not in config and config["backbone_args"] == {"kernel_size": 5}
    restored = UperNetSegmentor.from_pretrained(tmp_path / "export").eval()
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(restored(images), model(images))

    # The project's own export format: create_model(model_name, **model_args) by dotted class path.
    rebuilt = create_model("mambaout_pl.models.segmentor.UperNetSegmentor", **config).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(images), model(images))


def test_config_names_every_constructor_argument_but_pretrained_and_rebuilds_the_segmentor(tmp_path):
    model = small_segmentor(decode_head="fcn", aux_stage=1, out_indices=(-3, -2, -1), backbone_args={"kernel_size": 5})
    config = model.config
    assert config["model_name"] == "mambaout_pl.models.segmentor.UperNetSegmentor"
    assert json.loads(json.dumps(config)) == config
    assert set(config["model_args"]) == set(inspect.signature(UperNetSegmentor).parameters) - {"pretrained"}
    assert config["model_args"]["out_indices"] == [-3, -2, -1] and config["model_args"]["decode_head"] == "fcn"
    config["model_args"]["backbone_args"]["kernel_size"] = 3  # a copy: the network's own stays
    assert model.config["model_args"]["backbone_args"] == {"kernel_size": 5}

    rebuilt = create_model(model.config["model_name"], **model.config["model_args"]).eval()
    rebuilt.load_state_dict(model.state_dict())
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(rebuilt(images), model(images))
    model.save_pretrained(tmp_path / "hub")
    assert UperNetSegmentor.from_pretrained(tmp_path / "hub").config == model.config


def test_upernet_mambaout_tiny_size_matches_the_paper():
    """54M parameters and 938 GMACs at 512x2048 (whole image, as mmsegmentation counts them)."""
    with torch.device("meta"):
        model = UperNetSegmentor("mambaout_tiny", num_classes=150).eval()
        images = torch.empty(1, 3, 512, 2048)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == pytest.approx(54e6, rel=0.005)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    assert counter.get_total_flops() / 2 == pytest.approx(938e9, rel=0.005)


# --------------------------------------------------------------------------------------------
# inference


class Pointwise(nn.Module):
    """A per-pixel model (1x1 conv): its logits at a pixel do not depend on the window around it."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.calls: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(images.shape[-2:]))
        return self.conv(images)


def test_sliding_window_is_whole_image_when_one_window_covers_it():
    model = small_segmentor()
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        whole = whole_inference(model, images)
        for crop in ((64, 64), (40, 56)):
            torch.testing.assert_close(slide_inference(model, images, crop, (21, 21)), whole, rtol=0, atol=0)


def test_sliding_windows_cover_the_image_and_average_overlaps():
    model = Pointwise()
    images = torch.randn(1, 3, 50, 70)
    slid = slide_inference(model, images, crop_size=(32, 32), stride=(21, 21))
    torch.testing.assert_close(slid, model(images), rtol=1e-5, atol=1e-6)
    # mmsegmentation's grid: ceil((50 - 32) / 21) + 1 = 2 rows, ceil((70 - 32) / 21) + 1 = 3 columns.
    assert model.calls[:-1] == [(32, 32)] * 6

    # Overlapping windows are averaged: a model that answers with the window's own mean colour.
    def window_mean(crop: torch.Tensor) -> torch.Tensor:
        return crop.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *crop.shape[-2:])

    images = torch.zeros(1, 3, 4, 6)
    images[..., 3:] = 1.0  # right half bright: windows [0:4], [2:6] have means 1/4 and 3/4
    slid = slide_inference(window_mean, images, crop_size=(4, 4), stride=(4, 2))
    expected = torch.tensor([0.25, 0.25, 0.5, 0.5, 0.75, 0.75]).expand(4, 6)
    torch.testing.assert_close(slid[0, 0], expected)


def test_segment_returns_log_probabilities_at_the_output_size():
    model = small_segmentor()
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        scores = segment(model, images, output_size=(96, 128))
        logits = nn.functional.interpolate(model(images), size=(96, 128), mode="bilinear", align_corners=False)
    assert scores.shape == (1, 5, 96, 128)
    torch.testing.assert_close(scores, logits.log_softmax(dim=1))


def test_flip_augmentation_is_consistent():
    model = small_segmentor()
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        scores = segment(model, images, (48, 64), flip=True)
        on_flipped = segment(model, images.flip(-1), (48, 64), flip=True)
        plain = model(images).softmax(dim=1)
        mirrored = model(images.flip(-1)).softmax(dim=1).flip(-1)
    # Averaging over an image and its mirror: mirroring the input mirrors the prediction exactly.
    torch.testing.assert_close(on_flipped, scores.flip(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores.exp(), (plain + mirrored) / 2, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the network itself is not mirror-symmetric

    # A mirror-symmetric per-pixel model: flip TTA changes nothing.
    pointwise = Pointwise()
    torch.testing.assert_close(segment(pointwise, images, (48, 64), flip=True), segment(pointwise, images, (48, 64)))


def test_multi_scale_averages_the_probabilities_of_each_scale():
    model = Pointwise()
    images = torch.randn(1, 3, 32, 48)
    scales = (0.5, 1.0, 1.5)
    expected = 0
    for scale in scales:
        scaled = nn.functional.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        logits = nn.functional.interpolate(model(scaled), size=(32, 48), mode="bilinear", align_corners=False)
        expected = expected + logits.softmax(dim=1) / len(scales)
    model.calls.clear()
    scores = segment(model, images, (32, 48), scales=scales)
    assert model.calls == [(16, 24), (32, 48), (48, 72)]
    torch.testing.assert_close(scores.exp(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scales"):
        segment(model, images, (32, 48), scales=())
