"""The next-token shift rule, in the one place it lives."""

import torch

from peft_greentrainer.engine.label_buckets import label_bucket
from peft_greentrainer.engine.targets import IGNORE_INDEX, aligned_targets, labelled_counts
from peft_greentrainer.sparse_head import next_token_targets

LABELS = torch.tensor([[-100, -100, 5, 6, 7], [-100, 3, 4, -100, -100]])


def test_a_causal_lm_counts_next_token_targets_and_an_encoder_decoder_every_label() -> None:
    assert aligned_targets(LABELS).tolist() == [[-100, 5, 6, 7, -100], [3, 4, -100, -100, -100]]
    assert labelled_counts({"labels": LABELS}).tolist() == [3, 2]
    assert labelled_counts({"labels": LABELS}, shifts=False).tolist() == [3, 2]
    first_is_target = torch.tensor([[1, 2, -100]])
    assert labelled_counts({"labels": first_is_target}).tolist() == [1]  # labels[0] is no position's target
    assert labelled_counts({"labels": first_is_target}, shifts=False).tolist() == [2]


def test_shift_labels_are_used_as_given_everywhere() -> None:
    shifted = torch.tensor([[4, -100, -100, -100, 9], [-100, -100, -100, -100, -100]])
    batch = {"labels": LABELS, "shift_labels": shifted}
    assert labelled_counts(batch).tolist() == [2, 0]
    assert labelled_counts({"shift_labels": shifted}).tolist() == [2, 0]
    mask, targets = next_token_targets(LABELS, shifted)
    assert mask.sum().item() == 2 and targets.tolist() == [4, 9]
    bucket = label_bucket({"input_ids": torch.zeros_like(LABELS), **batch}, mean=1.0)
    assert bucket is not None and bucket.name == "shift_labels" and torch.equal(bucket.mask, shifted != IGNORE_INDEX)


def test_no_counts_without_two_dimensional_labels_with_values() -> None:
    assert labelled_counts({"input_ids": LABELS}) is None
    assert labelled_counts({"labels": LABELS[0]}) is None
    assert labelled_counts({"labels": torch.empty(2, 5, dtype=torch.long, device="meta")}) is None
