"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy): which modules are sharded, what a
sharded network computes, and real 2-process CPU runs (gloo) of `mambaout fit` against DDP, resumed
from sharded and from one-file checkpoints."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import timm
import torch
from conftest import write_image_folder
from detection_helpers import square_batch
from helpers import tiny_fit_args
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.tensor import DTensor

from mambaout_pl.errors import CheckpointError
from mambaout_pl.export.hub import export_checkpoint, read_task_checkpoint
from mambaout_pl.models import RCNNDetector, UperNetSegmentor, create_model
from mambaout_pl.models.mambaout import GatedCNNBlock
from mambaout_pl.models.sharding import shard_units
from mambaout_pl.tasks import ClassificationTask, SegmentationTask
from mambaout_pl.training.checkpoint_io import read_checkpoint
from mambaout_pl.training.sharded_checkpoint import (
    METADATA_FILE,
    consolidate_checkpoint,
    optimizer_state_by_position,
)
from mambaout_pl.training.sharding import (
    data_parallel_mesh,
    gather_for_evaluation,
    mixed_precision_policy,
    release_after_evaluation,
    shard_network,
)

TINY = {"depths": [2, 1, 1, 1], "dims": [8, 8, 16, 16]}


def unit_names(model: nn.Module) -> set[str]:
    units = {id(unit) for unit in shard_units(model)}
    return {name for name, module in model.named_modules() if id(module) in units}


# -- which modules are units ------------------------------------------------------------------------


def test_the_units_of_mambaout_are_its_blocks() -> None:
    model = create_model("mambaout_femto", num_classes=3, **TINY)
    assert unit_names(model) == {"stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0"} | {
        f"stages.{i}.blocks.0" for i in (2, 3)
    }
    assert all(isinstance(unit, GatedCNNBlock) for unit in shard_units(model))


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("resnet18", {}, {f"layer{i}.{j}" for i in range(1, 5) for j in range(2)}),
        ("vit_tiny_patch16_224", {"img_size": 32, "depth": 3}, {f"blocks.{i}" for i in range(3)}),
        ("convnext_atto", {}, {f"stages.{i}.blocks.{j}" for i, depth in enumerate((2, 2, 6, 2)) for j in range(depth)}),
    ],
)
def test_the_units_of_timm_models_are_their_blocks(name: str, kwargs: dict[str, Any], expected: set[str]) -> None:
    assert unit_names(timm.create_model(name, num_classes=3, **kwargs)) == expected


def test_the_units_of_segmentors_and_detectors_are_the_backbone_blocks_and_the_heads() -> None:
    blocks = {f"model.stages.{i}.blocks.0" for i in range(4)} | {"model.stages.0.blocks.1"}
    segmentor = UperNetSegmentor("mambaout_femto", num_classes=3, channels=16, aux_channels=16, backbone_args=TINY)
    assert unit_names(segmentor) == {f"backbone.{name}" for name in blocks} | {"decode_head", "aux_head"}
    detector = RCNNDetector("mambaout_femto", num_classes=3, fpn_channels=16, backbone_args=TINY)
    body = {f"backbone.body.{name}" for name in blocks}
    assert unit_names(detector) == body | {"backbone.fpn", "rpn", "roi_heads"}


def test_a_model_may_name_its_own_units() -> None:
    class TwoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(2, 2), nn.Linear(2, 2)

        def shard_units(self) -> list[nn.Module]:
            return [self.second]

    assert unit_names(TwoLayers()) == {"second"}


# -- a sharded network, in one process ----------------------------------------------------------------


def test_mixed_precision_follows_the_trainer_precision() -> None:
    mixed = mixed_precision_policy("bf16-mixed")
    assert (mixed.param_dtype, mixed.reduce_dtype) == (torch.bfloat16, torch.float32)
    for precision in ("32-true", "bf16-true", "16-true"):
        policy = mixed_precision_policy(precision)
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None), precision


def record_fc1_weights(model: nn.Module) -> list[torch.Tensor]:
    """The ``fc1.weight`` each block computes with, captured when the block runs."""
    seen: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, GatedCNNBlock):
            module.register_forward_pre_hook(lambda block, args: seen.append(block.fc1.weight))
    return seen


