"""Attention that runs only within the sequences the inputs delimit (flash attention on padded or packed rows).

Flash attention cannot run on the CPU, so these tests register an attention function that behaves like it for FLOP
counting: it attends only within each sequence that flash attention's varlen path would find (the unpadded tokens of
a row, the sequences packed into one row by restarting ``position_ids``, or ``cu_seq_lens_q``), computed eagerly, so
FlopCounterMode counts what such a kernel computes. transformers gives it flash attention's mask handling.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import transformers
from conftest import save_tiny_checkpoint, tiny_config
from peft import get_peft_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from peft_greentrainer import GreenTrainerConfig, fsdp
from peft_greentrainer.engine.attention_spans import attention_extremes, attention_follows_values
from peft_greentrainer.engine.profile import costliest_row, default_loss, measure_flops, profile_key

SEGMENTED = "segmented_eager_for_tests"
VOCAB = 64


def _sequences(attention_mask, kwargs: dict, rows: int, length: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of each sequence attended, found as flash attention's varlen path finds them."""
    offsets = kwargs.get("cu_seq_lens_q")
    if offsets is not None:
        bounds = offsets.tolist()
        return [(0, start, end) for start, end in itertools.pairwise(bounds)]
    if attention_mask is not None:  # flash attention's 2-D padding mask (None when nothing is padded)
        spans = []
        for row in range(rows):
            kept = attention_mask[row].nonzero().flatten().tolist()
            spans += [(row, kept[0], kept[-1] + 1)] if kept else []
        return spans
    positions = kwargs.get("position_ids")
    if positions is not None and rows == 1:
        flat = positions.reshape(-1)
        starts = [*(flat == flat.min()).nonzero().flatten().tolist(), length]
        return [(0, start, end) for start, end in itertools.pairwise(starts)]
    return [(row, 0, length) for row in range(rows)]


def _segmented_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention computed within each sequence only; positions outside every sequence output zeros."""
    rows, heads, length, head_dim = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    spans = _sequences(attention_mask, kwargs, rows, length)
    outputs = []
    for row in range(rows):
        pieces, at = [], 0
        for _, start, end in (span for span in spans if span[0] == row):
            if start > at:
                pieces.append(query.new_zeros(1, heads, start - at, head_dim))
            q, k, v = (t[row : row + 1, :, start:end] for t in (query, key, value))
            scores = q @ k.transpose(-1, -2) * (scaling or head_dim**-0.5)
            causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            pieces.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)
            at = end
        if at < length:
            pieces.append(query.new_zeros(1, heads, length - at, head_dim))
        outputs.append(torch.cat(pieces, dim=2))
    return torch.cat(outputs).transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENTED, _segmented_attention)
AttentionMaskInterface.register(SEGMENTED, flash_attention_mask)


def _config(attention: str = SEGMENTED) -> transformers.LlamaConfig:
    """Attention dominates at these sizes: how a step's cost moves with its sequences is easy to see."""
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation=attention,
    )


