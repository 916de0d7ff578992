"""The visual Mamba baselines: size and cost against the published figures, and their speed against MambaOut's.

    python benchmarks/baselines.py complexity                        # params / GMACs: backbones, UperNet, Mask R-CNN
    python benchmarks/baselines.py speed                             # img/s and peak memory, every model, 224²
    python benchmarks/baselines.py speed --sizes 224 512 800x1280 --batch-size 2
    python benchmarks/baselines.py speed --device cuda --precision bf16 --batch-size 64   # on a GPU
    python benchmarks/baselines.py official --vmamba-file /tmp/vmamba.py --vim-repo /tmp/Vim   # ours / official
    python benchmarks/baselines.py official --vmamba-file /tmp/vmamba.py --modes infer --rounds 2 --steps 1
    python benchmarks/baselines.py official --vmamba-file /tmp/vmamba.py --modes train --sizes 64 --models vmamba_tiny_s1l8

`complexity` builds every network on the meta device and counts one forward pass with
`FlopCounterMode` (MACs = FLOPs / 2; the selective scans counted by VMamba's formula, see
`mambaout_pl.models.mixers.ssm.selective_scan_macs`): backbones at 224², UperNet (150 classes) at
512x2048 and Mask R-CNN (80 classes; 1000 box and 100 mask RoIs) at 800x1280, as the MambaOut and
VMamba papers count them; the published figures beside.

`speed` measures training steps (forward, backward, SGD step) and inference forward passes of each
model, one model at a time in a fresh process, so the peak memory (CPU: the process's peak
resident memory above what it held before the first step; CUDA: the allocator's peak) belongs to
that model alone.

`official` times ours against the official pure-PyTorch paths with the same weights and input
(VMamba's single-file `vmamba.py` from the repository's root with its torch fallback; the one in
`classification/models/` enters `torch.cuda.device` in its cross scan and fails on CPU tensors; Vim's models with its Mamba fork's reference
functions, MambaVision with `mamba_ssm`'s `selective_scan_ref`), in alternating rounds. `--vim-repo`
is an export of hustvl/Vim's `vim/`, `mamba-1p1p1/mamba_ssm` and `causal-conv1d/causal_conv1d`
(see tests/data/make_vim_reference.py). VMamba's fallback differentiates a scan whose backward grows
with the square of the sequence, so its training steps are timed at small inputs (`--sizes 64`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import alternating_rates, compare, rows_table  # noqa: E402
from detection_complexity import complexity as detection_complexity  # noqa: E402
from segmentation_complexity import complexity as segmentation_complexity  # noqa: E402

from mambaout_pl.analysis import count_macs, format_table, machine_description  # noqa: E402
from mambaout_pl.models import create_model  # noqa: E402

# Published (params M, GMACs at 224²): MambaOut paper Table 1 and the baselines' own papers/READMEs.
PUBLISHED = {
    "mambaout_tiny": (26.5, 4.5),
    "vanilla_vmamba_tiny": (22, 5.6),
    "vanilla_vmamba_small": (44, 11.2),
    "vanilla_vmamba_base": (75, 18.0),
    "vmamba_tiny_s1l8": (31, 4.9),
    "vmamba_small_s2l15": (50, 8.7),
    "vmamba_base_s2l15": (89, 15.4),
    "vim_tiny": (7, 1.5),
    "vim_small": (26, 5.1),
    "mamba_vision_T": (31.8, 4.4),
    "mamba_vision_T2": (35.1, 5.1),
    "mamba_vision_S": (50.1, 7.5),
    "mamba_vision_B": (97.7, 15.0),
}
# Official parameter counts (1000 classes), counted from the official code.
OFFICIAL_PARAMS = {
    "vanilla_vmamba_tiny": 22_893_448,
    "vanilla_vmamba_small": 44_417_416,
    "vanilla_vmamba_base": 76_254_056,
    "vmamba_tiny_s1l8": 30_249_064,
    "vmamba_small_s2l15": 50_147_752,
    "vmamba_base_s2l15": 88_557_800,
    "vim_tiny": 7_148_008,
    "vim_small": 25_796_584,
    "mamba_vision_T": 31_794_248,
    "mamba_vision_T2": 35_104_008,
    "mamba_vision_S": 50_140_584,
    "mamba_vision_B": 97_685_288,
}
# Dense tasks (params M, GMACs): Mask R-CNN 1x at 800x1280, UperNet at 512x2048 (MambaOut paper Tables 2-3, VMamba README).
PUBLISHED_DETECTION = {"mambaout_tiny": (43, 262), "vanilla_vmamba_tiny": (42, 286), "vmamba_tiny_s1l8": (50, 271)}
PUBLISHED_SEGMENTATION = {"mambaout_tiny": (54, 938), "vanilla_vmamba_tiny": (55, 964), "vmamba_tiny_s1l8": (62, 949)}
# timm's published inference rates at 224² on one RTX 4090 (AMP, batch 1024, eager; PyTorch 2.9.1, CUDA 12.8):
# results/benchmark-infer-amp-nchw-pt291-cu128-4090.csv of huggingface/pytorch-image-models.
PUBLISHED_4090_INFER = {"mambaout_tiny": 3965.38, "convnext_tiny": 4814.88}
SPEED_MODELS = (
    "mambaout_tiny",
    "vanilla_vmamba_tiny",
    "vmamba_tiny_s1l8",
    "vim_tiny",
    "vim_small",
    "mamba_vision_T",
    "convnext_tiny",
)


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width or height)


def meta_model(name: str, image_size: tuple[int, int] = (224, 224)) -> torch.nn.Module:
    kwargs = {"img_size": image_size} if name.startswith("vim") else {}
    with torch.device("meta"):
        return create_model(name, **kwargs).eval()


def run_complexity(args: argparse.Namespace) -> None:
    rows = []
    for name in args.models or list(PUBLISHED):
        model = meta_model(name)
        params = sum(p.numel() for p in model.parameters())
        paper_params, paper_gmacs = PUBLISHED[name]
        official = OFFICIAL_PARAMS.get(name)
        rows.append(
            (
                name,
                f"{params:,}",
                f"{official:,}" if official else "-",
                "yes" if official is None or params == official else "NO",
                f"{params / 1e6:.1f} [{paper_params}]",
                f"{count_macs(model, (224, 224)) / 1e9:.2f} [{paper_gmacs}]",
            )
        )
    print("Backbones, 1000 classes, 224² (published in brackets)")
    headers = ("model", "params", "official params", "equal", "params M", "GMACs")
    print(format_table(headers, rows, right=(False, True, True, False, True, True)))

    rows = []
    for name, (paper_params, paper_gmacs) in PUBLISHED_SEGMENTATION.items():
        row = segmentation_complexity(name, 512, 2048)
        rows.append((name, f"{row['params_M']:.1f} [{paper_params}]", f"{row['GMACs']:.0f} [{paper_gmacs}]"))
    print("\nUperNet, 150 classes, 512x2048, whole image (published in brackets)")
    print(format_table(("backbone", "params M", "GMACs"), rows, right=(False, True, True)))

    rows = []
    for name, (paper_params, paper_gmacs) in PUBLISHED_DETECTION.items():
        row = detection_complexity(name, 800, 1280)
        rows.append((name, f"{row['params_M']:.1f} [{paper_params}]", f"{row['GMACs']:.0f} [{paper_gmacs}]"))
    print("\nMask R-CNN, 80 classes, 800x1280, 1000 box / 100 mask RoIs (published in brackets)")
    print(format_table(("backbone", "params M", "GMACs"), rows, right=(False, True, True)))


# -- speed -------------------------------------------------------------------------------------------


def training_step(model: torch.nn.Module, images: torch.Tensor, precision: str):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    targets = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    return step


def inference_step(model: torch.nn.Module, images: torch.Tensor, precision: str):
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            model(images)

    model.eval()
    return step


def resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_case(name: str, mode: str, size: tuple[int, int], batch: int, device: str, precision: str, steps: int):
    """img/s and peak memory (MiB) of one model in this process."""
    torch.manual_seed(0)
    kwargs = {"img_size": size} if name.startswith("vim") else {}
    model = create_model(name, **kwargs).to(device)
    images = torch.randn(batch, 3, *size, device=device)
    step = (training_step if mode == "train" else inference_step)(model, images, precision)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resident_bytes()
    step()  # warm-up
    rates = alternating_rates(
        {name: step}, batch, rounds=1, steps_per_round=steps, warmup=0, device=torch.device(device)
    )
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"img_per_s": rates[name][0], "peak_MiB": peak / 2**20}


def run_speed(args: argparse.Namespace) -> None:
    rows, records = [], []
    for size_text in args.sizes:
        size = parse_size(size_text)
        for name in args.models or SPEED_MODELS:
            cells = [name, f"{size[0]}x{size[1]}"]
            for mode in ("train", "infer"):
                case = [
                    name,
                    mode,
                    f"{size[0]}x{size[1]}",
                    str(args.batch_size),
                    args.device,
                    args.precision,
                    str(args.steps),
                ]
                result = subprocess.run(
                    [sys.executable, __file__, "_case", *case], capture_output=True, text=True, check=False
                )
                if result.returncode != 0:
                    cells += ["failed", result.stderr.strip().splitlines()[-1][:40] if result.stderr else "?"]
                    continue
                measured = json.loads(result.stdout.strip().splitlines()[-1])
                records.append({"model": name, "mode": mode, "size": size_text, **measured})
                cells += [f"{measured['img_per_s']:.3g}", f"{measured['peak_MiB']:.0f}"]
            rows.append(cells)
            print(" | ".join(cells), flush=True)
    print(f"\n{machine_description(args.device)}; batch {args.batch_size}, {args.precision}, {args.steps} timed steps")
    headers = ("model", "size", "train img/s", "train peak MiB", "infer img/s", "infer peak MiB")
    if args.device.startswith("cuda"):  # timm's own 4090 figures beside ours, where it publishes one
        headers += ("timm 4090 infer img/s (224², AMP)",)
        rows = [
            [*cells, f"{PUBLISHED_4090_INFER[cells[0]]:.0f}" if cells[0] in PUBLISHED_4090_INFER else ""]
            for cells in rows
        ]
    print(format_table(headers, rows, right=(False, False, *[True] * (len(headers) - 2))))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


# -- ours against the official pure-PyTorch code ------------------------------------------------------


def load_module(name: str, path: str | os.PathLike) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def official_vmamba(vmamba_file: str, name: str) -> torch.nn.Module:
    return getattr(load_module("vmamba_official", vmamba_file), name)()


def mamba_reference_module(vim_repo: str) -> types.ModuleType:
    """mamba_ssm's `selective_scan_interface` (Vim's fork) with its CUDA extension left out: the reference functions."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    return load_module(
        "mamba_selective_scan_reference", Path(vim_repo) / "mamba-1p1p1/mamba_ssm/ops/selective_scan_interface.py"
    )


