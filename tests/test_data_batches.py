"""The task <-> data batch contract: padded evaluation batches carry what undoes their padding."""

from __future__ import annotations

import torch

from mambaout_pl.data.batches import pad_stack, unpadded_image, unpadded_mask
from mambaout_pl.data.classification import collate_samples
from mambaout_pl.data.segmentation import EvalCollate, collate_train


def eval_sample(image_size, original_size, label):
    height, width = image_size
    return {
        "image": torch.arange(3 * height * width, dtype=torch.float32).view(3, height, width) + 1,
        "image_size": torch.tensor(image_size),
        "original_size": torch.tensor(original_size),
        "mask": torch.full(original_size, label, dtype=torch.long),
        "name": f"image_{label}",
    }


def test_pad_stack_pads_bottom_and_right_with_the_fill():
    out = pad_stack([torch.ones(1, 2, 3), torch.ones(1, 4, 1)], fill=-1.0)
    assert out.shape == (2, 1, 4, 3)
    assert out[0, 0, :2, :3].eq(1).all() and out[0, 0, 2:].eq(-1).all()
    assert out[1, 0, :, :1].eq(1).all() and out[1, 0, :, 1:].eq(-1).all()


def test_eval_collate_padding_is_undone_by_the_batch_sizes():
    samples = [eval_sample((4, 6), (8, 12), 1), eval_sample((6, 3), (12, 6), 2)]
    batch = EvalCollate(ignore_index=255)(samples)
    assert batch["image"].shape == (2, 3, 6, 6) and batch["mask"].shape == (2, 12, 12)
    assert batch["image"][0, :, 4:].eq(0).all() and batch["mask"][1, :, 6:].eq(255).all()
    assert batch["name"] == ["image_1", "image_2"]
    for index, sample in enumerate(samples):
        assert torch.equal(unpadded_image(batch, index), sample["image"])
        assert torch.equal(unpadded_mask(batch, index), sample["mask"])


def test_unlabelled_eval_batches_have_no_mask_and_train_batches_stack():
    samples = [eval_sample((4, 6), (8, 12), 1), eval_sample((6, 3), (12, 6), 2)]
    for sample in samples:
        del sample["mask"]
    assert "mask" not in EvalCollate()(samples)
    train = collate_train([{"image": torch.zeros(3, 4, 4), "mask": torch.ones(4, 4, dtype=torch.long)}] * 2)
    assert train["image"].shape == (2, 3, 4, 4) and train["mask"].dtype == torch.long


def test_classification_batches_carry_labels_only_when_samples_do():
    batch = collate_samples([{"image": torch.zeros(3, 2, 2), "label": 4}, {"image": torch.ones(3, 2, 2), "label": 1}])
    assert batch["image"].shape == (2, 3, 2, 2) and batch["label"].tolist() == [4, 1]
    assert batch["label"].dtype == torch.long
    assert set(collate_samples([{"image": torch.zeros(3, 2, 2)}])) == {"image"}
