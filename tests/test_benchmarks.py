"""Smoke test of the benchmark suite: every section runs `--quick` at the smallest sizes and writes its rows."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark_run(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module("run")
    for name in ("run", "common", "model_speed", "framework_overhead", "data_pipeline", "ceiling", "folder_index"):
        sys.modules.pop(name, None)


def test_quick_run_writes_every_section(benchmark_run, tmp_path):
    output = tmp_path / "rows.json"
    rows = benchmark_run.main(
        [
            "--quick",
            "--image-size",
            "32",
            "--batch-size",
            "2",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--jpegs",
            "8",
            "--threads",
            "1",
            "--json",
            str(output),
        ]
    )
    written = json.loads(output.read_text())
    assert written == [row.as_json() for row in rows]
    names = [row["name"] for row in written]
    assert names[:5] == [
        "model/mambaout_femto/train/fp32/32px",
        "model/mambaout_femto/infer/fp32/32px",
        "model/mambaout_femto/train/bf16/32px",
        "model/mambaout_femto/infer/bf16/32px",
        "model/mambaout_femto/train/bf16-vs-timm-fp32/32px",
    ]
    assert names[5:] == [
        "overhead/mambaout_femto/32px/b32/fp32",
        "data/imagenet_train_transform/1_worker/b2",
        "data/loader_wait_share/1_workers/b2",
        "ceiling/mambaout_femto/train/fp32",
        "ceiling/mambaout_femto/train/bf16",
    ]
    for row in written:
        assert set(row) >= {"name", "ours", "reference", "ratio", "unit"}
        assert row["ours"] > 0 and row["reference"] > 0, row
        if row["name"].startswith("ceiling/"):
            assert 0 < row["ratio"] < 2, row  # a share of the measured matmul rate
        elif not row["name"].startswith("data/loader_wait_share"):
            # one round: the ratio is that round's ours / reference
            assert math.isclose(row["ratio"], row["ours"] / row["reference"], rel_tol=1e-9), row
    wait = written[7]
    assert 0 < wait["ours"] < 1 and 0 < wait["reference"] < 1


def test_folder_index_benchmark_times_every_open(benchmark_run, tmp_path):
    folder_index = importlib.import_module("folder_index")
    rows = folder_index.main(
        ["--files", "40", "--classes", "4", "--rounds", "1", "--datasets-max", "40", "--workdir", str(tmp_path)]
    )
    assert [row.name for row in rows] == [
        "folder/44_files/first_open",
        "folder/44_files/warm_open",
        "folder/44_files/datasets_imagefolder_warm",
    ]
    for row in rows:
        assert row.ours > 0 and row.reference > 0 and row.unit == "s", row
        assert math.isclose(row.ratio, row.ours / row.reference, rel_tol=1e-9), row
    assert list(tmp_path.iterdir()) == []  # the generated folders are removed


def test_depthwise_backward_rows(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    try:
        script = importlib.import_module("depthwise_backward")
        output = tmp_path / "rows.json"
        rows = script.main(
            [
                "--batch-size",
                "1",
                "--rounds",
                "1",
                "--steps",
                "1",
                "--no-steps",
                "--threads",
                "1",
                "--json",
                str(output),
            ]
        )
    finally:
        for name in ("depthwise_backward", "common", "model_speed"):
            sys.modules.pop(name, None)
    written = json.loads(output.read_text())
    assert written == [row.as_json() for row in rows]
    assert [row["name"] for row in written[:4]] == [
        "dwconv/femto/56x56x48/wgrad/fp32",
        "dwconv/femto/56x56x48/igrad/fp32",
        "dwconv/femto/28x28x96/wgrad/fp32",
        "dwconv/femto/28x28x96/igrad/fp32",
    ]
    assert len(written) == 16 and written[-1]["name"] == "dwconv/femto/7x7x288/igrad/bf16"
    for row in written:
        assert row["unit"] == "GFLOP/s" and row["ours"] > 0 and row["reference"] > 0, row
        assert math.isclose(row["ratio"], row["ours"] / row["reference"], rel_tol=1e-9), row
        assert "ours/forward" in row["note"], row
