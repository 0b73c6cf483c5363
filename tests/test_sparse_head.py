"""The sparse LM head gives the dense loss and gradients, runs less, and the cost profile, budget and floor see it."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
import transformers
from conftest import VOCAB, needs_sparse_head, tiny_model
from peft import get_peft_model
from torch.utils import _pytree as pytree
from torch.utils._pytree import tree_flatten, tree_unflatten

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig, enable_sparse_lm_head, sparse_lm_loss
from peft_greentrainer.engine.label_buckets import LABEL_BUCKETS, label_bucket
from peft_greentrainer.engine.profile import measure_flops
from peft_greentrainer.sparse_head import attached_sparse_lm_head, next_token_targets

CAUSAL = ["llama", "opt", "bloom", "gpt2"]


def _ragged_batch(seed: int = 3) -> dict[str, torch.Tensor]:
    """Prompts of different lengths masked, right padding masked, and one row with no label at all."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 20), generator=generator)
    labels = ids.clone()
    labels[0, :7] = -100  # prompt
    labels[1, :12] = -100
    labels[1, 17:] = -100  # padding
    labels[2, :] = -100  # nothing to learn in this row
    labels[3, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _packed_batch(seed: int = 4) -> dict[str, torch.Tensor]:
    """Three sequences flattened into one row by transformers' padding-free collator (position_ids restart)."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for length, prompt in ((9, 4), (6, 6), (11, 3)):
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return dict(transformers.DataCollatorWithFlattening(return_tensors="pt")(features))


def _loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks for both heads (the body runs the same ops)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(dense, sparse) -> None:
    (dense_loss, dense_grads), (sparse_loss, sparse_grads) = dense, sparse
    assert torch.allclose(sparse_loss, dense_loss, rtol=0, atol=1e-6), (sparse_loss, dense_loss)
    assert dense_grads.keys() == sparse_grads.keys()
    for name, grad in dense_grads.items():
        assert torch.allclose(sparse_grads[name], grad, rtol=0, atol=1e-6), name


@needs_sparse_head
@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("make_batch", [_ragged_batch, _packed_batch], ids=["ragged", "packed"])
@pytest.mark.parametrize("num_items", [None, 40], ids=["mean", "num_items_in_batch"])
def test_loss_and_gradients_equal_the_dense_head(arch, make_batch, num_items):
    model = tiny_model(arch)
    batch = make_batch()
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    dense = _loss_and_grads(model, lambda: model(**batch, **extra).loss)
    _assert_same(dense, _loss_and_grads(model, lambda: sparse_lm_loss(model, batch, num_items_in_batch=num_items)))
    head = enable_sparse_lm_head(model)  # the same computation as a hook on the model's own forward
    try:
        _assert_same(dense, _loss_and_grads(model, lambda: model(**batch, **extra).loss))
        kept, _ = next_token_targets(batch["labels"])
        assert head.kept_share == pytest.approx(kept.float().mean().item())
        outputs = model(**batch)
        assert outputs.logits.shape == (int(kept.sum()), VOCAB)  # only the kept rows were projected
        assert outputs.to_tuple()[0].ndim == 0  # the loss keeps its first slot
    finally:
        head.remove()
    assert attached_sparse_lm_head(model) is None


@needs_sparse_head
def test_a_dense_training_forward_leaves_no_share_of_an_earlier_sparse_one():
    """A Trainer with label smoothing takes the labels out before the forward, so the head runs on every position:
    the share logged was still the importance pass's, a saving the steps never made."""
    model = tiny_model("llama").train()
    batch = _ragged_batch()
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    head = enable_sparse_lm_head(model)
    try:
        model(**batch)
        share = next_token_targets(batch["labels"])[0].float().mean().item()
        assert head.kept_share == pytest.approx(share) and share < 1
        with torch.no_grad():
            model(**unlabelled)  # not training: a measurement or a generation
        with head.disabled():
            model(**batch)  # the dense reference
        assert head.kept_share == pytest.approx(share)
        model(**unlabelled)
        assert head.kept_share is None
    finally:
        head.remove()


@needs_sparse_head
def test_the_head_runs_only_on_kept_positions_and_evaluation_stays_dense():
    model = tiny_model("llama")
    batch = _ragged_batch()
    dense_forward, dense_backward = measure_flops(model, batch)
    head = enable_sparse_lm_head(model)
    sparse_forward, sparse_backward = measure_flops(model, batch)
    head_flops = 2 * model.config.hidden_size * VOCAB  # per projected position
    positions = batch["input_ids"].numel()
    kept = int(next_token_targets(batch["labels"])[0].sum())
    assert dense_forward - sparse_forward == (positions - kept) * head_flops
    assert sparse_backward < dense_backward
    model.eval()
    assert model(**batch).logits.shape == (*batch["input_ids"].shape, VOCAB)  # metric code sees dense logits
    assert enable_sparse_lm_head(model) is head  # attaching twice keeps one head


@needs_sparse_head
def test_reading_the_kept_rows_logits_says_once_what_they_are_and_how_to_get_dense_ones(monkeypatch, caplog):
    """A ``compute_loss`` written for ``(batch, seq, vocab)`` logits got only a shape error naming neither the head
    nor the option (or broadcast silently); reading them by name now says what they are, once per process."""
    monkeypatch.setattr("peft_greentrainer.sparse_head._said_logits_are_kept_rows", False)
    model, batch = tiny_model("llama"), _ragged_batch()
    dense_type = type(model(**batch))
    enable_sparse_lm_head(model)
    with caplog.at_level(logging.WARNING, logger="peft_greentrainer.sparse_head"):
        outputs = model(**batch)
        assert isinstance(outputs, dense_type) and type(outputs).__qualname__ == dense_type.__qualname__
        for registered in (type(outputs), dense_type):  # transformers registers both for pytree serialisation
            name = pytree.SUPPORTED_SERIALIZED_TYPES[registered].serialized_type_name
            assert pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[name] is registered  # one name each
        with torch.no_grad():
            assert type(pickle.loads(pickle.dumps(model(**batch)))) is dense_type  # torch.save, all_gather_object
        outputs.loss.backward()
        assert outputs[0] is outputs.loss and outputs.to_tuple()[0] is outputs.loss  # positional reads: silent
        flat, spec = tree_flatten(outputs)  # as DDP passes outputs through
        assert type(tree_unflatten(flat, spec)) is type(outputs)
        assert not caplog.records
        kept = int(next_token_targets(batch["labels"])[0].sum())
        assert outputs.logits.shape == (kept, VOCAB)
        assert outputs["logits"] is outputs.get("logits") is outputs.logits
        model(**batch).logits  # noqa: B018 (a read)
        model.eval()
        assert model(**batch).logits.shape == (*batch["input_ids"].shape, VOCAB)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert f"only the {kept} positions" in said[0] and "GreenTrainerConfig(sparse_lm_head=False)" in said[0]


@needs_sparse_head
def test_a_compute_loss_that_shifts_the_logits_fails_after_the_warning_that_says_what_to_do(
    monkeypatch, tmp_path, caplog
):
    """The common Trainer subclass shifting ``outputs.logits`` against the labels: the sparse head's rows make its
    cross-entropy fail; the warning before the error names the option, with which it trains."""
    monkeypatch.setattr("peft_greentrainer.sparse_head._said_logits_are_kept_rows", False)

    class ShiftedLossTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            logits, labels = outputs.logits[..., :-1, :], inputs["labels"][..., 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            return (loss, outputs) if return_outputs else loss

    rows = [{k: v[i] for k, v in _ragged_batch(seed).items()} for seed in range(2) for i in range(4)]
    warned = []
    for sparse in (True, False):
        config = GreenTrainerConfig(rho=0.6, units="lora", target_modules=["q_proj", "v_proj"], sparse_lm_head=sparse)
        model = get_peft_model(tiny_model("llama"), config)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(sparse)),
            per_device_train_batch_size=2,
            max_steps=2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            learning_rate=1e-3,
        )
        trainer = ShiftedLossTrainer(model=model, args=args, train_dataset=rows, callbacks=[GreenTrainerCallback()])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="peft_greentrainer.sparse_head"):
            if sparse:
                with pytest.raises(ValueError, match="batch_size"):
                    trainer.train()
            else:
                trainer.train()
        warned.append([r.getMessage() for r in caplog.records if r.name == "peft_greentrainer.sparse_head"])
    assert len(warned[0]) == 1 and "sparse_lm_head=False" in warned[0][0]
    assert warned[1] == []


