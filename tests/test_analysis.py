"""The long-sequence criterion, MAC counts and the analyze / profile commands."""

import math

import pytest
import torch

from mambaout_pl.analysis import (
    TASK_IMAGE_SIZES,
    build_model,
    count_macs,
    long_sequence_report,
    profile_model,
    stage_shapes,
)
from mambaout_pl.cli import main

# PAPER_FACTS.md: params (exact) and GMACs at 224x224.
PAPER = {
    "mambaout_femto": (7_304_536, 1.15),
    "mambaout_kobe": (9_141_208, 1.51),
    "mambaout_tiny": (26_545_096, 4.47),
    "mambaout_small": (48_488_072, 8.94),
    "mambaout_base": (84_813_092, 15.79),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def rows_by_task(rows):
    grouped = {}
    for row in rows:
        grouped.setdefault(row.task, []).append(row)
    return grouped


def test_vit_small_reproduces_the_papers_numbers():
    rows = rows_by_task(long_sequence_report("vit_small_patch16_224"))
    assert list(rows) == ["ImageNet", "COCO", "ADE20K"]
    assert all(len(stages) == 1 for stages in rows.values())  # the twelve blocks share one shape
    imagenet, coco, ade20k = rows["ImageNet"][0], rows["COCO"][0], rows["ADE20K"][0]
    assert (imagenet.stage, imagenet.tokens, imagenet.channels, imagenet.threshold) == ("blocks.0-11", 196, 384, 2304)
    assert not imagenet.long_sequence
    assert imagenet.attention_ratio == pytest.approx(196 / 2304)
    assert (coco.tokens, coco.long_sequence) == (4000, True)
    assert (ade20k.tokens, ade20k.long_sequence) == (4096, True)


def test_mambaout_tiny_tokens_per_stage():
    rows = rows_by_task(long_sequence_report("mambaout_tiny"))
    assert [r.stage for r in rows["ImageNet"]] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert [r.channels for r in rows["ImageNet"]] == [96, 192, 384, 576]
    assert [r.tokens for r in rows["ImageNet"]] == [3136, 784, 196, 49]
    assert [r.tokens for r in rows["COCO"]] == [64000, 16000, 4000, 1000]
    assert [r.tokens for r in rows["ADE20K"]] == [65536, 16384, 4096, 1024]
    assert [r.long_sequence for r in rows["ImageNet"]] == [True, False, False, False]  # 3136 > 6 * 96
    assert [r.long_sequence for r in rows["COCO"]] == [True, True, True, False]


def test_token_counts_follow_each_models_rounding():
    # stride-2 convs with padding round up (225 -> 113 -> 57 -> ...); a 16x16 patch embedding rounds down
    mambaout = long_sequence_report("mambaout_femto", {"odd": (225, 161)})
    assert [(r.tokens, r.channels) for r in mambaout] == [(57 * 41, 48), (29 * 21, 96), (15 * 11, 192), (8 * 6, 288)]
    vit = long_sequence_report("vit_small_patch16_224", {"odd": (225, 161)})
    assert [r.tokens for r in vit] == [14 * 10]


def test_built_models_are_on_the_meta_device():
    model = build_model("mambaout_base")
    assert all(p.device.type == "meta" for p in model.parameters())
    vit = build_model("vit_small_patch16_224", (512, 2048))
    assert vit.patch_embed.grid_size == (32, 128)
    assert stage_shapes(model, (64, 64))[0] == ("stages.0", 128, 16, 16)


@pytest.mark.parametrize("name", list(PAPER))
def test_params_and_macs_match_the_paper(name):
    params, gmacs = PAPER[name]
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert round(count_macs(model, (224, 224)) / 1e9, 2) == gmacs


def test_ssm_and_attention_macs_are_counted_in_full():
    size = (64, 64)
    gated = count_macs(build_model("mambaout_femto"), size)
    depths, dims, strides = (3, 3, 9, 3), (48, 96, 192, 288), (4, 8, 16, 32)
    tokens = [(64 // s) ** 2 for s in strides]

    for scan, directions in (("raster", 1), ("cross", 4)):
        ssm = count_macs(build_model("mambaout_femto", model_args=dict(token_mixer="ssm", scan=scan)), size)
        extra = 0
        for depth, channels, length in zip(depths, dims, tokens):
            rank, state = math.ceil(channels / 16), 16
            projections = length * channels * (rank + 2 * state) + length * rank * channels  # x_proj, dt_proj
            scan_macs = length * channels * (9 * state + 1)  # VMamba's count, with the skip D
            extra += depth * directions * (projections + scan_macs)
        assert ssm - gated == extra

    attention = count_macs(build_model("mambaout_femto", model_args=dict(token_mixer="attention")), size)
    extra = sum(
        depth * (3 * length * channels**2 + 2 * length**2 * channels - 49 * length * channels)
        for depth, channels, length in zip(depths, dims, tokens)
    )
    assert attention - gated == extra


def test_count_macs_on_a_real_model_equals_the_meta_count():
    torch.manual_seed(0)
    real = build_model("mambaout_femto", device="cpu", model_args=dict(token_mixer="ssm", num_classes=10))
    meta = build_model("mambaout_femto", model_args=dict(token_mixer="ssm", num_classes=10))
    assert count_macs(real, (32, 48)) == count_macs(meta, (32, 48))
    assert real.training  # restored after counting


def test_profile_model_measures_throughput():
    result = profile_model(
        "mambaout_femto",
        (32, 32),
        dict(token_mixer="ssm", scan="bidirectional"),
        batch_size=2,
        steps=1,
        warmup=1,
        mode="train",
    )
    assert result.token_mixer == "ssm(bidirectional)"
    assert result.params == sum(
        p.numel()
        for p in build_model("mambaout_femto", model_args=dict(token_mixer="ssm", scan="bidirectional")).parameters()
    )
    assert result.images_per_second > 0
    assert profile_model("mambaout_femto", (32, 32), steps=0).images_per_second is None


def test_analyze_command(capsys):
    assert main(["analyze", "--model", "vit_small_patch16_224", "mambaout_tiny"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["ImageNet", "224x224", "blocks.0-11", "196", "384", "2304", "0.0851", "no"] in lines
    assert ["COCO", "800x1280", "blocks.0-11", "4000", "384", "2304", "1.74", "yes"] in lines
    assert ["ADE20K", "512x2048", "stages.2", "4096", "384", "2304", "1.78", "yes"] in lines
    assert sum(1 for line in lines if line[:1] in (["ImageNet"], ["COCO"], ["ADE20K"])) == 3 + 12

    assert main(["analyze", "--model", "mambaout_femto", "--image-size", "64", "96"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["64x96", "64x96", "stages.0", "384", "48", "288", "1.33", "yes"] in lines


def test_profile_command(capsys):
    args = ["profile", "--model", "mambaout_femto", "mambaout_tiny", "--steps", "0"]
    assert main(args) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["mambaout_femto", "gated_conv", "7,304,536", "1.148", "-"] in lines
    assert ["mambaout_tiny", "gated_conv", "26,545,096", "4.470", "-"] in lines

    args = [
        "profile",
        "--model",
        "mambaout_femto",
        "--image-size",
        "32",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--model-args",
        '{"token_mixer": "attention", "causal": true}',
    ]
    assert main(args) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("mambaout_femto"))
    assert row.split()[1] == "attention(causal)"
    assert float(row.split()[-1]) > 0


def test_commands_report_bad_input(capsys):
    assert main(["analyze", "--model", "mambaout_fento"]) == 2
    assert "Did you mean 'mambaout_femto'" in capsys.readouterr().err
    assert (
        main(["profile", "--model", "mambaout_femto", "--steps", "0", "--model-args", '{"token_mixer": "mamba"}']) == 2
    )
    assert "Unknown token_mixer 'mamba'" in capsys.readouterr().err
    assert main(["profile", "--model", "mambaout_femto", "--model-args", "token_mixer=ssm"]) == 2
    assert "--model-args must be a JSON object" in capsys.readouterr().err
    assert (
        main(
            [
                "profile",
                "--model",
                "mambaout_femto",
                "--steps",
                "0",
                "--image-size",
                "800",
                "1280",
                "--model-args",
                '{"token_mixer": "attention"}',
            ]
        )
        == 2
    )
    assert "window_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", "--model", "mambaout_femto", "--image-size", "0", "64"])


def test_task_presets():
    assert TASK_IMAGE_SIZES == {"ImageNet": (224, 224), "COCO": (800, 1280), "ADE20K": (512, 2048)}
