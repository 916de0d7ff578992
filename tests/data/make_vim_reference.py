"""Write `vim_reference.pt`: outputs of the official Vision Mamba code (hustvl/Vim) on seeded weights.

Usage, from an export of the official repository's files:

    git -C <Vim clone> archive dd0358a vim mamba-1p1p1/mamba_ssm causal-conv1d/causal_conv1d \
        | tar -x -C /tmp/vim_official
    python tests/data/make_vim_reference.py /tmp/vim_official --commit dd0358a

The official model needs CUDA: its Mamba layers call fused kernels (`mamba_inner_fn_no_out_proj`,
`causal_conv1d_fn`, `selective_scan_cuda`) and its norms Triton kernels (`rms_norm_fn`). Here each
is replaced, at that import boundary, by the pure-PyTorch reference function of the same repository:

- `mamba_inner_fn_no_out_proj` -> `mamba_inner_ref` (with an identity output projection, which is
  exact, and the result transposed back to `[batch, channels, length]`); bimamba v2 runs it on both
  token orders, as the real model's fast path does;
- inside it, `selective_scan_fn` -> `selective_scan_ref` and `causal_conv1d_fn` -> `causal_conv1d_ref`;
- `rms_norm_fn` (the fused add + RMSNorm) -> `rms_norm_ref`.

The compiled extension modules (`selective_scan_cuda`, `causal_conv1d_cuda`) are empty stand-ins, and
`mamba_ssm.utils.generation` / `mamba_ssm.utils.hf`, which need `transformers` and which the vision
model does not use, are stand-ins too. Triton is imported for real when installed (its kernels are
never called), else an inert stand-in lets `layer_norm.py` define them.

The official models are built on CPU in float32 and eval mode, filled by `seeded_state_dict` (which
the tests use to fill ours) and run on seeded inputs.
"""

import argparse
import importlib.util
import math
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

OUTPUT = Path(__file__).with_name("vim_reference.pt")

# The arguments of the official `vim_*_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2`.
OFFICIAL_ARGS = dict(
    patch_size=16,
    rms_norm=True,
    residual_in_fp32=True,
    fused_add_norm=True,
    final_pool_type="mean",
    if_abs_pos_embed=True,
    if_rope=False,
    if_rope_residual=False,
    bimamba_type="v2",
    if_cls_token=True,
    if_divide_out=True,
    use_middle_cls_token=True,
)

# Reduced models: name -> (VisionMamba arguments, input batch shape).
CONFIGS = {
    "base": (dict(img_size=64, embed_dim=64, depth=4, d_state=16, num_classes=10), (2, 3, 64, 64)),
    "narrow": (dict(img_size=32, embed_dim=48, depth=2, d_state=8, num_classes=5), (2, 3, 32, 32)),
}
# 'base' weights at another, non-square input size (3 x 5 patches, the class token at index 7 of 16).
RESIZED_INPUT = (1, 3, 48, 80)
DROP_PATH_RATE = 0.1


def _hash_uniform(numel: int, index: int) -> torch.Tensor:
    """`numel` deterministic values in (-1, 1), a different sequence for each `index` (no RNG involved)."""
    i = torch.arange(numel, dtype=torch.float64)
    return torch.frac(torch.sin(i * 12.9898 + index * 78.233 + 0.5) * 43758.5453)