def test_models_it_cannot_be_exact_for_stay_dense_with_one_log_line(caplog):
    model = tiny_model("t5")
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 10)), "labels": torch.randint(3, VOCAB, (2, 6))}
    with caplog.at_level(logging.INFO, logger="peft_greentrainer.sparse_head"):
        assert enable_sparse_lm_head(model) is None
    lines = [r for r in caplog.records if r.name == "peft_greentrainer.sparse_head"]
    assert len(lines) == 1 and "stays dense" in lines[0].getMessage() and "T5" in lines[0].getMessage()
    torch.manual_seed(0)
    dense = model(**batch).loss
    torch.manual_seed(0)
    assert torch.equal(sparse_lm_loss(model, batch), dense)  # the helper falls back to the model's own loss


def test_trainer_with_the_helper_trains_like_the_dense_trainer(tmp_path):
    """Full fine-tuning through ``Trainer.compute_loss`` with gradient accumulation (``num_items_in_batch``)."""

    class SparseHeadTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return sparse_lm_loss(model, inputs, return_outputs, num_items_in_batch)

    rows = [{k: v[i] for k, v in _ragged_batch(seed).items()} for seed in range(2) for i in range(4)]
    models = {}
    for name, trainer_class in (("dense", transformers.Trainer), ("sparse", SparseHeadTrainer)):
        model = tiny_model("llama")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = trainer_class(model=model, args=args, train_dataset=rows)
        trainer.train()
        models[name] = (model, [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h])
    (dense, dense_loss), (sparse, sparse_loss) = models["dense"], models["sparse"]
    assert sparse_loss == pytest.approx(dense_loss, abs=1e-6)
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