def test_a_sharded_network_computes_the_whole_networks_outputs_and_gradients(one_process_mesh) -> None:
    torch.manual_seed(0)
    whole = create_model("mambaout_femto", num_classes=3, **TINY)
    sharded = copy.deepcopy(whole)
    shard_network(sharded, data_parallel_mesh(one_process_mesh), "32-true")
    assert all(isinstance(param, DTensor) for param in sharded.parameters())
    seen = record_fc1_weights(sharded)
    images = torch.randn(2, 3, 32, 32)
    out_whole, out_sharded = whole(images), sharded(images)
    # The fused gated-conv function runs on the gathered plain tensors.
    assert len(seen) == 5 and not any(isinstance(weight, DTensor) for weight in seen)
    assert all(block.fused_activation == "gelu" for block in sharded.modules() if isinstance(block, GatedCNNBlock))
    torch.testing.assert_close(out_sharded, out_whole, rtol=1e-6, atol=1e-6)
    out_whole.square().sum().backward()
    out_sharded.square().sum().backward()
    for (name, param), expected in zip(sharded.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(param.grad.full_tensor(), expected.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_sharded_segmentors_and_detectors_compute_the_whole_networks_losses(precision: str, one_process_mesh) -> None:
    mixed = precision == "bf16-mixed"
    tolerance = {"rtol": 0.05, "atol": 0.05} if mixed else {"rtol": 1e-5, "atol": 1e-6}
    mesh = data_parallel_mesh(one_process_mesh)

    def run(network: nn.Module, *args: Any) -> Any:
        torch.manual_seed(1)  # dropout, and the proposals the RPN and RoI heads sample
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):  # as Lightning's bf16-mixed runs steps
            return network(*args)

    torch.manual_seed(0)
    segmentor = UperNetSegmentor("mambaout_femto", num_classes=3, channels=16, aux_channels=16, backbone_args=TINY)
    sharded = copy.deepcopy(segmentor)
    shard_network(sharded, mesh, precision, forward_methods=("forward_heads",))
    dtypes = {}
    for name in ("conv", "norm"):  # what the decode head's bottleneck computes with
        module = getattr(sharded.decode_head.bottleneck, name)
        module.register_forward_pre_hook(lambda module, args, name=name: dtypes.update({name: module.weight.dtype}))
    images = torch.randn(2, 3, 32, 32)
    expected, actual = run(segmentor.forward_heads, images), run(sharded.forward_heads, images)
    for expected_logits, logits in zip(expected, actual, strict=True):
        torch.testing.assert_close(logits.float(), expected_logits.float(), **tolerance)
    assert dtypes == {"conv": torch.bfloat16 if mixed else torch.float32, "norm": torch.float32}

    detector = RCNNDetector("mambaout_femto", num_classes=3, fpn_channels=16, backbone_args=TINY)
    sharded = copy.deepcopy(detector)
    shard_network(sharded, mesh, precision)
    batch = square_batch(images=2)
    losses = [
        run(network, batch["images"], [dict(target) for target in batch["targets"]]) for network in (detector, sharded)
    ]
    assert set(losses[0]) == set(losses[1]) and len(losses[0]) == 5
    for name, value in losses[0].items():
        torch.testing.assert_close(losses[1][name].float(), value.float(), **tolerance, msg=name)
    sum(losses[1].values()).backward()
    assert all(param.grad is not None for param in sharded.backbone.parameters())


def test_bf16_mixed_computes_with_bfloat16_copies_and_keeps_float32_weights(one_process_mesh) -> None:
    torch.manual_seed(0)
    whole = create_model("mambaout_femto", num_classes=3, **TINY)
    sharded = copy.deepcopy(whole)
    shard_network(sharded, data_parallel_mesh(one_process_mesh), "bf16-mixed")
    seen = record_fc1_weights(sharded)
    images = torch.randn(2, 3, 32, 32)
    out = sharded(images)
    assert out.dtype == torch.bfloat16 and {weight.dtype for weight in seen} == {torch.bfloat16}
    out.float().square().sum().backward()
    assert {(param.dtype, param.grad.dtype) for param in sharded.parameters()} == {(torch.float32, torch.float32)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = whole.to(torch.bfloat16)(images.to(torch.bfloat16))
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.05)


def test_evaluation_keeps_the_weights_gathered_until_released(one_process_mesh) -> None:
    model = create_model("mambaout_femto", num_classes=3, **TINY)
    shard_network(model, data_parallel_mesh(one_process_mesh), "32-true")
    block = model.stages[0].blocks[0]
    with torch.no_grad():
        gather_for_evaluation(model)
        model(torch.randn(1, 3, 32, 32))
        assert not isinstance(block.fc1.weight, DTensor)  # still gathered after its forward
        release_after_evaluation(model)
        assert isinstance(block.fc1.weight, DTensor)
        model(torch.randn(1, 3, 32, 32))
        assert isinstance(block.fc1.weight, DTensor)  # sharded again after each forward


def test_configure_model_shards_only_under_a_device_mesh_and_refuses_ema(one_process_mesh) -> None:
    task = ClassificationTask(num_classes=3, backbone_args=TINY)
    task.configure_model()  # no mesh: not sharded
    assert not any(isinstance(param, DTensor) for param in task.parameters())
    ema = ClassificationTask(num_classes=3, backbone_args=TINY, ema_decay=0.99)
    ema._device_mesh = one_process_mesh
    with pytest.raises(ValueError, match=r"model.ema_decay=0.99 cannot be used with ModelParallelStrategy"):
        ema.configure_model()

    class ExtraWeights(ClassificationTask):
        def configure_models(self) -> None:
            super().configure_models()
            self.temperature = nn.Parameter(torch.ones(()))

    extra = ExtraWeights(num_classes=3, backbone_args=TINY)
    extra._device_mesh = one_process_mesh
    with pytest.raises(ValueError, match=r"ExtraWeights has weights outside self.model \(temperature\)"):
        extra.configure_model()


def test_sync_batchnorm_is_applied_before_sharding_when_fitting(one_process_mesh) -> None:
    task = SegmentationTask(
        backbone="mambaout_femto", num_classes=3, backbone_args=TINY, decode_channels=16, aux_channels=16
    )
    batch_norms = sum(isinstance(module, nn.BatchNorm2d) for module in task.model.modules())
    # What configure_model reads of the Trainer `Trainer(strategy=ModelParallelStrategy(), sync_batchnorm=True).fit` gives.
    strategy = SimpleNamespace(_layer_sync=TorchSyncBatchNorm())
    task._trainer = SimpleNamespace(strategy=strategy, state=SimpleNamespace(fn=TrainerFn.FITTING), precision="32-true")
    task._device_mesh = one_process_mesh
    task.configure_model()
    synced = [module for module in task.model.modules() if isinstance(module, nn.SyncBatchNorm)]
    assert batch_norms > 0 and len(synced) == batch_norms
    assert all(isinstance(module.weight, DTensor) for module in synced)


def test_tensor_parallelism_is_refused_with_the_sizes_to_set() -> None:
    class Dimension:
        def __init__(self, size: int) -> None:
            self._size = size

        def size(self) -> int:
            return self._size

    mesh = {"data_parallel": Dimension(1), "tensor_parallel": Dimension(4)}
    with pytest.raises(ValueError, match=r"data_parallel_size 4 and --trainer.strategy.tensor_parallel_size 1"):
        data_parallel_mesh(mesh)


# -- checkpoint files and folders -------------------------------------------------------------------


def test_read_checkpoint_refuses_a_sharded_folder_and_says_how_to_make_one_file(tmp_path: Path) -> None:
    folder = tmp_path / "epoch000-step2.ckpt"
    folder.mkdir()
    torch.save({"epoch": 0}, folder / METADATA_FILE)
    with pytest.raises(CheckpointError, match=r"sharded checkpoint folder.*mambaout consolidate .*epoch000-step2"):
        read_checkpoint(folder)


def test_optimizer_states_keyed_by_name_are_keyed_by_position() -> None:
    exp_avg = [torch.full((2,), float(i)) for i in range(3)]
    by_name = {
        "state": {"b": {"exp_avg": exp_avg[1]}, "a": {"exp_avg": exp_avg[0]}, "c": {"exp_avg": exp_avg[2]}},
        "param_groups": [{"lr": 0.1, "params": ["a", "b"]}, {"lr": 0.2, "params": ["c"]}],
    }
    by_position = optimizer_state_by_position(by_name)
    assert by_position["param_groups"] == [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.2, "params": [2]}]
    assert {key: value["exp_avg"][0].item() for key, value in by_position["state"].items()} == {0: 0, 1: 1, 2: 2}