def official_mamba_vision(vim_repo: str, name: str) -> torch.nn.Module:
    reference = mamba_reference_module(vim_repo)
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = reference.selective_scan_ref
    for package in ("mamba_ssm", "mamba_ssm.ops"):
        sys.modules.setdefault(package, types.ModuleType(package))
    sys.modules["mamba_ssm.ops.selective_scan_interface"] = interface
    from mambavision.models import mamba_vision

    return getattr(mamba_vision, name)()


def official_vim(vim_repo: str, name: str, img_size: int = 224) -> torch.nn.Module:
    """The official `VisionMamba` of `vim_repo` (an export of hustvl/Vim), its CUDA kernels replaced by the
    repository's own reference functions (see tests/data/make_vim_reference.py, which does the replacing)."""
    script = load_module("make_vim_reference", ROOT / "tests" / "data" / "make_vim_reference.py")
    models_mamba = script.load_official(Path(vim_repo))
    width = {"vim_tiny": 192, "vim_small": 384}[name]
    return models_mamba.VisionMamba(img_size=img_size, embed_dim=width, depth=24, **script.OFFICIAL_ARGS)


def run_official(args: argparse.Namespace) -> None:
    cases = []
    if args.vmamba_file:
        cases += [
            (name, lambda n=name: official_vmamba(args.vmamba_file, n))
            for name in ("vanilla_vmamba_tiny", "vmamba_tiny_s1l8")
        ]
    if args.vim_repo and importlib.util.find_spec("mambavision"):
        cases += [("mamba_vision_T", lambda: official_mamba_vision(args.vim_repo, "mamba_vision_T"))]
    size = parse_size(args.sizes[0])
    if args.vim_repo:  # last: its stand-in for the CUDA extension would make vmamba.py take its CUDA path
        cases += [("vim_tiny", lambda: official_vim(args.vim_repo, "vim_tiny", size[0]))]
    if args.models:
        cases = [case for case in cases if case[0] in args.models]
    if not cases:
        raise SystemExit("Give --vmamba-file (a copy of VMamba's vmamba.py) and/or --vim-repo (Vim's repository).")
    rows = []
    for name, build_official in cases:
        torch.manual_seed(0)
        official = build_official()
        ours = create_model(name, **({"img_size": size[0]} if name.startswith("vim") else {}))  # the official grid
        rename = getattr(ours, "checkpoint_filter_fn", None)  # older official key layouts, as load_pretrained does
        state = official.state_dict()
        ours.load_state_dict(rename(state) if rename else state, strict=True)
        images = torch.randn(args.batch_size, 3, *size)
        for mode, make in ((m, {"infer": inference_step, "train": training_step}[m]) for m in args.modes):
            steps = {"ours": make(ours, images, args.precision), "reference": make(official, images, args.precision)}
            rates = alternating_rates(steps, args.batch_size, args.rounds, args.steps, warmup=1)
            row = compare(f"{name}/{mode}/{size[0]}px", rates, "img/s")
            rows.append(row)
            print(
                f"{row.name}: ours {row.ours:.3g} img/s, official {row.reference:.3g}, ratio {row.ratio:.2f}",
                flush=True,
            )
    print(f"\n{machine_description('cpu')}; batch {args.batch_size}, {args.precision}; reference = the official code")
    print(rows_table(rows))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_case"]:
        name, mode, size, batch, device, precision, steps = argv[1:]
        print(json.dumps(measure_case(name, mode, parse_size(size), int(batch), device, precision, int(steps))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=("complexity", "speed", "official"))
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--sizes", nargs="+", default=["224"], help="input sizes, 224 or HEIGHTxWIDTH")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (per round for `official`)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of `official`")
    parser.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--vmamba-file", default=os.environ.get("VMAMBA_FILE"))
    parser.add_argument("--vim-repo", default=os.environ.get("VIM_REPO"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    {"complexity": run_complexity, "speed": run_speed, "official": run_official}[args.section](args)


if __name__ == "__main__":
    main()