def seeded_state_dict(shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for a Vim state dict, from its keys (sorted) and shapes alone.

    Values are uniform-like in (-1, 1), scaled by the kind of tensor so the model stays in a sensible
    range: `A_log` near `log(1..N)`, `D` and norm weights near 1, `dt_proj` biases the inverse
    softplus of step sizes in [1e-3, 1e-1], weights `+-1/sqrt(fan_in)`, biases small, and the class
    token and position embeddings large enough that their placement shows in the outputs.
    """
    weights = {}
    for index, key in enumerate(sorted(shapes)):
        shape = tuple(shapes[key])
        numel = math.prod(shape)
        u = _hash_uniform(numel, index).view(shape)
        name = key.rpartition(".")[2]
        if name in ("A_log", "A_b_log"):
            value = torch.log(torch.arange(1, shape[-1] + 1, dtype=torch.float64)) + 0.1 * u
        elif name in ("D", "D_b") or key.endswith("norm.weight") or key == "norm_f.weight":
            value = 1.0 + 0.1 * u
        elif key.endswith(("dt_proj.bias", "dt_proj_b.bias")):
            dt = torch.exp(math.log(1e-3) + 0.5 * (u + 1.0) * (math.log(1e-1) - math.log(1e-3)))
            value = dt + torch.log(-torch.expm1(-dt))
        elif name in ("cls_token", "pos_embed"):
            value = 0.5 * u
        elif name == "bias":
            value = 0.02 * u
        else:
            value = u * (numel // shape[0]) ** -0.5
        weights[key] = value.float()
    return weights


def fp16_exact_input(shape: Sequence[int], index: int) -> torch.Tensor:
    """A deterministic image batch of values exactly representable in float16 (so it is stored in half)."""
    return (2.0 * _hash_uniform(math.prod(shape), 10_000 + index)).view(*shape).half().float()


def resample_patch_positions(pos_embed: torch.Tensor, old_grid: tuple, new_grid: tuple) -> torch.Tensor:
    """The position rule under test: the class token's entry sits at index `num_patches // 2`; the patch
    entries around it are resized bicubically as an `old_grid` image, and the class entry is put back at the
    middle of the new sequence."""
    middle = old_grid[0] * old_grid[1] // 2
    cls_pos = pos_embed[:, middle : middle + 1]
    patch_pos = torch.cat([pos_embed[:, :middle], pos_embed[:, middle + 1 :]], dim=1)
    grid = patch_pos.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).flatten(1, 2)
    new_middle = new_grid[0] * new_grid[1] // 2
    return torch.cat([patch_pos[:, :new_middle], cls_pos, patch_pos[:, new_middle:]], dim=1)


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _inert_triton() -> None:
    """Stand-ins for `triton` / `triton.language`, enough for `layer_norm.py` to define (never run) its kernels."""

    def passthrough(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    language = _module("triton.language")
    language.__getattr__ = lambda name: object
    _module("triton", jit=passthrough, autotune=passthrough, heuristics=passthrough, Config=dict, language=language)


def load_official(root: Path) -> types.ModuleType:
    """Import the official `models_mamba` from an export at `root`, its CUDA kernels replaced by the references."""
    _module("selective_scan_cuda")
    _module("causal_conv1d_cuda")
    sys.path[:0] = [str(root / "causal-conv1d"), str(root / "vim")]
    causal_conv1d = importlib.import_module("causal_conv1d.causal_conv1d_interface")

    # `mamba_ssm/__init__.py` would import the language model (and `transformers`): register the packages bare.
    package_root = root / "mamba-1p1p1" / "mamba_ssm"
    for name, folder in (
        ("mamba_ssm", package_root),
        ("mamba_ssm.ops", package_root / "ops"),
        ("mamba_ssm.ops.triton", package_root / "ops" / "triton"),
        ("mamba_ssm.modules", package_root / "modules"),
        ("mamba_ssm.utils", package_root / "utils"),
    ):
        _module(name, __path__=[str(folder)])
    _module("mamba_ssm.utils.generation", GenerationMixin=object)
    _module("mamba_ssm.utils.hf", load_config_hf=None, load_state_dict_hf=None)

    try:
        import triton  # noqa: F401
    except ImportError:
        _inert_triton()
    layer_norm = _load_file("mamba_ssm.ops.triton.layer_norm", package_root / "ops" / "triton" / "layer_norm.py")

    def rms_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False, **unused):
        out = layer_norm.rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm)
        if prenorm and residual_in_fp32:
            return out[0], out[1].float()
        return out

    layer_norm.rms_norm_fn = rms_norm_fn

    scan = _load_file("mamba_ssm.ops.selective_scan_interface", package_root / "ops" / "selective_scan_interface.py")
    scan.selective_scan_fn = scan.selective_scan_ref
    scan.causal_conv1d_fn = causal_conv1d.causal_conv1d_ref

    def mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, *args, **kw):
        identity = torch.eye(xz.shape[1] // 2, dtype=xz.dtype)
        out = scan.mamba_inner_ref(
            xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, identity, None, A, *args, **kw
        )
        return out.transpose(1, 2)

    scan.mamba_inner_fn_no_out_proj = mamba_inner_fn_no_out_proj
    _load_file("mamba_ssm.modules.mamba_simple", package_root / "modules" / "mamba_simple.py")
    return _load_file("models_mamba", root / "vim" / "models_mamba.py")


def _seeded(model: torch.nn.Module) -> torch.nn.Module:
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    model.load_state_dict(seeded_state_dict(shapes), strict=True)
    return model.eval()


def _run(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits, the input gradient of their sum, and each block's residual stream (`hidden + residual`)."""
    streams = []
    hooks = [layer.register_forward_hook(lambda m, a, out: streams.append(out[0] + out[1])) for layer in model.layers]
    images = images.clone().requires_grad_(True)
    logits = model(images)
    logits.sum().backward()
    for hook in hooks:
        hook.remove()
    return dict(logits=logits.detach(), input_grad=images.grad, streams=torch.stack(streams).detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder holding the official vim/, mamba-1p1p1/, causal-conv1d/")
    parser.add_argument("--commit", default="dd0358a", help="the official commit the files were exported from")
    args = parser.parse_args()
    models_mamba = load_official(args.root.resolve())

    reference = dict(commit=args.commit, official_args=OFFICIAL_ARGS, configs={})
    models = {}
    for index, (name, (config, input_shape)) in enumerate(CONFIGS.items()):
        model = models[name] = _seeded(models_mamba.VisionMamba(**OFFICIAL_ARGS, **config, drop_path_rate=0.0))
        images = fp16_exact_input(input_shape, index)
        entry = dict(config=config, input=images.half(), **_run(model, images))
        entry["state_dict_shapes"] = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        reference["configs"][name] = entry

    config = CONFIGS["base"][0]
    height, width = RESIZED_INPUT[2:]
    patch = OFFICIAL_ARGS["patch_size"]
    grid = (config["img_size"] // patch, config["img_size"] // patch)
    resized = models_mamba.VisionMamba(**OFFICIAL_ARGS, **dict(config, img_size=(height, width)), drop_path_rate=0.0)
    weights = models["base"].state_dict()
    weights["pos_embed"] = resample_patch_positions(weights["pos_embed"], grid, (height // patch, width // patch))
    resized.load_state_dict(weights, strict=True)
    images = fp16_exact_input(RESIZED_INPUT, len(CONFIGS))
    with torch.no_grad():
        reference["resized"] = dict(input=images.half(), logits=resized.eval()(images))

    dropped = models_mamba.VisionMamba(**OFFICIAL_ARGS, **config, drop_path_rate=DROP_PATH_RATE)
    reference["drop_path"] = dict(
        rate=DROP_PATH_RATE,
        blocks=[float(getattr(layer.drop_path, "drop_prob", 0.0)) for layer in dropped.layers],
        final=float(dropped.drop_path.drop_prob),
    )

    tiny = models_mamba.vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2()
    small = models_mamba.vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2()
    reference["full"] = dict(
        tiny_params=sum(p.numel() for p in tiny.parameters()),
        small_params=sum(p.numel() for p in small.parameters()),
        tiny_state_dict_shapes=[(k, tuple(v.shape)) for k, v in tiny.state_dict().items()],
    )
    torch.save(reference, OUTPUT)
    full = reference["full"]
    print(
        f"Wrote {OUTPUT} ({OUTPUT.stat().st_size:,} bytes); official params: tiny {full['tiny_params']:,}, "
        f"small {full['small_params']:,}."
    )


if __name__ == "__main__":
    main()