@needs_sparse_head
@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_tuner_profiles_budgets_and_measures_the_sparse_head(units):
    """On by default: the profile predicts the FLOPs that run, and the floor drops with the head's work."""
    batch = _ragged_batch()
    found = {}
    for sparse in (False, True):
        model = tiny_model("llama")
        extra = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]} if units == "lora" else {}
        config = GreenTrainerConfig(rho=0.7, units=units, sparse_lm_head=sparse, **extra)
        tuner = get_peft_model(model, config).base_model
        assert (attached_sparse_lm_head(tuner.model) is not None) == sparse
        optimizer = torch.optim.AdamW([p for p in tuner.model.parameters() if p.requires_grad])
        selection = tuner.select_units([batch], optimizer)
        trainable = [n for n, p in tuner.model.named_parameters() if p.requires_grad]
        forward, backward = measure_flops(tuner.model, batch, trainable)
        if sparse:  # one row with the most labels stands for every row: an upper bound on ragged batches
            assert forward + backward <= selection.flops <= 1.05 * (forward + backward)
        else:
            assert selection.flops == pytest.approx(forward + backward, rel=1e-9)  # predicted = counted
        found[sparse] = (tuner.unit_costs(batch), tuner.min_feasible_rho(batch))
    (dense_costs, dense_floor), (sparse_costs, sparse_floor) = found[False], found[True]
    assert sparse_costs.forward_flops < dense_costs.forward_flops
    assert sparse_costs.full_flops < dense_costs.full_flops
    assert sparse_floor < dense_floor


IMAGE_TOKEN = VOCAB - 1
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16}


def _vision_language_model(family: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if family == "llava":  # no vocabulary at the top of its config, as Qwen2-VL, Gemma 3, Idefics3, ...
        vision = transformers.CLIPVisionConfig(**VISION, image_size=32, patch_size=8)
        text = transformers.LlamaConfig(**TEXT, vocab_size=VOCAB, num_key_value_heads=2)
        config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
        return transformers.LlavaForConditionalGeneration(config)
    vision = transformers.SiglipVisionConfig(**VISION, image_size=32, patch_size=8)
    text = transformers.GemmaConfig(**TEXT, vocab_size=VOCAB, num_key_value_heads=1)
    config = transformers.PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, projection_dim=32, vocab_size=VOCAB
    )
    model = transformers.PaliGemmaForConditionalGeneration(config)
    model.resize_token_embeddings(VOCAB + 8)  # its text config's vocabulary grows, the one at the top stays
    return model


