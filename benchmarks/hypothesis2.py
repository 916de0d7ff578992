"""MambaOut's Hypothesis 2 at small scale: does the SSM help where the first stage's sequence is long (L > 6D)?

The embedded segmentation and detection scenes (recipes/quickstart_segmentation.yaml,
recipes/quickstart_detection.yaml), each one `mambaout compare` grid: arms gated_conv (MambaOut),
ssm_cross (VMamba's four-way scan), attention_full and gated_conv_k15 (a 15x15 kernel), plus any
`--extra-arms` (e.g. recipes/baselines/*.yaml); three seeds; input sizes whose first stage (stride 4,
D = 48 channels for MambaOut-Femto, so L/6D = (S/4)^2 / 288) goes from short to long:

    CPU (2 cores, --jobs 2 --threads 1): segmentation 48, 96 (L/6D 0.50, 2.00); detection 64, 96 (0.89, 2.00)
    one GPU (--gpu, --jobs 8): segmentation 64, 144, 192 (0.89, 4.50, 8.00); detection 64, 160, 192 (0.89, 5.56, 8.00)

The schedules are shortened to fit the budget: the CPU grid trains each segmentation run 100
steps of 16 scenes (two epochs of 50 steps: 1.3 passes over its 1200 scenes, against the quick
start's 20) and each detection run 150 steps of 8 (2 of the quick start's 12 epochs), the GPU
grid 3 epochs of each scene; all cut the warm-up to 10 steps and validate once,
on the final weights, on the whole validation split (no validation during the fit, no sanity
check). CPU, measured on a 2-core CPU with `--jobs 2 --threads 1` (2026-12-07, other jobs sharing
it): the 24 segmentation runs in 23 min 34 s, the 24 detection runs in about 27 minutes; GPU: sized for 10 minutes for the 72 runs, not yet
timed on a GPU. At the CPU schedule the quick starts are still near the start of their learning
curves (segmentation leaves its all-background plateau after about 5 epochs, detection's box mAP
is 0.02 after 2 epochs), so each grid also reports a second metric that moves sooner
(`SECOND_METRIC`: segmentation's val/loss, detection's val/bbox_mAP) and the CPU grid shows the
costs and how soon each mixer starts to learn, not where it ends.

    python benchmarks/hypothesis2.py                        # the CPU grid into runs/hypothesis2/cpu/<scene>
    python benchmarks/hypothesis2.py --gpu                  # the GPU grid into runs/hypothesis2/gpu/<scene>
    python benchmarks/hypothesis2.py --dry-run              # the runs and their status, nothing run
    python benchmarks/hypothesis2.py --print-commands       # the two `mambaout compare` commands
    python benchmarks/hypothesis2.py --extra-arms recipes/baselines/vmamba_tiny.yaml

Run again to resume: finished runs are kept, interrupted ones continue from their last.ckpt.
"""

import argparse
import shlex
import sys
from pathlib import Path

from mambaout_pl.compare import compare_main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ARMS = [
    RECIPES / "ablation" / f"{name}.yaml" for name in ("gated_conv", "ssm_cross", "attention_full", "gated_conv_k15")
]
SCENES = {"segmentation": RECIPES / "quickstart_segmentation.yaml", "detection": RECIPES / "quickstart_detection.yaml"}
# Reported beside the task's monitor: the loss moves while mIoU sits on its all-background plateau.
SECOND_METRIC = {"segmentation": "val/loss", "detection": "val/bbox_mAP"}
# Every run: warm-up cut to 10 steps, validated once on its final weights (by `validate`), no sanity check.
COMMON = ["--model.warmup_steps=10", "--trainer.num_sanity_val_steps=0", "--trainer.check_val_every_n_epoch=1000"]
SETTINGS = {
    "cpu": {
        "jobs": 2,
        "sizes": {"segmentation": [48, 96], "detection": [64, 96]},
        "overrides": {
            "segmentation": ["--trainer.max_epochs=2", "--trainer.limit_train_batches=50", "--data.num_workers=0"],
            "detection": ["--trainer.max_epochs=2", "--data.num_workers=0"],
        },
    },
    "gpu": {
        "jobs": 8,
        "sizes": {"segmentation": [64, 144, 192], "detection": [64, 160, 192]},
        "overrides": {
            scene: [
                "--trainer.accelerator=gpu",
                "--trainer.precision=bf16-mixed",
                "--trainer.max_epochs=3",
                "--data.num_workers=1",
            ]
            for scene in SCENES
        },
    },
}


def commands(args: argparse.Namespace) -> list[list[str]]:
    """The `mambaout compare` argument lists, one per scene."""
    setting = SETTINGS["gpu" if args.gpu else "cpu"]
    listed = []
    for scene in args.scenes:
        command = ["--config", str(SCENES[scene]), "--arms", *map(str, ARMS + args.extra_arms)]
        command += ["--sizes", *map(str, setting["sizes"][scene]), "--seeds", str(args.seeds)]
        command += ["--out", str(args.out / ("gpu" if args.gpu else "cpu") / scene)]
        command += ["--jobs", str(args.jobs or setting["jobs"])]
        command += ["--threads", str(args.threads)] if args.threads else []
        command += ["--metric", args.metric or SECOND_METRIC[scene]]
        command += ["--dry-run"] if args.dry_run else []
        listed.append([*command, "--", *COMMON, *setting["overrides"][scene]])
    return listed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the single-GPU grid (L/6D up to 8)")
    parser.add_argument("--scenes", nargs="+", choices=list(SCENES), default=list(SCENES))
    parser.add_argument(
        "--extra-arms", nargs="+", type=Path, default=[], help="more overlays, e.g. recipes/baselines/*.yaml"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (CPU 2, GPU 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument(
        "--metric",
        default=None,
        help="a second metric reported beside the task's (default: segmentation val/loss, detection val/bbox_mAP)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "hypothesis2")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their status")
    parser.add_argument("--print-commands", action="store_true", help="print the equivalent commands, run nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    status = 0
    for command in commands(args):
        if args.print_commands:
            print(shlex.join(["mambaout", "compare", *command]))
            continue
        status = max(status, compare_main(command))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