def _packed(lengths: list[int], form: str, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """One row of ``sum(lengths)`` tokens holding sequences of ``lengths``, delimited as ``form`` says; "padded":
    as many rows, each a sequence right-padded to the longest."""
    generator = torch.Generator().manual_seed(len(lengths))
    if form == "padded":
        width = max(lengths)
        ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
        mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone()}
    batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    if form == "cu_seq_lens":  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        batch |= {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": max(lengths)}
        batch["max_length_k"] = max(lengths)
    return batch


def test_the_extremes_rewrite_only_the_inputs_that_delimit_sequences():
    packed = _packed([3, 5], "cu_seq_lens")
    (whole_name, whole), (single_name, single) = attention_extremes(packed)
    assert (whole_name, single_name) == ("one sequence", "one token per sequence")
    assert whole["position_ids"].tolist() == [list(range(8))] and single["position_ids"].tolist() == [[0] * 8]
    assert whole["cu_seq_lens_q"].tolist() == [0, 8] and single["cu_seq_lens_k"].tolist() == list(range(9))
    assert (whole["max_length_q"], single["max_length_k"]) == (8, 1)
    assert whole["input_ids"] is packed["input_ids"] and single["labels"] is packed["labels"]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # the batch itself is not changed

    padded = _packed([2, 4], "padded")
    (_, whole), (_, single) = attention_extremes({k: v[:1] for k, v in padded.items()})
    assert whole["attention_mask"].tolist() == [[1, 1, 1, 1]] and single["attention_mask"].tolist() == [[1, 0, 0, 0]]
    assert attention_extremes({"input_ids": padded["input_ids"]}) is None
    assert attention_extremes({"input_ids": padded["input_ids"], "attention_mask": torch.ones(1, 1, 4, 4)}) is None


def test_only_attention_that_reads_the_values_is_priced_at_its_extremes():
    assert attention_follows_values(transformers.LlamaForCausalLM(_config()))
    for dense in ("eager", "sdpa"):
        assert not attention_follows_values(transformers.LlamaForCausalLM(_config(dense)))


@pytest.mark.parametrize(
    ("form", "order", "rho"),
    [
        *itertools.product(["padded"], ["short_first", "long_first"], [0.5, 0.7]),
        # the packed forms' 256-token rows are slow to measure: each pair of values once, not every triple
        ("position_ids", "short_first", 0.5),
        ("position_ids", "long_first", 0.7),
        ("cu_seq_lens", "short_first", 0.7),
        ("cu_seq_lens", "long_first", 0.5),
    ],
)
def test_steps_stay_within_rho_whatever_sequences_the_inputs_delimit(form, order, rho):
    """At one shape the sequences change from batch to batch (packing, padding): a step's FLOPs and full fine-tuning's
    move with them, and their ratio can rise either way. A selection made on one batch stays within rho on the other,
    measured, and the logged ratio bounds the measured one. Priced by shape alone, this went to 0.79 at rho 0.7."""
    short, long = ([16] * 16, [256]) if form != "padded" else ([64, 8, 8, 8], [64, 64, 64, 64])
    batches = [_packed(short, form), _packed(long, form)]
    if order == "long_first":
        batches.reverse()
    torch.manual_seed(0)
    model = get_peft_model(transformers.LlamaForCausalLM(_config()), GreenTrainerConfig(rho=rho, units="tensors"))
    tuner = model.base_model
    tuner.select_units(batches[:1], torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    everything = [name for name, _ in tuner.model.named_parameters()]
    for batch in batches:
        tuner.model.zero_grad()
        tuner.model(**batch).loss.backward()
        logged = tuner.step_flops_ratios()[0]
        trainable = [name for name, p in tuner.model.named_parameters() if p.requires_grad]
        full = sum(measure_flops(tuner.model, batch, everything))
        measured = sum(measure_flops(tuner.model, batch, trainable)) / full
        assert measured <= logged + 1e-9 and logged <= rho + 1e-9, (measured, logged)


def test_packings_at_one_shape_cost_two_profiles_and_dense_attention_keeps_one_per_shape():
    """Each packing at a known shape is priced by the shape's two extremes, not profiled again; under eager or SDPA
    attention the key of a padded batch is its shape's, as before, and a new mask at that shape costs nothing."""
    model = get_peft_model(transformers.LlamaForCausalLM(_config()), GreenTrainerConfig(rho=0.6, units="tensors"))
    tuner = model.base_model
    packings = [[16] * 16, [256], [100, 100, 56], [1] * 128 + [128]]
    tuner.select_units([_packed(packings[0], "cu_seq_lens")], torch.optim.AdamW(model.parameters()))
    for lengths in packings:
        model(**_packed(lengths, "cu_seq_lens")).loss.backward()
    assert len(tuner._pricer.shape_costs) == 2

    dense = get_peft_model(
        transformers.LlamaForCausalLM(_config("sdpa")), GreenTrainerConfig(rho=0.6, sparse_lm_head=False)
    )
    padded = _packed([20, 12], "padded")
    (key,) = [key for _, key, _ in dense.base_model._pricer.row_keys(padded)]
    assert key == profile_key(dense.base_model.model, costliest_row(padded))
    dense.base_model.select_units([padded], torch.optim.AdamW(dense.parameters()))
    dense(**_packed([20, 3], "padded")).loss.backward()
    assert list(dense.base_model._pricer.shape_costs) == [key]


def test_an_encoder_decoder_under_such_attention_is_refused_with_what_to_do():
    """Its cross-attention costs both sides' lengths together, which two priced rows cannot bound."""
    config = tiny_config("bart")
    config._attn_implementation = SEGMENTED
    model = get_peft_model(transformers.BartForConditionalGeneration(config), GreenTrainerConfig(rho=0.7))
    padded = _packed([12, 5], "padded")
    with pytest.raises(NotImplementedError, match="attn_implementation='sdpa'"):
        model.base_model.select_units([padded], torch.optim.AdamW(model.parameters()))


def test_a_quantized_base_with_such_attention_prices_padded_and_packed_batches(tmp_path):
    """Full fine-tuning of a quantized base is priced on a twin of fake tensors; transformers and flash attention read
    the mask and the positions (``attention_mask.all()``, the packed-sequence test), which a fake tensor cannot
    answer. The twin keeps their values, and the budget holds on both kinds of batch."""
    pytest.importorskip("bitsandbytes")
    save_tiny_checkpoint(tmp_path, "llama", hidden=32)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True),
        attn_implementation=SEGMENTED,
        dtype=torch.float32,
    )
    model = get_peft_model(base, GreenTrainerConfig(rho=0.6, units="lora", target_modules="all-linear"))
    model.train()
    vocab = base.config.vocab_size
    padded, packed = _packed([20, 12], "padded", vocab), _packed([10, 22], "position_ids", vocab)
    model.base_model.select_units([padded], torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    for batch in (padded, packed):
        model(**batch).loss.backward()
        assert model.base_model.step_flops_ratios()[0] <= 0.6 + 1e-9


@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens", "padded"])
def test_the_fsdp_twin_prices_such_batches_as_the_model_itself(form):
    """An FSDP2-sharded model is profiled on a twin of fake tensors, which keeps the span inputs' values: its profile
    and full fine-tuning FLOPs equal the model's own."""
    tuner = get_peft_model(transformers.LlamaForCausalLM(_config()), GreenTrainerConfig(sparse_lm_head=False))
    tuner = tuner.base_model.train()
    batch = _packed([10, 22], form)
    (profile, full), (twin_profile, twin_full) = (
        tuner._measure(batch, default_loss),
        fsdp.measure_on_twin(tuner, batch, default_loss),
    )
    assert twin_full == full
    units = tuner.candidate_units()
    mine, twins = (p.unit_costs(units, full_flops=full) for p in (profile, twin_profile))
    assert np.array_equal(mine.t_dw, twins.t_dw) and np.array_equal(mine.t_dy, twins.t_dy)
    assert mine.forward_flops == twins.forward_flops
