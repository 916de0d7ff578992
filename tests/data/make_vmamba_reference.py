"""Write `vmamba_reference.pt`: outputs of the official VMamba code for seeded weights and inputs.

    python tests/data/make_vmamba_reference.py /tmp/ref/vmamba.py --commit 2ed52ea

The first argument is a copy of the official `vmamba.py` (https://github.com/MzeroMiko/VMamba,
e.g. `git -C VMamba show 2ed52ea:vmamba.py > /tmp/ref/vmamba.py`); it runs on the CPU with its
pure-PyTorch selective scan. For each reduced model of `CASES` the script fills the official model
with `seeded_state_dict` (a function of the sorted keys, shapes and a seed, so `tests/test_vmamba.py`
rebuilds the same weights for ours), runs it in eval mode on `seeded_input` images and records the
logits, the four stage outputs (NCHW, before each stage's downsampling) and the gradients of
`logits.sum()` for a few parameters. It also records the official parameter counts and key/shape
digests of the six published models, and the key names of older official checkpoints that the
official loading hooks rename (checked by loading them into the official model).

Only the recipe (seeds, model arguments) and the results are stored, not the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import re
import sys
import types
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

WEIGHTS_SEED = 20240110
TOLERANCE = 1e-5

# Reduced versions of the published models' arguments (the official model functions'), as official `VSSM` kwargs.
_SHARED = dict(
    patch_size=4,
    in_chans=3,
    num_classes=10,
    ssm_dt_rank="auto",
    ssm_act_layer="silu",
    ssm_drop_rate=0.0,
    ssm_init="v0",
    mlp_act_layer="gelu",
    mlp_drop_rate=0.0,
    drop_path_rate=0.2,
    patch_norm=True,
)
CASES = {
    # vanilla_vmamba_*: forward type v0, no MLP, patch merging
    "v0": dict(
        model_args=dict(
            _SHARED,
            depths=[1, 1, 2, 1],
            dims=24,
            ssm_d_state=16,
            ssm_ratio=2.0,
            ssm_conv=3,
            ssm_conv_bias=True,
            forward_type="v0",
            mlp_ratio=0.0,
            norm_layer="ln",
            downsample_version="v1",
            patchembed_version="v1",
        ),
        inputs=[dict(shape=[2, 3, 64, 64], seed=1, stages=True), dict(shape=[1, 3, 32, 64], seed=2, stages=False)],
        grads=[
            "patch_embed.0.weight",
            "layers.0.blocks.0.op.A_logs",
            "layers.0.blocks.0.op.Ds",
            "layers.0.blocks.0.op.dt_projs_bias",
            "layers.0.blocks.0.op.dt_projs_weight",
            "layers.0.blocks.0.op.conv2d.weight",
        ],
    ),
    # vmamba_tiny_s1l8 (and _s2l15 with ssm_ratio 2): forward type v05_noz, channels-first, MLP, conv stem
    "v05_noz": dict(
        model_args=dict(
            _SHARED,
            depths=[1, 1, 2, 1],
            dims=24,
            ssm_d_state=1,
            ssm_ratio=1.0,
            ssm_conv=3,
            ssm_conv_bias=False,
            forward_type="v05_noz",
            mlp_ratio=4.0,
            norm_layer="ln2d",
            downsample_version="v3",
            patchembed_version="v2",
        ),
        inputs=[dict(shape=[2, 3, 64, 64], seed=3, stages=True), dict(shape=[1, 3, 56, 40], seed=4, stages=False)],
        grads=[
            "patch_embed.0.weight",
            "layers.0.blocks.0.op.A_logs",
            "layers.0.blocks.0.op.Ds",
            "layers.0.blocks.0.op.dt_projs_bias",
            "layers.0.blocks.0.op.x_proj.weight",
            "layers.0.blocks.0.op.dt_projs.weight",
            "layers.0.blocks.0.op.conv2d.weight",
        ],
    ),
    # the same mixer with its gate, channels-last, d_state > 1, a given dt_rank, 2x2-conv downsampling
    "v05": dict(
        model_args=dict(
            _SHARED,
            depths=[1, 1, 1, 1],
            dims=16,
            ssm_d_state=4,
            ssm_ratio=2.0,
            ssm_dt_rank=3,
            ssm_conv=3,
            ssm_conv_bias=True,
            forward_type="v05",
            mlp_ratio=2.0,
            norm_layer="ln",
            downsample_version="v2",
            patchembed_version="v1",
        ),
        inputs=[dict(shape=[2, 3, 48, 64], seed=5, stages=False)],
        grads=["patch_embed.0.weight", "layers.0.blocks.0.op.A_logs", "layers.0.blocks.0.op.x_proj.weight"],
    ),
}
PUBLISHED_MODELS = (
    "vanilla_vmamba_tiny",
    "vanilla_vmamba_small",
    "vanilla_vmamba_base",
    "vmamba_tiny_s1l8",
    "vmamba_small_s2l15",
    "vmamba_base_s2l15",
)


def seeded_tensor(key: str, shape: Sequence[int], seed: int = WEIGHTS_SEED) -> torch.Tensor:
    """A float32 tensor that depends only on `key`, `shape` and `seed`, with values a trained VMamba could hold.

    `A_logs = log(1..N) + U(-0.5, 0.5)`; `Ds` in [0.5, 1.5]; `dt_projs_bias` the inverse softplus of
    step sizes log-uniform in [0.01, 0.5]; other 1-D weights (norms) `1 + 0.1 N(0, 1)`, 1-D biases
    `0.1 N(0, 1)`; matrices and kernels `N(0, 1 / fan_in)` (stacked per-direction projections: the
    last dim is the fan-in).
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    shape = tuple(shape)
    normal = torch.randn(shape, generator=generator)
    uniform = torch.rand(shape, generator=generator)
    name = key.rpartition(".")[2]
    if name == "A_logs":
        return torch.log(torch.arange(1, shape[-1] + 1, dtype=torch.float32)) + uniform - 0.5
    if name == "Ds":
        return 0.5 + uniform
    if name == "dt_projs_bias":
        dt = torch.exp(math.log(0.01) + uniform * (math.log(0.5) - math.log(0.01)))
        return dt + torch.log(-torch.expm1(-dt))
    if len(shape) == 1:
        return 1.0 + 0.1 * normal if name == "weight" else 0.1 * normal
    fan_in = shape[-1] if name.endswith("_weight") else math.prod(shape[1:])
    return normal / math.sqrt(fan_in)


