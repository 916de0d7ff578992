"""ImageClassificationDataModule: class names, labels and batches of an image folder.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from data_helpers import IMAGE_FOLDER_CLASSES, make_classification_module, to_pixels


def test_image_folder_classes_batches_and_labels(image_folder, tmp_path):
    dm = make_classification_module(tmp_path, path="imagefolder", data_dir=str(image_folder), batch_size=5)
    assert dm.num_classes == 3  # known right after construction, before setup
    assert dm.label_names == list(IMAGE_FOLDER_CLASSES)

    dm.setup("fit")
    assert len(dm.datasets["train"]) == 24 and len(dm.datasets["val"]) == 12  # the folder's own split

    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 4  # 24 // 5, last incomplete batch dropped
    val_batches = list(dm.val_dataloader())
    assert [len(batch["label"]) for batch in val_batches] == [5, 5, 2]
    for batch in train_batches + val_batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.long
        assert batch["image"].shape[1:] == (3, 32, 32)
        # The folder's class colours: red cat (0), green dog (1), blue fish (2).
        dominant_channel = to_pixels(batch["image"]).mean(dim=(2, 3)).argmax(dim=1)
        assert torch.equal(dominant_channel, batch["label"])

    # Labels follow the class folder names, row by row.
    raw = dm.datasets["train"].dataset
    for row in raw:
        assert Path(row["image"]["path"]).parent.name == dm.label_names[row["label"]]
    assert sorted(torch.cat([b["label"] for b in val_batches]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
