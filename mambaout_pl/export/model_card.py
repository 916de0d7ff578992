"""The README.md model card of an export: Hub metadata, network, data, metrics, usage, recipe, citation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from timm.models import get_pretrained_cfg
from torch.utils.flop_counter import FlopCounterMode

from mambaout_pl import __version__
from mambaout_pl.tasks.export_spec import ExportSpec
from mambaout_pl.training.resume import CHECKPOINT_KEY

#: Links the card gives, each to a page that exists: the paper, timm's documentation.
PAPER_URL = "https://arxiv.org/abs/2405.07992"
TIMM_DOCS_URL = "https://huggingface.co/docs/timm"

CITATION = """@inproceedings{yu2025mambaout,
  title={MambaOut: Do We Really Need Mamba for Vision?},
  author={Yu, Weihao and Wang, Xinchao},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2025}
}"""


def model_card(
    network: torch.nn.Module,
    spec: ExportSpec,
    checkpoint: dict[str, Any],
    checkpoint_path: Path,
    export_format: str,
) -> ModelCard:
    """The README.md of an export: Hub metadata, model, data, metrics, usage, recipe, license, citation."""
    pipeline = spec.pipeline_tag
    dataset = spec.dataset
    hub_dataset = dataset if isinstance(dataset, str) and _looks_like_hub_id(dataset) else None
    metrics = checkpoint[CHECKPOINT_KEY].get("metrics", {})
    card_data = ModelCardData(
        library_name="timm" if export_format == "timm" else "mambaout-pl",
        license="apache-2.0",
        tags=[pipeline, "mambaout", "mambaout-pl", *(["timm"] if export_format == "timm" else [])],
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=list(spec.metrics) or None,
        pipeline_tag=pipeline,
    )
    parameters = sum(p.numel() for p in network.parameters())
    gmacs = _gmacs(network, spec.preprocessing.get("input_size"))
    size_text = (
        "x".join(str(s) for s in spec.preprocessing["input_size"][1:]) if "input_size" in spec.preprocessing else "?"
    )
    metric_rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())) or "| - | - |"
    recipe = _recipe_text(checkpoint, checkpoint_path)
    name = spec.model_name
    format_text = f"{export_format} (`config.json` + `model.safetensors`)"
    if export_format == "timm":
        format_text += f", loaded by [timm]({TIMM_DOCS_URL})"
    timm_page = _timm_weights_line(name, spec.model_args)
    if export_format == "timm":
        usage = (
            "```python\nimport timm\n\n"
            'model = timm.create_model("hf-hub:USER/REPO", pretrained=True).eval()\n'
            "config = timm.data.resolve_data_config({}, model=model)\n"
            "transform = timm.data.create_transform(**config)\n```"
        )
    else:
        usage = (
            "```python\nfrom mambaout_pl.models import from_pretrained\n\n"
            'model = from_pretrained("hf-hub:USER/REPO")\n```'
        )
    body = f"""
# {name} ({pipeline})

Trained with mambaout-pl {__version__}: task
`{checkpoint[CHECKPOINT_KEY]["task"]}`, {checkpoint.get("epoch", 0) + 1} epochs, {checkpoint.get("global_step", 0)} optimizer steps.

## Model

- Network: `{name}` with arguments `{json.dumps(spec.model_args)}`
- Parameters: {parameters / 1e6:.2f} M
- GMACs at {size_text}: {f"{gmacs:.2f}" if gmacs is not None else "not measured"}
- Format: {format_text}
{timm_page}
## Dataset

`{dataset}`{f", {len(spec.label_names)} classes" if spec.label_names else ""}

## Metrics of this checkpoint

| metric | value |
|---|---|
{metric_rows}

## Usage

{usage}

## Training recipe

```yaml
{recipe}```

## License

Apache-2.0.

## Citation

MambaOut: Do We Really Need Mamba for Vision? ([arXiv:2405.07992]({PAPER_URL}))

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _timm_weights_line(model_name: str, model_args: dict[str, Any]) -> str:
    """A list item linking timm's own Hub weights of the network (or its backbone), where timm has some; else ''."""
    for name in (model_name, model_args.get("backbone")):
        if not isinstance(name, str):
            continue
        try:
            hub_id = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
        except (RuntimeError, ValueError):  # a tag timm does not know
            hub_id = None
        if hub_id:
            what = "this architecture" if name == model_name else f"the backbone `{name}`"
            return f"- timm's own weights of {what}: [{hub_id}](https://huggingface.co/{hub_id})\n"
    return ""


def _looks_like_hub_id(path: str) -> bool:
    if Path(path).exists() or ":" in path:
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return "/" in path


def _gmacs(model: torch.nn.Module, input_size: tuple[int, int, int] | None) -> float | None:
    if input_size is None:
        return None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops() / 2 / 1e9


def _recipe_text(checkpoint: dict[str, Any], checkpoint_path: Path) -> str:
    """The config the CLI saved beside the run, else the task and data hyper-parameters."""
    saved = checkpoint_path.resolve().parent.parent / "config.yaml"
    if saved.is_file():
        return saved.read_text()
    recipe = {
        "model": checkpoint.get("hyper_parameters", {}),
        "data": checkpoint.get("datamodule_hyper_parameters", {}),
    }
    return yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), sort_keys=False)
