"""A tiny real run of the classification quick start, and headless Chromium for the pages made from it."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import TINY_BACKBONE, cpu_trainer_args

QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def quickstart_fit_args(root: Path, *extra: str) -> list[str]:
    """`fit` of the quick start (the embedded digits) for 2 epochs of 2 batches with a one-block-per-stage femto."""
    return [
        "fit",
        f"--config={QUICKSTART}",
        *cpu_trainer_args(root),
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--data.num_workers=0",
        f"--model.backbone_args={TINY_BACKBONE}",
        *extra,
    ]


def run_folders(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs").glob("version_*"))


def chromium(url: str, profile: Path, *arguments: str, timeout: float = 60) -> str:
    """Load ``url`` in headless Chromium with ``arguments`` (e.g. ``--dump-dom``); return what it printed."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("The browser tests need headless Chromium: apt-get install chromium (.ci/run installs it).")
    result = subprocess.run(
        [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments, url],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Tables(HTMLParser):
    """The tables of a page by ``id``: each a list of rows (the header row first), each row a list of
    ``(text, data-value or None)``; and the sources of its images and targets of its links, in page order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self.marked: dict[str, list[int]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._value: str | None = None
        self.images: list[str] = []
        self.links: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes.get("src") or "")
        elif tag == "a":
            self.links.append(attributes.get("href") or "")
        elif tag == "table":
            self._table = attributes.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
            self.marked[self._table] = []
        elif tag == "tr" and self._table is not None:
            rows = self.tables[self._table]
            if attributes.get("class") == "best":
                self.marked[self._table].append(len(rows))
            rows.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell, self._value = [], attributes.get("data-value")

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(("".join(self._cell), self._value))
            self._cell = None
        elif tag == "table":
            self._table = None