def seeded_state_dict(shapes: Mapping[str, Sequence[int]], seed: int = WEIGHTS_SEED) -> dict[str, torch.Tensor]:
    """`seeded_tensor` for each key of a state dict (given as key -> shape), in sorted key order."""
    return {key: seeded_tensor(key, shapes[key], seed) for key in sorted(shapes)}


def seeded_input(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard-normal images of `shape`."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def shape_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the state dict's `key:shape` lines, in its order."""
    lines = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in state_dict.items())
    return hashlib.sha256(lines.encode()).hexdigest()


# Older official key names, as the official `_load_from_state_dict` hooks rename them (new -> old).
_OLD_NAMES = (
    (r"^(layers\.\d+\.blocks\.\d+)\.norm\.", r"\1.ln_1."),
    (r"^(layers\.\d+\.blocks\.\d+)\.op\.", r"\1.self_attention."),
    (r"^classifier\.norm\.", "norm."),
    (r"^classifier\.head\.", "head."),
    (r"\.x_proj\.weight$", ".x_proj_weight"),
    (r"\.dt_projs\.weight$", ".dt_projs_weight"),
)
# Those of Swin's one-conv stem and patch merging only.
_OLD_STEM_NAMES = ((r"^patch_embed\.0\.", "patch_embed.proj."), (r"^patch_embed\.2\.", "patch_embed.norm."))
_OLD_MERGING_NAMES = (
    (r"^(layers\.\d+\.downsample)\.1\.", r"\1.norm."),
    (r"^(layers\.\d+\.downsample)\.2\.", r"\1.reduction."),
)