# -- real 2-process runs ------------------------------------------------------------------------------

SHARDED = (
    "--trainer.strategy=ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
)
STEPS = 6  # 3 epochs of 2 batches per rank


def recorder(folder: Path) -> str:
    """The argument that adds ``RecordLosses`` writing to ``folder``."""
    return "--trainer.callbacks+=" + json.dumps(
        {"class_path": "loss_recorder.RecordLosses", "init_args": {"folder": str(folder)}}
    )


def run_mambaout(*args: str, stop_at: Path | None = None) -> str:
    """Run `python -m mambaout_pl ARGS` in its own process group; returns its output, fails the test if it
    fails. ``stop_at``: send SIGTERM to the whole process group (as a cluster does) once this file exists,
    and expect the exit status of a pre-emption."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "mambaout_pl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400  # only a guard: a rank waiting for the other hangs
    if stop_at is not None:
        while not stop_at.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"`{' '.join(args)}` hung:\n{output[-3000:]}")
    assert process.returncode == (0 if stop_at is None else 128 + signal.SIGTERM), output[-5000:]
    return output


def fit_args(root: Path, images: Path, *extra: str) -> list[str]:
    """`fit` of the quick start on 2 CPU processes: 3 epochs of 2 batches of 2 images per rank, every
    checkpoint kept; each validation evaluates the 11 images once (6 and 5 batches of 1); each rank's
    losses and the final metrics recorded in ``root/record``."""
    return tiny_fit_args(
        root,
        images,
        "--trainer.devices=2",
        f"--trainer.max_epochs={STEPS // 2}",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1.0",
        "--data.eval_batch_size=1",
        "--model.drop_path_rate=0.1",
        "--latest_checkpoint.every_n_train_steps=1",
        "--latest_checkpoint.save_top_k=-1",
        recorder(root / "record"),
        *extra,
    )


def fit(root: Path, images: Path, *extra: str) -> dict[int, dict[str, Any]]:
    """Run :func:`fit_args`; returns each rank's losses by global step and the final metrics."""
    run_mambaout(*fit_args(root, images, *extra))
    ranks = {rank: json.loads((root / "record" / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    for data in ranks.values():
        data["losses"] = {int(step): loss for step, loss in data["losses"].items()}
    return ranks


def checkpoints(root: Path) -> Path:
    return root / "lightning_logs" / "version_0" / "checkpoints"


# Session scope: under pytest-xdist, tests of other modules may run between these, which would tear
# down (and rebuild) a module-scoped fixture.
@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """DDP; sharded (checkpoint folders); sharded with one-file checkpoints, resumed from the sharded run's
    folder after step 3 (mid-epoch); DDP resumed from that run's file after step 5 (mid-epoch)."""
    images = write_image_folder(tmp_path_factory.mktemp("images"))
    (images / "validation" / "fish" / "fish_3.png").unlink()  # 11 images: ranks evaluate 6 and 5
    root = tmp_path_factory.mktemp("runs")
    result: dict[str, Any] = {"root": root, "images": images}
    result["ddp"] = fit(root / "ddp", images, "--trainer.strategy=ddp")
    result["sharded"] = fit(root / "sharded", images, *SHARDED)
    sharded_step3 = checkpoints(root / "sharded") / "epoch001-step3.ckpt"
    result["files"] = fit(
        root / "files",
        images,
        *SHARDED,
        "--trainer.strategy.save_distributed_checkpoint=false",
        f"--ckpt_path={sharded_step3}",
    )
    files_step5 = checkpoints(root / "files") / "epoch002-step5.ckpt"
    result["ddp_resumed"] = fit(root / "ddp_resumed", images, "--trainer.strategy=ddp", f"--ckpt_path={files_step5}")
    return result


def assert_losses(actual: dict[int, float], expected: dict[int, float], steps: range, where: str) -> None:
    assert sorted(actual) == list(steps), where
    for step in steps:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5), f"{where}, step {step}"


# float32 sums of the same gradients in another order (DDP's all-reduce of buckets, FSDP's reduce-scatter
# per block) differ by ~1e-7 relative and grow a little over the steps. Without the gradient reduction
# (each rank on its own gradients) the second step's loss differs by 8e-3 relative, the third's by 0.4.


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_sharded_training_follows_ddp_step_by_step(runs: dict[str, Any]) -> None:
    ddp, sharded = runs["ddp"], runs["sharded"]
    for rank in (0, 1):
        assert sharded[rank]["world_size"] == 2
        assert_losses(sharded[rank]["losses"], ddp[rank]["losses"], range(1, STEPS + 1), f"rank {rank}")
    assert sharded[0]["losses"][1] != pytest.approx(sharded[1]["losses"][1], rel=1e-3)  # each rank its own batches
    metrics = sharded[0]["metrics"]
    assert {"val/loss", "val/top1", "train/loss"} <= set(metrics)
    for name, value in ddp[0]["metrics"].items():
        assert metrics[name] == pytest.approx(value, rel=1e-5), name
    assert (checkpoints(runs["root"] / "sharded") / "epoch001-step3.ckpt" / METADATA_FILE).is_file()


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_training_resumes_from_sharded_and_from_one_file_checkpoints(runs: dict[str, Any]) -> None:
    sharded = runs["sharded"]
    for rank in (0, 1):
        assert_losses(runs["files"][rank]["losses"], sharded[rank]["losses"], range(4, STEPS + 1), "from the folder")
        assert_losses(runs["ddp_resumed"][rank]["losses"], sharded[rank]["losses"], range(6, 7), "from the file")
    files_step6 = checkpoints(runs["root"] / "files") / "epoch002-step6.ckpt"
    ddp_step6 = checkpoints(runs["root"] / "ddp") / "epoch002-step6.ckpt"
    assert files_step6.is_file()
    weights, reference = read_checkpoint(files_step6)["state_dict"], read_checkpoint(ddp_step6)["state_dict"]
    assert set(weights) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_a_sharded_folder_consolidates_into_the_file_the_strategy_writes_and_exports(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    folder = checkpoints(runs["root"] / "sharded") / "epoch002-step5.ckpt"
    with pytest.raises(CheckpointError, match="mambaout consolidate"):
        read_checkpoint(folder)
    output = consolidate_checkpoint(folder, tmp_path / "step5.ckpt")
    mine = read_task_checkpoint(output)
    theirs = read_checkpoint(checkpoints(runs["root"] / "files") / "epoch002-step5.ckpt")
    assert (mine["global_step"], mine["epoch"]) == (theirs["global_step"], theirs["epoch"]) == (5, 2)
    assert set(mine["state_dict"]) == set(theirs["state_dict"])
    for name, value in theirs["state_dict"].items():
        torch.testing.assert_close(mine["state_dict"][name], value, rtol=1e-5, atol=1e-7, msg=name)

    def by_position(optimizer: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        return [optimizer["state"][index] for group in optimizer["param_groups"] for index in group["params"]]

    (my_optimizer,), (their_optimizer,) = mine["optimizer_states"], theirs["optimizer_states"]
    assert [len(group["params"]) for group in my_optimizer["param_groups"]] == [
        len(group["params"]) for group in their_optimizer["param_groups"]
    ]
    for mine_state, their_state in zip(by_position(my_optimizer), by_position(their_optimizer), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine_state[key], their_state[key], rtol=1e-5, atol=1e-9)

    exported = export_checkpoint(output, tmp_path / "export")
    assert (exported / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="exists already"):
        consolidate_checkpoint(folder, output)


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_one_process_validates_a_checkpoint_folder_two_processes_wrote(runs: dict[str, Any], tmp_path: Path) -> None:
    folder = checkpoints(runs["root"] / "sharded") / "epoch002-step6.ckpt"
    record = tmp_path / "record"
    run_mambaout(
        "validate",
        f"--config={Path(__file__).parents[1] / 'recipes' / 'quickstart.yaml'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.devices=1",
        *SHARDED[:1],
        "--trainer.strategy.data_parallel_size=1",
        "--trainer.strategy.tensor_parallel_size=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        recorder(record),
        "--data.path=imagefolder",
        f"--data.data_dir={runs['images']}",
        "--data.image_size=32",
        "--data.eval_batch_size=1",
        "--data.num_workers=0",
        f"--ckpt_path={folder}",
    )
    validated = json.loads((record / "rank0.json").read_text())
    assert validated["world_size"] == 1
    # The sharded run's last validation followed step 6: the same weights, the same scores.
    final = runs["sharded"][0]["metrics"]
    for name in ("val/loss", "val/top1"):
        assert validated["metrics"][name] == pytest.approx(final[name], rel=1e-5), name


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_a_preempted_sharded_run_writes_a_new_folder_and_keeps_the_linked_one(runs: dict[str, Any]) -> None:
    root = runs["root"] / "preempted"
    marker = root / "reached"
    wait = {"class_path": "fault_injection.WaitForSignal", "init_args": {"marker": str(marker), "epoch": 2, "batch": 0}}
    run_mambaout(
        *fit_args(
            root,
            runs["images"],
            *SHARDED,
            "--latest_checkpoint.every_n_train_steps=0",  # one checkpoint per epoch, linked as last.ckpt
            "--latest_checkpoint.every_n_epochs=1",
            "--trainer.callbacks+=" + json.dumps(wait),
            f"--ckpt_path={checkpoints(runs['root'] / 'sharded') / 'epoch000-step2.ckpt'}",
        ),
        stop_at=marker,
    )
    folder = checkpoints(root)
    last = folder / "last.ckpt"
    # The rank that wrote the marker holds both at the end of step 5 until the signal reaches the group.
    assert last.is_symlink() and os.readlink(last) == "last-epoch002-step5.ckpt"
    steps = {path.name: torch.load(path / METADATA_FILE, weights_only=True)["global_step"] for path in folder.iterdir()}
    # The epoch's checkpoint that last.ckpt linked to before the signal still holds its own step.
    assert steps["epoch001-step4.ckpt"] == 4 and steps["last.ckpt"] == 5
