"""The fused Gated CNN block's weight gradients in their parameters' memory layout, as DDP's buckets expect."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mambaout_pl.models.mambaout import GatedCNNBlock

INPUT_LAYOUTS = {
    "channels_last": lambda x: x,  # the block's own [B, H, W, C]
    "channels_first": lambda x: x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),  # a view of [B, C, H, W]
}


def block_gradients(block: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    out = block(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return {"input": x.grad, **{name: p.grad for name, p in block.named_parameters()}}


@pytest.mark.parametrize(
    "parameter_format",
    [torch.contiguous_format, torch.channels_last],
    ids=["params-contiguous", "params-channels-last"],
)
@pytest.mark.parametrize("input_layout", list(INPUT_LAYOUTS))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_weight_gradients_have_the_strides_of_their_parameters(parameter_format, input_layout, autocast) -> None:
    torch.manual_seed(0)
    fused = GatedCNNBlock(24, conv_ratio=0.5).to(memory_format=parameter_format)
    assert fused.fused_activation == "gelu"
    x = INPUT_LAYOUTS[input_layout](torch.randn(2, 7, 9, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused_grads = block_gradients(fused, x)
    for name, parameter in fused.named_parameters():
        assert parameter.grad.stride() == parameter.stride(), name
    assert (
        fused.conv.weight.grad.stride()
        == fused.conv.weight.stride()
        == {
            torch.contiguous_format: (49, 49, 7, 1),
            torch.channels_last: (49, 1, 7, 1),
        }[parameter_format]
    )
    if autocast:
        return
    plain = GatedCNNBlock(24, conv_ratio=0.5, fused=False).to(memory_format=parameter_format)
    plain.load_state_dict(fused.state_dict())
    plain_grads = block_gradients(plain, x)
    for name, expected in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], expected, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from lightning.pytorch import Trainer
    from mambaout_pl.data import ImageClassificationDataModule
    from mambaout_pl.tasks import ClassificationTask

    data_dir, out_dir = sys.argv[1], sys.argv[2]
    data = ImageClassificationDataModule(path="imagefolder", data_dir=data_dir, image_size=32, batch_size=2, num_workers=0)
    task = ClassificationTask(num_classes=data.num_classes, backbone_args={"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]})
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=out_dir,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, data)
    with open(f"{out_dir}/warnings_rank{trainer.global_rank}.json", "w") as f:
        json.dump({"steps": trainer.global_step, "warnings": [str(w.message) for w in caught]}, f)
    torch.distributed.destroy_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_two_process_ddp_training_does_not_warn_about_gradient_strides(image_folder: Path, tmp_path: Path) -> None:
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(image_folder), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        recorded = json.loads((tmp_path / f"warnings_rank{rank}.json").read_text())
        assert recorded["steps"] == 2
        assert not [message for message in recorded["warnings"] if "Grad strides" in message], rank
    assert "Grad strides" not in result.stderr
