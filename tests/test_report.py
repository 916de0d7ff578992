"""`mambaout report`: a real quick-start run's report.html, rendered by headless Chromium, shows its curves,
its metrics.csv numbers and its validation pictures; per-class tables, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from browser_helpers import Tables, chromium, quickstart_fit_args, run_folders
from PIL import Image

from mambaout_pl.cli import main
from mambaout_pl.report import RunFolderError, read_run_folder, write_report
from mambaout_pl.report.report import ReportError
from mambaout_pl.training.metrics_file import metrics_csv, read_metrics_file

# Writes, once the page has loaded, each image's source and natural size into the DOM that --dump-dom prints.
IMAGE_CHECK = """<script>window.addEventListener("load", () => {
  const out = document.createElement("pre"); out.id = "image-check";
  out.textContent = JSON.stringify(Array.from(document.images, (image) => [image.getAttribute("src"),
    image.naturalWidth, image.naturalHeight]));
  document.body.appendChild(out);
});</script>"""


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quickstart")
    main(quickstart_fit_args(root))
    (run,) = run_folders(root)
    return run


@pytest.mark.slow
def test_report_of_a_quickstart_run_renders_its_curves_numbers_and_pictures(
    quickstart_run: Path, tmp_path: Path, capsys
) -> None:
    assert main(["report", str(quickstart_run)]) == 0
    page = quickstart_run / "report.html"
    assert capsys.readouterr().out.strip() == f"Report written to {page}"
    checked = quickstart_run / "check.html"  # the report with the image check, beside it so its links resolve
    checked.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))

    dom = chromium(checked.as_uri(), tmp_path / "profile", "--dump-dom")

    images = json.loads(re.search(r'<pre id="image-check">(.*?)</pre>', dom, re.S)[1].replace("&quot;", '"'))
    sources = [source for source, _, _ in images]
    assert sources[:3] == ["report/loss.png", "report/learning_rate.png", "report/scores.png"]
    pictures = sorted((quickstart_run / "val_pictures").glob("*/*.png"))
    assert len(pictures) == 8  # 4 images at each of the 2 validations: best (epoch 0 or 1) and last
    assert len(sources) == 3 + 8 and all(source.startswith("report/pictures/epoch") for source in sources[3:])
    for source, width, height in images:
        on_disk = Image.open(quickstart_run / source)
        assert (width, height) == on_disk.size and width > 0, source  # loaded by the browser, at its own size
    assert min(Image.open(picture).height for picture in pictures) >= 192  # readable, not 32-pixel thumbnails

    rows = read_metrics_file(quickstart_run / "metrics.csv")
    assert [(row["epoch"], row["step"]) for row in rows] == [(0, 2), (1, 4)]
    tables = Tables(dom)
    header, *body = tables.tables["scores"]
    assert [text for text, _ in header] == ["epoch", "step", "train/loss", "lr", "val/loss", "val/top1", "val/top5"]
    for row, cells in zip(rows, body, strict=True):
        values = {name: float(value) for (name, _), (_, value) in zip(header, cells, strict=True)}
        assert values == {name: float(row[name]) for name, _ in header}  # the file's numbers, exactly
        assert all(float(text) == pytest.approx(float(value), rel=5e-4) for text, value in cells)  # shown to 4 digits
    best_index = max(range(len(rows)), key=lambda index: (rows[index]["val/top1"], -index))
    assert tables.marked["scores"] == [1 + best_index]
    summary = {name: value if value is not None else text for (name, _), (text, value) in tables.tables["summary"]}
    assert summary["metric"] == "val/top1" and summary["best is"] == "max"
    assert float(summary["best value"]) == rows[best_index]["val/top1"]
    assert int(summary["best epoch"]) == rows[best_index]["epoch"]
    assert (quickstart_run / summary["best checkpoint"]).is_file()
    assert "per-class" not in tables.tables  # classification logs no per-class scores
    saved_config = yaml.safe_load((quickstart_run / "config.yaml").read_text())
    assert saved_config["model"]["init_args"]["backbone"] == "mambaout_femto"
    assert "backbone: mambaout_femto" in dom and "default_root_dir:" in dom  # the config, shown as saved

    screenshot = tmp_path / "report.png"
    chromium(checked.as_uri(), tmp_path / "profile", "--window-size=1280,2400", f"--screenshot={screenshot}")
    pixels = np.asarray(Image.open(screenshot).convert("L"))
    assert pixels.shape == (2400, 1280) and pixels.std() > 10  # a page was painted, not a blank window


def write_run_folder(folder: Path, rows: list[dict], monitor: str = "val/mIoU", mode: str = "max") -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(metrics_csv(rows))
    (folder / "config.yaml").write_text(yaml.safe_dump({"checkpoint": {"monitor": monitor, "mode": mode}}))
    return folder


SEGMENTATION_ROWS = [
    {"epoch": 0, "step": 10, "train/loss": 1.5, "lr": 0.01, "val/loss": 1.2, "val/mIoU": 0.25, "val/IoU/wall": 0.5},
    {"epoch": 1, "step": 20, "train/loss": 1.0, "lr": 0.005, "val/loss": 0.9, "val/mIoU": 0.625, "val/IoU/wall": 0.75,
     "val/IoU/sky": 0.5},
    {"epoch": 2, "step": 30, "train/loss": 0.8, "lr": 0.0, "val/loss": 1.0, "val/mIoU": 0.5, "val/IoU/wall": 0.625,
     "val/IoU/sky": 0.375},
]  # fmt: skip


def test_per_class_scores_are_tabled_at_the_best_and_the_last_epoch(tmp_path: Path) -> None:
    run = write_run_folder(tmp_path / "version_0", SEGMENTATION_ROWS)

    page = write_report(run)

    tables = Tables(page.read_text())
    header, *body = tables.tables["per-class"]
    assert [text for text, _ in header] == ["class", "IoU at best (epoch 1)", "IoU at last (epoch 2)"]
    assert [[text if value is None else float(value) for text, value in row] for row in body] == [
        ["wall", 0.75, 0.625],
        ["sky", 0.5, 0.375],
    ]
    scores_header = [text for text, _ in tables.tables["scores"][0]]
    assert "val/IoU/wall" not in scores_header and "val/mIoU" in scores_header
    assert tables.marked["scores"] == [2]  # epoch 1, the highest val/mIoU


def test_a_lowest_best_metric_marks_its_epoch_and_draws_every_curve(tmp_path: Path) -> None:
    run = write_run_folder(tmp_path / "version_0", SEGMENTATION_ROWS, monitor="val/loss", mode="min")

    page = write_report(run, tmp_path / "elsewhere" / "loss_report.html")

    assert page == tmp_path / "elsewhere" / "loss_report.html"
    tables = Tables(page.read_text())
    assert tables.marked["scores"] == [2]  # val/loss 0.9 at epoch 1
    assert float(dict((row[0][0], row[1][1]) for row in tables.tables["summary"])["best value"]) == 0.9
    assets = page.with_suffix("")
    assert sorted(path.name for path in assets.glob("*.png")) == ["learning_rate.png", "loss.png", "scores.png"]
    assert read_run_folder(run).best == SEGMENTATION_ROWS[1]


def test_writing_a_report_again_replaces_its_pngs_but_never_a_foreign_folder(tmp_path: Path) -> None:
    run = write_run_folder(tmp_path / "version_0", SEGMENTATION_ROWS)
    write_report(run)
    (run / "report" / "stale.png").write_bytes(b"old")

    write_report(run)
    assert not (run / "report" / "stale.png").exists()

    foreign = tmp_path / "mine.html"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="mine' exists and was not written by `mambaout report`"):
        write_report(run, foreign)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_folder_that_is_not_a_run_names_the_run_folders_inside_it(tmp_path: Path, capsys) -> None:
    write_run_folder(tmp_path / "lightning_logs" / "version_3", SEGMENTATION_ROWS)

    with pytest.raises(RunFolderError, match=r"holds no metrics.csv itself; its run folders are .*version_3"):
        read_run_folder(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "'" + str(tmp_path / "missing") + "' does not exist" in capsys.readouterr().err