def old_layout(state_dict: Mapping[str, torch.Tensor], model_args: Mapping) -> dict[str, torch.Tensor]:
    """`state_dict` under the names of older official checkpoints, stacked projections as `[4, out, in]`."""
    renames = _OLD_NAMES
    if model_args["patchembed_version"] == "v1":
        renames += _OLD_STEM_NAMES
    if model_args["downsample_version"] == "v1":
        renames += _OLD_MERGING_NAMES
    old = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in renames:
            new_key = re.sub(pattern, replacement, new_key)
        if new_key.endswith(("x_proj_weight", "dt_projs_weight")) and value.dim() == 2:
            value = value.view(4, value.shape[0] // 4, value.shape[1])
        old[new_key] = value
    return old


def _import_official(path: Path) -> types.ModuleType:
    if importlib.util.find_spec("triton") is None:  # the file decorates its CUDA kernels at import
        triton = types.ModuleType("triton")
        triton.jit = lambda fn: fn
        triton.language = types.ModuleType("triton.language")
        triton.language.tensor = triton.language.constexpr = object
        sys.modules.update({"triton": triton, "triton.language": triton.language})
    spec = importlib.util.spec_from_file_location("vmamba_official", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vmamba_official"] = module
    spec.loader.exec_module(module)
    module.WITH_SELECTIVESCAN_MAMBA = False  # the pure-PyTorch `selective_scan_torch`
    return module


def _git_blob_sha(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _run_case(official: types.ModuleType, case: dict) -> dict:
    torch.manual_seed(0)  # the official init draws; every tensor is replaced below
    model = official.VSSM(**case["model_args"]).eval()
    state_dict = model.state_dict()
    seeded = seeded_state_dict({k: v.shape for k, v in state_dict.items()})
    model.load_state_dict(seeded, strict=True)
    channels_first = case["model_args"]["norm_layer"] == "ln2d"

    results = []
    for spec in case["inputs"]:
        images = seeded_input(spec["shape"], spec["seed"])
        with torch.no_grad():
            x = model.patch_embed(images)
            stages = []
            for layer in model.layers:
                x = layer.blocks(x)
                stages.append((x if channels_first else x.permute(0, 3, 1, 2)).contiguous())
                x = layer.downsample(x)
            logits = model.classifier(x)
            if not torch.equal(logits, model(images)):
                raise RuntimeError("The stage-by-stage run differs from the official forward.")
        results.append(dict(spec, logits=logits, stages=stages if spec["stages"] else None))

    images = seeded_input(case["inputs"][0]["shape"], case["inputs"][0]["seed"])
    model.zero_grad()
    model(images).sum().backward()
    parameters = dict(model.named_parameters())
    grads = {name: parameters[name].grad.clone() for name in case["grads"]}

    old = old_layout(seeded, case["model_args"])
    check = official.VSSM(**case["model_args"])
    check.load_state_dict(dict(old), strict=True)  # through the official renaming hooks
    for key, value in check.state_dict().items():
        if not torch.equal(value, seeded[key]):
            raise RuntimeError(f"The official hooks did not restore '{key}' from the older names.")
    old_keys = {new: old_key for new, old_key in zip(seeded, old)}

    return dict(
        model_args=case["model_args"],
        state_dict_shapes=[(key, list(value.shape)) for key, value in state_dict.items()],
        outputs=results,
        grads=grads,
        old_keys=[(new, old_keys[new]) for new in sorted(old_keys) if old_keys[new] != new],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vmamba_py", type=Path, help="a copy of the official vmamba.py")
    parser.add_argument("--commit", required=True, help="the official commit the copy comes from")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("vmamba_reference.pt"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    official = _import_official(args.vmamba_py)
    published = {}
    for name in PUBLISHED_MODELS:
        model = getattr(official, name)()
        published[name] = dict(
            params=sum(p.numel() for p in model.parameters()), digest=shape_digest(model.state_dict())
        )
    reference = dict(
        official_commit=args.commit,
        official_file_blob=_git_blob_sha(args.vmamba_py),
        torch_version=str(torch.__version__),
        weights_seed=WEIGHTS_SEED,
        published=published,
        cases={name: _run_case(official, case) for name, case in CASES.items()},
    )
    torch.save(reference, args.output)
    print(f"Wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB).")


if __name__ == "__main__":
    main()
