"""`mambaout compare`: the grid's bookkeeping (run folders, status, resume, refusal to mix), seed statistics on
known numbers, the report read from run folders, the cost axis, --match-macs and the launchers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from browser_helpers import Tables

from mambaout_pl.cli import run_cli
from mambaout_pl.compare import (
    Arm,
    ArmError,
    CompareError,
    GridMismatchError,
    SizeError,
    collect_runs,
    compare_main,
    paired_difference,
    parse_metric,
    plan_grid,
    run_local,
    run_status,
    submit_slurm,
    summarize,
    write_grid,
    write_report,
)
from mambaout_pl.compare.costs import TrainingCosts, network_costs
from mambaout_pl.compare.grid import size_settings
from mambaout_pl.compare.matching import TOLERANCE, backbone_gmacs, match_backbone_macs
from mambaout_pl.compare.statistics import t_quantile
from mambaout_pl.errors import OutputExistsError
from mambaout_pl.models import RCNNDetector

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TINY = "depths: [1, 1, 1, 1], dims: [8, 8, 16, 16]"
CONV = f"conv:--model.backbone_args={{token_mixer: gated_conv, {TINY}}}"
# A mixer setting the model refuses when it is built: the run fails in fit, the others go on.
BROKEN = f"broken:--model.backbone_args={{token_mixer: attention, num_heads: 3, {TINY}}}"
SHORT = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_model_summary=false",
    "--data.batch_size=8",
    "--data.num_workers=0",
]
# Student's t quantiles t(0.975, df) from published tables, for the known-number checks.
T_TABLE = {1: 12.7062, 2: 4.3027, 4: 2.7764, 9: 2.2622}

pytestmark = pytest.mark.usefixtures("one_thread")


# Statistics on known numbers


def test_t_quantiles_are_the_tables():
    for degrees, tabled in T_TABLE.items():
        assert t_quantile(0.975, degrees) == pytest.approx(tabled, abs=1e-4)


def test_mean_std_and_95_percent_interval_on_known_numbers():
    summary = summarize([1.0, 2.0, 3.0])
    assert (summary.n, summary.mean, summary.std) == (3, 2.0, 1.0)
    half = T_TABLE[2] / math.sqrt(3)  # 2.4841
    assert summary.low == pytest.approx(2 - half, abs=1e-4) and summary.high == pytest.approx(2 + half, abs=1e-4)
    ten = summarize(list(range(10)))  # mean 4.5, std sqrt(55/6) = 3.0277
    assert ten.std == pytest.approx(3.02765, abs=1e-5)
    assert ten.half_width == pytest.approx(T_TABLE[9] * 3.02765 / math.sqrt(10), abs=1e-3)  # 2.1659
    one = summarize([0.7])
    assert (one.mean, one.std, one.low, one.high) == (0.7, None, None, None)


def test_paired_differences_use_the_shared_seeds_and_call_significant_only_when_the_interval_excludes_zero():
    reference = {0: 0.40, 1: 0.50, 2: 0.60, 3: 0.90}
    noisy = paired_difference({0: 0.50, 1: 0.70, 2: 0.60}, reference)  # differences 0.1, 0.2, 0.0
    assert noisy.seeds == (0, 1, 2)
    assert noisy.summary.mean == pytest.approx(0.1) and noisy.summary.std == pytest.approx(0.1)
    assert noisy.summary.low == pytest.approx(0.1 - T_TABLE[2] * 0.1 / math.sqrt(3), abs=1e-4)  # -0.148: spans 0
    assert noisy.significant is False
    steady = paired_difference({0: 0.51, 1: 0.62, 2: 0.71}, reference)  # differences 0.11, 0.12, 0.11
    assert steady.summary.low > 0 and steady.significant is True
    worse = paired_difference({0: 0.29, 1: 0.38, 2: 0.49}, reference)
    assert worse.summary.high < 0 and worse.significant is True
    assert paired_difference({0: 0.5}, reference).significant is None  # one seed: no interval
    assert paired_difference({7: 0.5}, reference) is None


# Arms, sizes and user errors


def test_arms_are_overlay_files_named_or_not_or_model_settings(tmp_path):
    overlay = ROOT / "recipes" / "ablation" / "ssm_cross.yaml"
    assert Arm.parse(str(overlay)) == Arm("ssm_cross", overlay=overlay)
    assert Arm.parse(f"vmamba={overlay}") == Arm("vmamba", overlay=overlay)
    arm = Arm.parse("k15:--model.backbone_args={token_mixer: gated_conv, kernel_size: 15} --model.drop_path_rate=0.1")
    assert arm == Arm(
        "k15",
        settings=("--model.backbone_args={token_mixer: gated_conv, kernel_size: 15}", "--model.drop_path_rate=0.1"),
    )
    with pytest.raises(
        ArmError, match=r"arm 'recipes/ablation/nope.yaml': no overlay file 'recipes/ablation/nope.yaml'"
    ):
        Arm.parse("recipes/ablation/nope.yaml")
    with pytest.raises(ArmError, match=r"'--trainer.max_epochs=3' is not a --model.KEY=VALUE setting"):
        Arm.parse("short:--trainer.max_epochs=3")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ArmError, match="must hold a mapping"):
        Arm.parse(str(tmp_path / "list.yaml"))


def test_a_size_sets_each_tasks_input_and_scales_its_companions():
    recipes = {
        name: yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
        for name in ("quickstart", "quickstart_segmentation", "quickstart_detection")
    }
    assert size_settings(recipes["quickstart"], "classification", 64) == {"data.image_size": 64}
    # crop 48 with resize_scale [96, 48]: doubled to 96 -> [192, 96]
    assert size_settings(recipes["quickstart_segmentation"], "segmentation", 96) == {
        "data.crop_size": 96,
        "data.resize_scale": [192, 96],
    }
    # the detector's and the data module's min_size 64 / max_size 100: to 96 -> 150
    assert size_settings(recipes["quickstart_detection"], "detection", 96) == {
        "model.min_size": 96,
        "model.max_size": 150,
        "data.min_size": 96,
        "data.max_size": 150,
    }


@pytest.mark.parametrize(
    ("sizes", "seeds", "overrides", "error", "message"),
    [
        ([16], 1, [], SizeError, r"--sizes: 16 is not an input size; give whole numbers of pixels of at least 32"),
        ([64, 64], 1, [], SizeError, r"--sizes: 64 given twice"),
        ([64], 0, [], CompareError, r"--seeds 0: give the number of seeds"),
        (
            [64],
            1,
            ["--data.image_size=48"],
            CompareError,
            r"override '--data.image_size=48': data.image_size is set by --sizes",
        ),
        ([64], 1, ["--seed_everything=3"], CompareError, r"seed_everything is set by the grid"),
    ],
)
def test_bad_sizes_seeds_and_overrides_are_named(tmp_path, sizes, seeds, overrides, error, message):
    with pytest.raises(error, match=message):
        plan_grid(QUICKSTART, [Arm.parse(CONV)], sizes, seeds, tmp_path / "grid", overrides)
    assert not (tmp_path / "grid").exists()


def test_user_errors_end_with_one_line_naming_the_value(tmp_path, capsys):
    stray = tmp_path / "other"
    stray.mkdir()
    (stray / "notes.txt").write_text("not a grid")
    cases = [
        (["--arms", "missing.yaml"], "arm 'missing.yaml': no overlay file 'missing.yaml'"),
        (["--arms", CONV, "--sizes", "20"], "--sizes: 20 is not an input size"),
        (
            ["--arms", "x:--model.no_such_option=3"],
            "arm 'x': the CLI refuses its settings: Problem with given class_path",
        ),
        (["--arms", CONV, "--out", str(stray)], f"--out '{stray}' holds files but no grid.json"),
    ]
    for arguments, expected in cases:
        out = ["--out", str(tmp_path / "grid")] if "--out" not in arguments else []
        assert compare_main(["--config", str(QUICKSTART), *arguments, *out]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"mambaout compare: error: {expected}") and error.count("\n") == 1, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other"]  # nothing written
    assert issubclass(GridMismatchError, OutputExistsError)


# The grid's bookkeeping on tiny real runs


def test_grid_runs_resumes_skips_names_failures_and_writes_only_under_its_folder(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the recipe's own default_root_dir (runs/quickstart) would land here
    out = tmp_path / "grid"
    arms = [Arm.parse(CONV), Arm.parse(BROKEN)]
    grid = plan_grid(QUICKSTART, arms, [32], 2, out, SHORT)
    assert [(run.arm, run.size, run.seed) for run in grid.runs] == [
        ("conv", 32, 0),
        ("conv", 32, 1),
        ("broken", 32, 0),
        ("broken", 32, 1),
    ]
    write_grid(grid)
    conv0, conv1, broken0, broken1 = (run.folder for run in grid.runs)
    assert conv1 == out / "runs" / "conv" / "size32" / "seed1"
    settings = yaml.safe_load((conv1 / "settings.yaml").read_text())
    assert settings["seed_everything"] == 1 and settings["data"]["init_args"]["image_size"] == 32
    assert settings["trainer"]["max_epochs"] == 2 and "default_root_dir" not in settings["trainer"]
    assert {run_status(folder) for folder in (conv0, conv1, broken0, broken1)} == {"pending"}

    # An interrupted run: one of its two epochs done and its last.ckpt saved.
    run_cli(
        ["fit", f"--config={conv1 / 'settings.yaml'}", f"--trainer.default_root_dir={conv1}", "--trainer.max_epochs=1"]
    )
    assert run_status(conv1) == "interrupted"

    lines = []
    statuses = run_local([run.folder for run in grid.runs], report=lines.append, processes=False)
    assert statuses == {conv0: "done", conv1: "done", broken0: "failed", broken1: "failed"}
    failures = [line for line in lines if line.startswith("FAILED")]
    assert len(failures) == 2
    assert failures[0].startswith(
        "FAILED  arm broken, size 32, seed 0: failed in fit: SettingsError: Attention over 8 channels"
    )
    assert failures[0].endswith(f"log: {broken0 / 'log.txt'}") and "Traceback" in (broken0 / "log.txt").read_text()
    assert "start arm conv, size 32, seed 1 (resuming its last.ckpt)" in "\n".join(lines)
    resumed, fresh = (json.loads((folder / "costs.json").read_text()) for folder in (conv1, conv0))
    assert resumed["resumed"] and resumed["global_step"] == fresh["global_step"] == 4  # 2 epochs of 2 batches
    assert not fresh["resumed"] and len(list((conv1 / "lightning_logs").iterdir())) == 2
    for folder in (conv0, conv1):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["monitor"] == "val/top1" and metrics["value"] == metrics["metrics"]["val/top1"]
    assert list(cwd.iterdir()) == [] and sorted(path.name for path in tmp_path.iterdir()) == ["cwd", "grid"]

    # Again: the done runs are not run again, the failed ones are retried.
    done_at = (conv0 / "metrics.json").stat().st_mtime_ns
    lines.clear()
    run_local([run.folder for run in grid.runs], report=lines.append, processes=False)
    assert [line.split(":")[0] for line in lines if not line.startswith("[")] == [
        "FAILED  arm broken, size 32, seed 0",
        "FAILED  arm broken, size 32, seed 1",
    ]
    assert (conv0 / "metrics.json").stat().st_mtime_ns == done_at

    # The same grid with other settings is refused, naming them; with more seeds it extends.
    with pytest.raises(GridMismatchError, match=r"trainer.max_epochs: 2 there, 3 now"):
        plan_grid(QUICKSTART, arms, [32], 2, out, [*SHORT[1:], "--trainer.max_epochs=3"])
    with pytest.raises(GridMismatchError, match=r"trainer.max_epochs: 2 there, 3 now"):  # other arms alike
        plan_grid(
            QUICKSTART,
            [Arm.parse(f"other:--model.backbone_args={{{TINY}}}")],
            [32],
            1,
            out,
            [*SHORT[1:], "--trainer.max_epochs=3"],
        )
    changed_arm = Arm.parse(f"conv:--model.backbone_args={{token_mixer: gated_conv, kernel_size: 5, {TINY}}}")
    with pytest.raises(
        GridMismatchError,
        match=r"arm conv, size 32, seed 0 .*model.init_args.backbone_args.kernel_size: unset there, 5 now",
    ):
        plan_grid(QUICKSTART, [changed_arm], [32], 1, out, SHORT)
    extended = plan_grid(QUICKSTART, arms[:1], [32], 3, out, SHORT)
    assert [run_status(run.folder) for run in extended.runs] == ["done", "done", "pending"]

    # The report aggregates what the folders hold.
    write_report(out)
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(row["arm"], row["seed"], row["status"]) for row in rows] == [
        ("broken", "0", "failed"),
        ("broken", "1", "failed"),
        ("conv", "0", "done"),
        ("conv", "1", "done"),
    ]
    conv_row = rows[2]
    assert float(conv_row["value"]) == json.loads((conv0 / "metrics.json").read_text())["value"]
    assert conv_row["params"] == str(fresh["params"]) and conv_row["input"] == "32x32"
    assert float(conv_row["l_over_6d"]) == pytest.approx((32 // 4) ** 2 / (6 * 8))  # 64 tokens, 8 channels
    report = (out / "report.md").read_text()
    assert "arm broken, size 32, seed 0: failed in fit: SettingsError: Attention over 8 channels" in report


def write_prepared_run(out, arm, size, seed, value=None, costs=None, failed=False, started=False, logged=None):
    folder = out / "runs" / arm / f"size{size}" / f"seed{seed}"
    folder.mkdir(parents=True)
    info = {"arm": arm, "size": size, "seed": seed, "monitor": "val/mIoU", "mode": "max", "kind": "segmentation"}
    (folder / "run.json").write_text(json.dumps(info))
    if costs is not None:
        (folder / "costs.json").write_text(json.dumps(costs))
    if value is not None:
        metrics = {"monitor": "val/mIoU", "value": value, "metrics": {"val/mIoU": value, **(logged or {})}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if failed:
        (folder / "failed.json").write_text(json.dumps({"stage": "fit", "error": "MemoryError: out", "log": "log.txt"}))
    if started:
        (folder / "lightning_logs" / "version_0").mkdir(parents=True)
    return folder


def test_the_report_is_read_from_prepared_run_folders(tmp_path):
    out = tmp_path / "grid"
    cost = {
        "params": 1000,
        "gmacs": 0.5,
        "backbone_gmacs": 0.25,
        "train_images_per_second": 10.0,
        "peak_memory_mb": 100.0,
        "l_over_6d": 2.0,
        "input_size": [96, 96],
    }
    for seed, (a, b) in enumerate([(0.50, 0.40), (0.70, 0.50), (0.60, 0.60)]):
        write_prepared_run(out, "a", 96, seed, a, {**cost, "train_images_per_second": 10.0 + seed})
        write_prepared_run(out, "b", 96, seed, b, cost)
    write_prepared_run(out, "b", 96, 3, failed=True)
    write_prepared_run(out, "b", 96, 4, started=True)
    assert [r.status for r in collect_runs(out)] == ["done"] * 6 + ["failed", "interrupted"]
    paths = write_report(out, arms=["b", "a"])
    names = ["results.csv", "report.md", "report.html", "metric_vs_l6d.png", "metric_vs_gmacs.png"]
    assert [path.name for path in paths] == names
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in paths[3:])
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 and rows[0]["value"] == "0.5" and rows[6]["status"] == "failed" and rows[6]["value"] == ""
    report = (out / "report.md").read_text()
    half = T_TABLE[2] * 0.1 / math.sqrt(3)
    # a: 0.5, 0.7, 0.6 -> 0.6 ± 0.1; b: 0.4, 0.5, 0.6 -> 0.5 ± 0.1; img/s of a: mean of 10, 11, 12
    assert (
        f"| a | 96 | 96x96 | 2.00 | 3/3 | 0.6000 ± 0.1000 | [{0.6 - half:.4f}, {0.6 + half:.4f}] | 1,000 | 0.5000 | 0.2500 | 11.0 |"
        in report
    )
    assert f"| b | 96 | 96x96 | 2.00 | 3/5 | 0.5000 ± 0.1000 | [{0.5 - half:.4f}, {0.5 + half:.4f}] |" in report
    assert report.index("| b | 96") < report.index("| a | 96")  # the given arm order
    # differences from b (the first arm): 0.1, 0.2, 0.0 on seeds 0-2
    assert f"| 96 | a | 0,1,2 | 0.1000 ± 0.1000 | [{0.1 - half:.4f}, {0.1 + half:.4f}] | no |" in report
    assert "arm b, size 96, seed 3: failed in fit: MemoryError: out; log `runs/b/size96/seed3/log.txt`" in report
    assert "arm b, size 96, seed 4: interrupted" in report
    # report.html: the same tables, cell for cell, and the plots
    page = Tables((out / "report.html").read_text())
    summary = [[text for text, _ in row] for row in page.tables["summary"]]
    assert summary[0][:7] == ["arm", "size", "input", "L/6D", "seeds", "val/mIoU", "95% interval"]
    assert summary[1][:7] == [
        "b",
        "96",
        "96x96",
        "2.00",
        "3/5",
        "0.5000 ± 0.1000",
        f"[{0.5 - half:.4f}, {0.5 + half:.4f}]",
    ]
    assert summary[2][:7] == [
        "a",
        "96",
        "96x96",
        "2.00",
        "3/3",
        "0.6000 ± 0.1000",
        f"[{0.6 - half:.4f}, {0.6 + half:.4f}]",
    ]
    differences = [[text for text, _ in row] for row in page.tables["differences"]]
    assert differences[1:] == [["96", "a", "0,1,2", "0.1000 ± 0.1000", f"[{0.1 - half:.4f}, {0.1 + half:.4f}]", "no"]]
    assert page.images == ["metric_vs_l6d.png", "metric_vs_gmacs.png"]


@pytest.mark.parametrize(
    "text, parsed",
    [("val/loss", ("val/loss", "min")), ("val/aAcc", ("val/aAcc", "max")), ("val/loss:max", ("val/loss", "max"))],
)
def test_metric_names_take_an_optional_mode(text, parsed):
    assert parse_metric(text) == parsed


def test_another_logged_metric_is_reported_beside_the_monitors_report(tmp_path):
    out = tmp_path / "grid"
    cost = {"params": 10, "gmacs": 0.5, "backbone_gmacs": 0.25, "l_over_6d": 2.0, "input_size": [96, 96]}
    for seed, (a, b) in enumerate([(0.30, 0.45), (0.20, 0.35), (0.25, 0.40)]):
        write_prepared_run(out, "a", 96, seed, 0.08, cost, logged={"val/loss": a})
        write_prepared_run(out, "b", 96, seed, 0.08, cost, logged={"val/loss": b})
    write_report(out, arms=["a", "b"])
    monitors_report = (out / "report.md").read_text()
    paths = write_report(out, arms=["a", "b"], metric=parse_metric("val/loss"))
    names = ["results.val_loss.csv", "report.val_loss.md", "report.val_loss.html"]
    assert [path.name for path in paths] == names + ["metric_vs_l6d.val_loss.png", "metric_vs_gmacs.val_loss.png"]
    assert (out / "report.md").read_text() == monitors_report  # the monitor's report is kept
    report = (out / "report.val_loss.md").read_text()
    assert "Metric: `val/loss` of the final weights" in report and "lower is better" in report
    assert "| a | 96 | 96x96 | 2.00 | 3/3 | 0.2500 ± 0.0500 |" in report
    # b - a: 0.15 on every seed
    assert "| 96 | b | 0,1,2 | 0.1500 ± 0.0000 | [0.1500, 0.1500] | **yes** |" in report
    assert "![val/loss against L/6D](metric_vs_l6d.val_loss.png)" in report
    with open(out / "results.val_loss.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(row["metric"], float(row["value"])) for row in rows[:2]] == [("val/loss", 0.3), ("val/loss", 0.2)]
    with pytest.raises(CompareError, match=r"--metric val/aAcc: .*seed0/metrics.json has no such metric; .*val/loss"):
        write_report(out, metric=parse_metric("val/aAcc"))


# Costs and --match-macs


def test_training_costs_leave_out_the_warm_up_steps():
    costs = TrainingCosts(warmup_steps=3)
    costs.steps = [(8, 4.0)] * 3 + [(8, 1.0), (8, 1.0)]
    assert costs.images_per_second == 8.0
    costs.steps = [(8, 4.0), (8, 1.0)]  # fewer than the warm-up: all but the first
    assert costs.images_per_second == 8.0
    costs.steps = [(8, 2.0)]
    assert costs.images_per_second == 4.0


def test_detector_costs_count_the_heads_and_the_first_stage_as_analyze_does():
    detector = RCNNDetector(
        "mambaout_femto",
        num_classes=10,
        fpn_channels=32,
        rpn_post_nms_top_n_test=100,
        box_detections_per_img=10,
        min_size=64,
        max_size=100,
        backbone_args={"depths": [1, 1, 1, 1]},
    )
    costs = network_costs(detector, (64, 64), "detection")
    assert costs["params"] == sum(p.numel() for p in detector.parameters())
    assert costs["gmacs_counted"] == "backbone+FPN, RPN head, box head on 100 RoIs, mask head on 10 RoIs"
    assert costs["backbone_gmacs"] < costs["gmacs"]
    # 64 / 4 = 16: 256 tokens of MambaOut-Femto's 48 channels: L / 6D = 256 / 288
    assert (costs["first_stage_tokens"], costs["first_stage_channels"]) == (256, 48)
    assert costs["l_over_6d"] == pytest.approx(256 / 288)


def test_match_macs_brings_an_arm_within_5_percent_and_records_the_change():
    def settings(**backbone_args):
        tiny = {"depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64], **backbone_args}
        return {"model": {"init_args": {"backbone": "mambaout_femto", "backbone_args": tiny}}}

    conv, attention = settings(token_mixer="gated_conv"), settings(token_mixer="attention")
    target = backbone_gmacs("mambaout_femto", conv["model"]["init_args"]["backbone_args"], (64, 64))
    before = backbone_gmacs("mambaout_femto", attention["model"]["init_args"]["backbone_args"], (64, 64))
    assert before > (1 + TOLERANCE) * target  # attention costs more at the same width
    matched = match_backbone_macs(attention, conv, "classification", 64, "attention", "conv")
    recount = backbone_gmacs("mambaout_femto", matched["backbone_args"], (64, 64))
    assert recount == pytest.approx(matched["backbone_gmacs"]) and abs(recount / target - 1) <= TOLERANCE
    assert matched["target_gmacs"] == pytest.approx(target) and matched["backbone_args"]["token_mixer"] == "attention"
    assert matched["changed"]["dims"] == {"from": [16, 32, 48, 64], "to": matched["backbone_args"]["dims"]}
    assert matched["backbone_args"]["dims"] != [16, 32, 48, 64]
    unchanged = match_backbone_macs(conv, conv, "classification", 64, "copy", "conv")
    assert unchanged["changed"] == {} and unchanged["backbone_args"] == conv["model"]["init_args"]["backbone_args"]


# Launchers


def test_slurm_array_through_submitits_debug_executor_fills_the_same_run_folders(tmp_path):
    """submitit's "debug" executor runs the array's jobs in this process: everything but the Slurm scheduler."""
    out = tmp_path / "grid"
    grid = plan_grid(QUICKSTART, [Arm.parse(CONV)], [32], 1, out, [*SHORT[1:], "--trainer.max_epochs=1"])
    write_grid(grid)
    jobs = submit_slurm([run.folder for run in grid.runs], out, {"timeout_min": 5}, cluster="debug")
    assert [job.result() for job in jobs] == [0]
    (folder,) = [run.folder for run in grid.runs]
    assert run_status(folder) == "done"
    assert json.loads((out / "slurm" / "jobs.json").read_text())[0]["folder"] == str(folder)
    assert "=== attempt started" in (folder / "log.txt").read_text()  # the job's output went to the run's log
    write_report(out)
    with open(out / "results.csv") as file:
        (row,) = csv.DictReader(file)
    assert row["status"] == "done" and float(row["value"]) == json.loads((folder / "metrics.json").read_text())["value"]
    assert submit_slurm([folder], out, {}, cluster="debug") == []  # a done run is not submitted again


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_compare_command_runs_a_grid_in_parallel_processes_and_reports(tmp_path, capsys):
    overlay = tmp_path / "overlays" / "tiny_conv.yaml"
    overlay.parent.mkdir()
    overlay.write_text(f"model:\n  init_args:\n    backbone_args: {{token_mixer: gated_conv, {TINY}}}\n")
    out = tmp_path / "grid"
    arguments = ["--config", str(QUICKSTART), "--arms", str(overlay), CONV.replace("conv:", "conv_settings:", 1)]
    arguments += ["--sizes", "64", "--out", str(out), "--jobs", "2", "--", *SHORT[1:], "--trainer.max_epochs=1"]
    assert compare_main(arguments) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("2 runs (2 arms x 1 sizes [64] x 1 seeds), classification, metric val/top1: 2 pending")
    assert printed.count("done    arm ") == 2
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert sorted((row["arm"], row["size"], row["status"]) for row in rows) == [
        ("conv_settings", "64", "done"),
        ("tiny_conv", "64", "done"),
    ]
    # the same network from an overlay and from settings: the same costs; its own process measured each
    by_arm = {(row["arm"], row["size"]): row for row in rows}
    assert by_arm["tiny_conv", "64"]["gmacs"] == by_arm["conv_settings", "64"]["gmacs"]
    assert all(row["memory_measure"] == "process_max_rss" and float(row["peak_memory_mb"]) > 0 for row in rows)
    assert all("=== attempt started" in (out / row["run_folder"] / "log.txt").read_text() for row in rows)
    # report.html links each run's own report (its curves), which `mambaout report` wrote in its training folder
    page = Tables((out / "report.html").read_text())
    run_pages = sorted(out / link for link in page.links)
    assert (
        run_pages == sorted(out.glob("runs/*/size64/seed0/lightning_logs/version_*/report.html"))
        and len(run_pages) == 2
    )
    for run_page in run_pages:  # one epoch: one scores row, holding the val/top1 that metrics.csv holds
        scores = Tables(run_page.read_text()).tables["scores"]
        header, values = [text for text, _ in scores[0]], scores[1:]
        logged = next(csv.DictReader(open(run_page.with_name("metrics.csv"))))
        assert len(values) == 1 and float(values[0][header.index("val/top1")][1]) == float(logged["val/top1"])
    assert compare_main(arguments) == 0  # all done: nothing runs again
    assert "2 done" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid", "overlays"]
