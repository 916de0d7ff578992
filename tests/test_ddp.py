"""The data module and task under real 2-process DDP runs on CPU (gloo): sharding, metrics equal
to one process's, and a failing rank ending the job."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from lightning.pytorch import Trainer

from mambaout_pl.data import ImageClassificationDataModule
from mambaout_pl.tasks import ClassificationTask

# Several processes each: one xdist worker runs them all, one after another.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from lightning.pytorch import Callback, Trainer
    from mambaout_pl.data import ImageClassificationDataModule
    from mambaout_pl.tasks import ClassificationTask

    data_dir, out_dir = sys.argv[1], sys.argv[2]

    class RecordSamples(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            indices = list(iter(trainer.train_dataloader.sampler))
            with open(f"{out_dir}/rank{trainer.global_rank}.json", "w") as f:
                json.dump({"indices": indices, "world_size": trainer.world_size}, f)

    class CountValidated(Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            self.count = 0

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.count += len(batch["label"])

    data = ImageClassificationDataModule(
        path="imagefolder", data_dir=data_dir, image_size=32, batch_size=2, eval_batch_size=2, num_workers=0,
        hflip=0.0,
    )
    task = ClassificationTask(backbone="mambaout_femto", num_classes=data.num_classes, backbone_args=TINY)
    counter = CountValidated()
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, callbacks=[RecordSamples(), counter],
        default_root_dir=out_dir,
    )
    trainer.fit(task, data)
    if trainer.global_rank == 0:
        with open(f"{out_dir}/metrics.json", "w") as f:
            json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, f)
    trainer.save_checkpoint(f"{out_dir}/model.ckpt")
    metrics = trainer.validate(task, data, verbose=False)[0]
    with open(f"{out_dir}/validate_rank{trainer.global_rank}.json", "w") as f:
        json.dump({"count": counter.count, "metrics": metrics}, f)
    torch.distributed.destroy_process_group()  # as torch asks; left to exit, gloo can abort the process
    """
)
TINY = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}
SCRIPT = SCRIPT.replace("backbone_args=TINY", f"backbone_args={TINY!r}")


def test_two_process_ddp_splits_each_epoch_across_ranks_and_validates_like_one_process(image_folder, tmp_path) -> None:
    (image_folder / "validation" / "fish" / "fish_3.png").unlink()  # 11 images: ranks get 6 and 5
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(image_folder), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["world_size"] == 2 for rank in ranks)
    first, second = (set(rank["indices"]) for rank in ranks)
    assert len(ranks[0]["indices"]) == len(ranks[1]["indices"])
    assert not first & second
    assert first | second == set(range(24))  # 3 classes x 8 training images
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/top1", "val/loss", "train/loss"} <= set(metrics)

    # The same checkpoint validated by one process: the same metrics, each image counted once.
    validated = [json.loads((tmp_path / f"validate_rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(rank["count"] for rank in validated) == [5, 6]
    task = ClassificationTask.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    data = ImageClassificationDataModule(
        path="imagefolder", data_dir=str(image_folder), image_size=32, batch_size=2, eval_batch_size=2, num_workers=0
    )
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    single = trainer.validate(task, data, verbose=False)[0]
    assert set(single) == set(validated[0]["metrics"]) == {"val/loss", "val/top1", "val/top5"}
    for name, value in single.items():
        assert validated[0]["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
        assert validated[1]["metrics"][name] == validated[0]["metrics"][name]
    assert single["val/top1"] * 11 == pytest.approx(round(single["val/top1"] * 11))  # a count out of 11 images


FAILING_RANK = textwrap.dedent(
    """
    import sys
    from lightning.pytorch import Trainer
    from mambaout_pl.data import ImageClassificationDataModule
    from mambaout_pl.tasks import ClassificationTask

    data_dir, out_dir, failing_rank = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class FailingTask(ClassificationTask):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1 and self.global_rank == failing_rank:
                raise RuntimeError(f"injected failure on rank {self.global_rank}")
            return super().training_step(batch, batch_idx)

    data = ImageClassificationDataModule(path="imagefolder", data_dir=data_dir, image_size=32, batch_size=2, num_workers=0)
    task = FailingTask(num_classes=data.num_classes, backbone_args={"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]})
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=out_dir,
    )
    trainer.fit(task, data)
    """
)


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_failing_rank_ends_the_whole_job_with_its_error(failing_rank: int, image_folder, tmp_path) -> None:
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    # The timeout only guards against a hang; a healthy failure ends within seconds of the error.
    result = subprocess.run(
        [sys.executable, str(script), str(image_folder), str(tmp_path), str(failing_rank)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert f"RuntimeError: injected failure on rank {failing_rank}" in result.stderr
