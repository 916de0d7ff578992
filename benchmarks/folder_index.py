"""Opening a local image folder: our indexed `imagefolder` against torchvision's `ImageFolder` scan.

    python benchmarks/folder_index.py                                  # 20k and 110k files
    python benchmarks/folder_index.py --files 20000 110000 --datasets-max 110000 --rounds 3

Writes an ImageNet-shaped folder of empty `.JPEG` files (`train/<class>/`, and a tenth as many in
`val/<class>/`, 1000 classes by default) and times only the opening, never reading an image:

- reference: torchvision's `ImageFolder` on `train/` and on `val/` (its `os.scandir` walk);
- first open: `open_dataset("imagefolder", data_dir=...)` with no index: the walk, the splits and
  labels resolved as `datasets` resolves them, and the index written;
- warm open: the same call with the index written: what every later run, and every other rank, pays;
- `datasets`' own `load_dataset("imagefolder", ...)` with its Arrow cache warm (opening without the index),
  for folders up to `--datasets-max` files, once (1-3 minutes per 100k files on a 2-core CPU).

The folder's sub-folders are dated an hour back, as a folder not written a moment ago is: a folder
modified in the last 2 seconds is rescanned on each open (its mtimes cannot yet be trusted).
Timed rounds alternate their order; the file system's metadata is cached by the OS for every
timing after the first untimed walk. Ratios are ours / torchvision (lower is better).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, rows_table  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from mambaout_pl.data import open_dataset  # noqa: E402
from mambaout_pl.data.folder_index import INDEX_FOLDER  # noqa: E402


def write_empty_image_folder(root: Path, train_files: int, classes: int) -> int:
    """`train_files` empty `.JPEG` files in `root/train/<class>/` and a tenth as many in `root/val/<class>/`.

    Returns the number of files written; every sub-folder's mtime is set an hour back.
    """
    count = 0
    for split, files in (("train", train_files), ("val", max(classes, train_files // 10))):
        for label in range(classes):
            (root / split / f"n{label:08d}").mkdir(parents=True, exist_ok=True)
        for index in range(files):
            open(root / split / f"n{index % classes:08d}" / f"{split}_{index:08d}.JPEG", "wb").close()
            count += 1
    past = time.time() - 3600
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))
    return count


def torchvision_scan(root: Path) -> int:
    return len(ImageFolder(str(root / "train"))) + len(ImageFolder(str(root / "val")))


def our_open(root: Path, cache: Path) -> int:
    splits = open_dataset("imagefolder", data_dir=str(root), cache_dir=str(cache))
    return sum(len(split) for split in splits.values())


def datasets_open(root: Path, cache: Path) -> int:
    import datasets

    datasets.disable_progress_bars()
    splits = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(cache))
    return sum(len(split) for split in splits.values())


def timed(function: Callable[[], int], expected: int) -> float:
    start = time.perf_counter()
    found = function()
    seconds = time.perf_counter() - start
    if found != expected:
        raise RuntimeError(f"{function} found {found} images, expected {expected}")
    return seconds


def measure(files: int, classes: int, rounds: int, with_datasets: bool, workdir: Path) -> list[Row]:
    """Rows for one folder of about `files` training images."""
    root = workdir / f"images_{files}"
    cache = workdir / f"cache_{files}"
    total = write_empty_image_folder(root, files, classes)
    torchvision_scan(root)  # untimed: the OS caches the folders' metadata for every timing below
    seconds: dict[str, list[float]] = {"torchvision": [], "first": [], "warm": []}

    def first_open() -> int:
        shutil.rmtree(cache / INDEX_FOLDER, ignore_errors=True)
        return our_open(root, cache)

    for round_index in range(rounds):
        order = ["torchvision", "first", "warm"] if round_index % 2 == 0 else ["first", "warm", "torchvision"]
        for name in order:
            function = {"torchvision": lambda: torchvision_scan(root), "first": first_open}.get(
                name, lambda: our_open(root, cache)
            )
            seconds[name].append(timed(function, total))
    reference = statistics.median(seconds["torchvision"])
    rows = []
    for name, label in (("first", "first_open"), ("warm", "warm_open")):
        ours = statistics.median(seconds[name])
        ratios = [o / r for o, r in zip(seconds[name], seconds["torchvision"])]
        spread = f"rounds {min(ratios):.2f}-{max(ratios):.2f}; " if len(ratios) > 1 else ""
        rows.append(
            Row(
                f"folder/{total}_files/{label}",
                ours,
                reference,
                statistics.median(ratios),
                "s",
                f"{spread}{1e6 * ours / total:.2f} us/file (torchvision {1e6 * reference / total:.2f})",
            )
        )
    if with_datasets:
        datasets_cache = workdir / f"datasets_cache_{files}"
        timed(lambda: datasets_open(root, datasets_cache), total)  # fills its Arrow cache
        before = timed(lambda: datasets_open(root, datasets_cache), total)
        reference_now = timed(lambda: torchvision_scan(root), total)
        rows.append(
            Row(
                f"folder/{total}_files/datasets_imagefolder_warm",
                before,
                reference_now,
                before / reference_now,
                "s",
                f"datasets' loader, Arrow cache warm, 1 round; {1e6 * before / total:.1f} us/file",
            )
        )
    shutil.rmtree(root, ignore_errors=True)
    return rows


def growth(rows: Sequence[Row]) -> list[str]:
    """How each time grows from the smallest folder to the largest, against the growth in files."""
    lines = []
    for kind in ("first_open", "warm_open", "datasets_imagefolder_warm"):
        measured = sorted((int(row.name.split("/")[1].split("_")[0]), row) for row in rows if row.name.endswith(kind))
        if len(measured) < 2:
            continue
        (small, first), (large, last) = measured[0], measured[-1]
        lines.append(
            f"{kind}: {large / small:.1f}x the files -> ours {last.ours / first.ours:.1f}x the time, "
            f"torchvision {last.reference / first.reference:.1f}x, ratio {first.ratio:.2f} -> {last.ratio:.2f}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[20000, 110000], help="training files per folder")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per folder")
    parser.add_argument(
        "--datasets-max", type=int, default=20000, help="time datasets' own loader on folders up to this many files"
    )
    parser.add_argument("--workdir", default=None, help="where to write the folders (default: a temporary folder)")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mambaout-bench-folders-", dir=args.workdir) as workdir:
        for files in args.files:
            for row in measure(files, args.classes, args.rounds, files <= args.datasets_max, Path(workdir)):
                rows.append(row)
                print(
                    f"{row.name}: ours {row.ours:.3g} s, torchvision {row.reference:.3g} s, ratio {row.ratio:.2f}",
                    flush=True,
                )
    print()
    print(rows_table(rows))
    for line in growth(rows):
        print(line)
    return rows


if __name__ == "__main__":
    main()
