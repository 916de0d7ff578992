"""The data module and task under a real 2-process DDP run on CPU (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from lightning.pytorch import Callback, Trainer
    from mambaout_pl.data import ImageClassificationDataModule
    from mambaout_pl.tasks import ClassificationTask

    data_dir, out_dir = sys.argv[1], sys.argv[2]

    class RecordSamples(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            indices = list(iter(trainer.train_dataloader.sampler))
            with open(f"{out_dir}/rank{trainer.global_rank}.json", "w") as f:
                json.dump({"indices": indices, "world_size": trainer.world_size}, f)

    data = ImageClassificationDataModule(
        path="imagefolder", data_dir=data_dir, image_size=32, batch_size=2, num_workers=0, hflip=0.0
    )
    task = ClassificationTask(backbone="mambaout_femto", num_classes=data.num_classes)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, callbacks=[RecordSamples()],
        default_root_dir=out_dir,
    )
    trainer.fit(task, data)
    if trainer.global_rank == 0:
        with open(f"{out_dir}/metrics.json", "w") as f:
            json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, f)
    """
)


def test_two_process_ddp_splits_each_epoch_across_ranks(image_folder, tmp_path) -> None:
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