def _image_batch() -> dict[str, torch.Tensor]:
    """A 32x32 image (16 patches of 8x8) before each row's text; the loss is on the second half of the text."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, IMAGE_TOKEN, (2, 28), generator=generator)
    ids[:, :16] = IMAGE_TOKEN
    token_type_ids = torch.zeros_like(ids)  # PaliGemma's prefix (image and prompt) and suffix
    token_type_ids[:, 20:] = 1
    labels = ids.masked_fill(token_type_ids == 0, -100)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": token_type_ids,
        "labels": labels,
        "pixel_values": torch.randn(2, 3, 32, 32, generator=generator),
    }


@needs_sparse_head
@pytest.mark.parametrize("family", ["llava", "resized paligemma"])
def test_a_vision_language_model_trains_with_the_sparse_head_at_the_dense_loss(family):
    """The vocabulary is the logits' own: read from the config, it crashed the head on every vision-language model
    (LLaVA's config has no ``vocab_size``) and the loss of a resized PaliGemma (its top-level one is stale)."""
    model = _vision_language_model(family).train()
    batch = _image_batch()
    if family == "llava":
        batch.pop("token_type_ids")
    dense = _loss_and_grads(model, lambda: model(**batch).loss)
    _assert_same(dense, _loss_and_grads(model, lambda: sparse_lm_loss(model, batch)))
    tuner = get_peft_model(model, GreenTrainerConfig(rho=0.7)).base_model  # the head is on by default
    head = attached_sparse_lm_head(tuner.model)
    assert head is not None
    optimizer = torch.optim.AdamW([p for p in tuner.model.parameters() if p.requires_grad], lr=1e-3)
    tuner.select_units([batch], optimizer)
    with head.disabled():  # the dense head, with the selection's flags
        dense = _loss_and_grads(tuner.model, lambda: tuner.model(**batch).loss)
    _assert_same(dense, _loss_and_grads(tuner.model, lambda: tuner.model(**batch).loss))
    assert head.kept_share == pytest.approx(next_token_targets(batch["labels"])[0].float().mean().item())
    optimizer.step()
    assert tuner.step_flops_ratios()[0] <= 0.7


def test_config_validates_the_option():
    assert GreenTrainerConfig().sparse_lm_head is True
    with pytest.raises(ValueError, match="sparse_lm_head must be True or False"):
        GreenTrainerConfig(sparse_lm_head="yes")


@pytest.mark.parametrize("attached", ["by the tuner", "before get_peft_model"])
def test_more_labels_at_a_shape_already_priced_keep_the_budget(attached):
    """The head's cost grows with the labelled positions: a step at a known shape but with more labels than any row
    priced there is priced before it runs (and re-selected if over budget), never charged the cheaper cost. Also on
    a base that carries the head already (attached before ``get_peft_model``): its hook, which moves the labels into
    ``logits_to_keep``, then ran before the budget check, which priced steps by shape alone."""
    rho = 0.7
    base = tiny_model("llama")
    if attached == "before get_peft_model":
        enable_sparse_lm_head(base)
    tuner = get_peft_model(base, GreenTrainerConfig(rho=rho, units="tensors")).base_model
    optimizer = torch.optim.AdamW([p for p in tuner.model.parameters() if p.requires_grad])
    generator = torch.Generator().manual_seed(0)

    def batch(labelled: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, VOCAB, (2, 32), generator=generator)
        labels = ids.clone()
        labels[:, : 32 - labelled] = -100  # the prompt
        return {"input_ids": ids, "labels": labels}

    tuner.select_units([batch(3)], optimizer)
    everything = [n for n, _ in tuner.model.named_parameters()]
    for labelled in (3, 12, 31):
        step = batch(labelled)
        tuner.model.zero_grad()
        tuner.model(**step).loss.backward()
        logged = tuner.step_flops_ratios()[0]
        trainable = [n for n, p in tuner.model.named_parameters() if p.requires_grad]
        measured = sum(measure_flops(tuner.model, step, trainable)) / sum(measure_flops(tuner.model, step, everything))
        assert measured <= logged + 1e-9, (labelled, measured, logged)
        assert logged <= rho + 1e-9, (labelled, logged)


@pytest.mark.parametrize("shifted", [False, True], ids=["labels", "shift_labels"])
def test_a_label_bucket_brackets_the_mean_and_relabels_the_row_to_its_ends(shifted):
    generator = torch.Generator().manual_seed(1)
    for _ in range(40):
        length = int(torch.randint(2, 70, (1,), generator=generator))
        sequences = int(torch.randint(1, 3, (1,), generator=generator))
        labels = torch.randint(3, VOCAB, (sequences, length), generator=generator)
        labels[torch.rand(sequences, length, generator=generator) < torch.rand(1, generator=generator)] = -100
        row = {"input_ids": labels.clamp(min=0), "labels": labels}
        if shifted:
            row["shift_labels"] = _shift_left(labels)
        mask, _ = next_token_targets(labels, row.get("shift_labels"))
        mean = float(mask.sum(1).float().mean())
        bucket = label_bucket(row, mean)
        assert bucket.bottom <= mean <= bucket.top <= bucket.bottom + -(-length // LABEL_BUCKETS)
        for end, count in ((bucket.widened, bucket.top), (bucket.narrowed, bucket.bottom)):
            relabelled, _ = next_token_targets(end["labels"], end.get("shift_labels"))
            assert (relabelled.sum(1) == count).all()
            for seq in range(sequences):  # the real targets come first
                real = mask[seq].nonzero().flatten()
                assert relabelled[seq, real[:count]].all()


def test_a_step_with_fewer_labels_than_its_bucket_top_stays_within_rho():
    """With the head's weight frozen and an expensive selection, a step's share of full fine-tuning *falls* as labels
    are added (the step pays the head twice per position, full fine-tuning three times): full fine-tuning is priced
    at the bucket's fewest labels, so a step with fewer labels than the bucket's top is not under-priced, nor a batch
    whose rows differ widely (its costs follow the mean count: the head's cost per position is fixed)."""
    length = 128
    ids = torch.randint(3, 4096, (2, length), generator=torch.Generator().manual_seed(0))

    def batch(*labelled: int) -> dict[str, torch.Tensor]:
        labels = ids.clone()
        for row, count in enumerate(labelled):
            labels[row, : length - count] = -100
        return {"input_ids": ids, "labels": labels}

    for rho in (0.8, 0.85, 0.9):
        model = tiny_model("llama", vocab_size=4096, tie_word_embeddings=False)
        config = GreenTrainerConfig(rho=rho, exclude_patterns=["lm_head"])
        tuner = get_peft_model(model, config).base_model
        optimizer = torch.optim.AdamW([p for p in tuner.model.parameters() if p.requires_grad])
        tuner.select_units([batch(5, 5)], optimizer)
        everything = [n for n, _ in tuner.model.named_parameters()]
        for counts in ((2, 2), (100, 1), (100, 0), (50, 100)):  # rows far apart: the batch's mean decides
            step = batch(*counts)
            tuner.model(**step).loss.backward()
            logged = tuner.step_flops_ratios()[0]
            trainable = [n for n, p in tuner.model.named_parameters() if p.requires_grad]
            counted = sum(measure_flops(tuner.model, step, trainable))
            measured = counted / sum(measure_flops(tuner.model, step, everything))
            assert measured <= logged + 1e-9 and logged <= rho + 1e-9, (rho, counts, measured, logged)


def _shift_left(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


def test_trls_fused_head_projecting_only_labelled_rows_is_priced_by_label_count(monkeypatch):
    """On CUDA/XPU TRL's fused LM head (SFTTrainer's default) projects only the labelled positions, so its cost, like
    the sparse head's, follows the labels: a step at a known shape with more labels is priced before it runs.
    Simulated here by TRL's own switch for that path (the head's matmuls are the same torch.mm on every device)."""
    from trl.trainer import utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    rho = 0.7
    model = tiny_model("llama")
    trl_utils.add_fused_lm_head(model)
    tuner = get_peft_model(model, GreenTrainerConfig(rho=rho, sparse_lm_head=False)).base_model
    optimizer = torch.optim.AdamW([p for p in tuner.model.parameters() if p.requires_grad])
    generator = torch.Generator().manual_seed(0)

    def batch(labelled: int) -> dict:
        ids = torch.randint(3, VOCAB, (2, 32), generator=generator)
        labels = ids.clone()
        labels[:, : 32 - labelled] = -100
        return {"input_ids": ids, "labels": labels, "fused_lm_head": True}

    tuner.select_units([batch(2)], optimizer)
    everything = [n for n, _ in tuner.model.named_parameters()]
    for labelled in (2, 31):
        step = batch(labelled)
        tuner.model(**step).loss.backward()
        logged = tuner.step_flops_ratios()[0]
        trainable = [n for n, p in tuner.model.named_parameters() if p.requires_grad]
        measured = sum(measure_flops(tuner.model, step, trainable)) / sum(measure_flops(tuner.model, step, everything))
        assert measured <= logged + 1e-9 and logged <= rho + 1e-9, (labelled, measured, logged)


@needs_sparse_head
def test_the_floor_a_run_is_told_is_the_floor_its_selection_uses():
    """The CLI checks rho against min_feasible_rho before training: it prices the batch as the selection does (at its
    label bucket's ends), so a rho just above it selects instead of failing later."""
    ids = torch.randint(3, 4096, (2, 128), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :28] = -100
    batch = {"input_ids": ids, "labels": labels}

    def tuner(rho: float):
        model = tiny_model("llama", vocab_size=4096, tie_word_embeddings=False)
        return get_peft_model(model, GreenTrainerConfig(rho=rho, exclude_patterns=["lm_head"])).base_model

    floor = tuner(0.99).min_feasible_rho(batch)
    assert floor > tuner(0.99).unit_costs(batch).min_feasible_rho()  # the bucket's bound is above the batch's own
    at_floor = tuner(floor + 1e-4)
    at_floor.select_units([batch], torch.optim.AdamW([p for p in at_floor.model.parameters() if p.requires_grad]))


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_a_masked_lm_head_that_projects_only_masked_tokens_is_priced_by_their_count(units):
    """ModernBERT's masked-LM head with ``sparse_prediction=True`` projects only the masked positions: priced by shape
    on rows with 2 masked tokens, a step on rows with 32 cost 0.526 of full fine-tuning at rho 0.5. Priced per
    label-count bucket (each label scored where it stands, not shifted), every step keeps rho."""
    rho = 0.5 if units == "tensors" else 0.6
    config = transformers.ModernBertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=0,
        sparse_prediction=True,
        global_attn_every_n_layers=1,
    )
    torch.manual_seed(0)
    lora = {"r": 4, "target_modules": ["Wqkv", "Wo"]} if units == "lora" else {}
    model = get_peft_model(transformers.ModernBertForMaskedLM(config), GreenTrainerConfig(rho=rho, units=units, **lora))

    def masked(count: int, seed: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(5, 128, (2, 32), generator=torch.Generator().manual_seed(seed))
        labels = torch.full_like(ids, -100)
        labels[:, :count] = ids[:, :count]  # position 0 too: a masked LM scores it, a causal LM's shift would not
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model.base_model.select_units([masked(2, 0)], optimizer)
    base = model.base_model.model
    everything = [name for name, _ in base.named_parameters() if "lora_" not in name]
    ratios = []
    for count in (2, 16, 32, 1):
        batch = masked(count, count)
        model(**batch).loss.backward()  # the step: a new label bucket is priced (and may re-select) here
        optimizer.step()
        optimizer.zero_grad()
        step = sum(measure_flops(model, batch))
        with model.disable_adapter() if units == "lora" else torch.enable_grad():
            full = sum(measure_flops(base, batch, everything))
        ratios.append(step / full)
    assert max(ratios) <= rho * (1 + 1e-9), ratios
    assert min(ratios) > rho - 0.1, ratios  # the budget is used, not avoided


def test_a_model_whose_first_weight_is_offloaded_keeps_the_sparse_head_on_its_labels(tmp_path):
    """accelerate keeps offloaded weights on ``meta`` between forwards: taken for a weightless twin, a real model whose
    embedding was offloaded kept the first positions instead of the labelled ones, and trained on that loss; its
    selection sent the batches to ``meta``."""
    from accelerate import dispatch_model

    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :16] = -100
    with torch.no_grad():
        dense = model(input_ids=ids, labels=labels).loss
    placement = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu"}
    model = dispatch_model(model, device_map={**placement, "lm_head": "cpu"}, main_device="cpu", offload_dir=tmp_path)
    assert next(model.parameters()).device.type == "meta"
    peft_model = get_peft_model(model, GreenTrainerConfig(rho=0.6, units="lora", r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        assert peft_model.train()(input_ids=ids, labels=labels).loss == pytest.approx(float(dense), abs=1e-5)
    # the selection sends its batches where the hooks take them, not to the offloaded weight's meta
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
    selection = peft_model.base_model.select_units([{"input_ids": ids, "labels": labels}], optimizer)
    assert selection.flops <= 0.6 * selection.full_flops
    peft_model(input_ids=ids, labels=labels).loss.backward()
