"""pad_batch: shapes, padding sides, multiples, and masks that never depend on the pad token's id."""

from __future__ import annotations

import pytest
import torch

from pronghorn.data import IGNORE_INDEX, pad_batch
from pronghorn.data.collate import batch_to_device

EOS = 2


def _examples():
    return [
        {"input_ids": [5, 6, 7, EOS], "labels": [-100, -100, 7, EOS]},
        {"input_ids": [8, EOS], "labels": [8, EOS]},
        {"input_ids": torch.tensor([9, 10, 11]), "labels": torch.tensor([9, 10, 11])},
    ]


def test_right_padding_pad_equals_eos():
    out = pad_batch(_examples(), pad_token_id=EOS)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 4) for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7, EOS], [8, EOS, EOS, EOS], [9, 10, 11, EOS]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    # the real EOS stays trained; the pad positions (same id) do not
    assert out["labels"].tolist() == [[-100, -100, 7, EOS], [8, EOS, -100, -100], [9, 10, 11, -100]]


def test_left_padding_and_multiple():
    out = pad_batch(_examples(), pad_token_id=0, pad_to_multiple_of=8, padding_side="left")
    assert out["input_ids"].shape == (3, 8)
    assert out["input_ids"][1].tolist() == [0] * 6 + [8, EOS]
    assert out["attention_mask"][1].tolist() == [0] * 6 + [1, 1]
    assert out["labels"][1].tolist() == [IGNORE_INDEX] * 6 + [8, EOS]
    assert out["attention_mask"].sum(1).tolist() == [4, 2, 3]


def test_multiple_already_aligned_and_labels_default():
    out = pad_batch([{"input_ids": [1, 2, 3, 4]}], pad_token_id=0, pad_to_multiple_of=4)
    assert out["input_ids"].shape == (1, 4) and out["labels"].tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize(
    "examples, kwargs, match",
    [
        ([], {}, "at least one"),
        ([{"input_ids": [1, 2], "labels": [1]}], {}, "example 0"),
        ([{"input_ids": [], "labels": []}], {}, "empty"),
        ([{"input_ids": [1], "labels": [1]}], {"padding_side": "middle"}, "padding_side"),
        ([{"input_ids": [1], "labels": [1]}], {"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ],
)
def test_bad_arguments(examples, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pad_batch(examples, pad_token_id=0, **kwargs)
    with pytest.raises(ValueError, match="pad_token_id"):
        pad_batch([{"input_ids": [1], "labels": [1]}], pad_token_id=None)


def test_batch_to_device_drops_a_full_mask_and_keeps_a_padded_one():
    """An all-ones attention mask becomes None (no padding: the model then need not check it on the device);
    a padded one and every other tensor arrive unchanged (pinned, non-blocking copies on CUDA)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    full = batch_to_device(pad_batch(_examples()[:1], pad_token_id=EOS), device)
    assert full["attention_mask"] is None and full["input_ids"].device.type == device
    padded = pad_batch(_examples(), pad_token_id=EOS)
    moved = batch_to_device(padded, device)
    assert all(torch.equal(moved[k].cpu(), padded[k]) for k in padded)
