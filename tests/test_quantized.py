"""Quantized backbones (bitsandbytes on CPU), gradient checkpointing and half precision keep the savings."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
import transformers
from conftest import (
    QWEN2_AUDIO_TOKEN,
    enable_activation_checkpointing,
    mistral3_batch,
    row_scaling_rel,
    save_tiny_checkpoint,
    tiny_batch,
    tiny_mistral3_config,
    tiny_model,
    tiny_qwen2_audio_config,
)
from datasets import Dataset
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig, enable_sparse_lm_head
from peft_greentrainer.backprop import INPUT_GRAD_HOOKS
from peft_greentrainer.engine.profile import measure_flops
from peft_greentrainer.engine.units import is_trainable_storage

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
pytest.importorskip("bitsandbytes")

QUANTIZATIONS = {
    "int8": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-quantizable")
    save_tiny_checkpoint(directory, hidden=128)  # 4-bit blocks are 64 wide: layers must be at least that
    return directory


def _quantized(checkpoint, kind: str, prepare: bool = True):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=transformers.BitsAndBytesConfig(**QUANTIZATIONS[kind]), dtype=torch.float32
    )
    return prepare_model_for_kbit_training(model) if prepare else model


def _batch(seed: int = 0, rows: int = 4, length: int = 16) -> dict:
    ids = torch.randint(3, 30, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def _has_forced_input_grads(model) -> bool:
    return any(
        getattr(h, "__name__", "") in INPUT_GRAD_HOOKS for m in model.modules() for h in m._forward_hooks.values()
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(QUANTIZATIONS))
def test_kbit_preparation_keeps_the_savings(checkpoint, kind):
    model = get_peft_model(
        _quantized(checkpoint, kind), GreenTrainerConfig(units="lora", rho=0.6, r=4, target_modules=TARGETS)
    )
    model.train()
    batch = _batch()
    assert _has_forced_input_grads(model)  # what prepare_model_for_kbit_training and PEFT installed
    forward, unhandled = measure_flops(model, batch)
    selection = model.select_units([batch], None, lr=1e-3)
    assert not _has_forced_input_grads(model)
    forward, backward = measure_flops(model, batch)
    full = model.base_model.cost_profile(batch)[1]
    assert backward < 0.7 * unhandled  # without the handling, backprop ran down to the embeddings
    assert forward + backward <= selection.flops * 1.1
    assert forward + backward <= 0.6 * full * 1.02
    assert forward + backward >= selection.flops * 0.95


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_kbit_training_selects_saves_and_loads(checkpoint, kind, tmp_path):
    model = get_peft_model(
        _quantized(checkpoint, kind), GreenTrainerConfig(units="lora", rho=0.7, r=4, target_modules=TARGETS)
    )
    rows = [list(range(3, 19)), list(range(5, 21))] * 8
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[GreenTrainerCallback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert np.mean(losses[-2:]) < losses[0] - 0.05
    state = model.greentrainer_state
    assert len(state.history) == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    chosen = {p for unit in model.base_model.candidate_units() if unit.name in state.selected for p in unit.param_names}
    assert {n.removeprefix("base_model.model.") for n in trainable} == chosen

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_quantized(checkpoint, kind, prepare=False), tmp_path / "adapter")
    trained = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    restored = loaded.state_dict()
    assert trained and all(torch.equal(v, restored[k]) for k, v in trained.items())
    # train mode (no dropout in this model): bitsandbytes' CPU inference path repacks 4-bit weights and fails on
    # layers this small
    model.train()
    loaded.train()
    batch = _batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_quantized_tensors_are_never_candidates(checkpoint):
    model = get_peft_model(_quantized(checkpoint, "int8", prepare=False), GreenTrainerConfig(units="tensors"))
    names = {p for unit in model.base_model.candidate_units() for p in unit.param_names}
    assert names and all(model.base_model.model.get_parameter(n).dtype.is_floating_point for n in names)
    assert not any(n.endswith("q_proj.weight") for n in names)
    # prepare_model_for_kbit_training freezes every float tensor: nothing is left to train in place
    with pytest.raises(ValueError, match="units='lora'"):
        get_peft_model(_quantized(checkpoint, "nf4"), GreenTrainerConfig(units="tensors"))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_four_bit_weights_packed_in_a_float_dtype_are_recognised_and_refused(checkpoint, storage):
    """``bnb_4bit_quant_storage=torch.bfloat16`` (FSDP-QLoRA's setting) packs 4-bit weights in a float dtype: taken for
    a float base, rho's reference was full fine-tuning of the quantized model (0.40x the float model's) and the profile
    priced a step that cost 0.68 of full fine-tuning at 0.41. They are quantized storage, refused with what to do."""
    config = {**QUANTIZATIONS["nf4"], "bnb_4bit_quant_storage": storage}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=transformers.BitsAndBytesConfig(**config), dtype=torch.float32
    )
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == storage and not is_trainable_storage(weight)
    with pytest.raises(ValueError, match=rf"bnb_4bit_quant_storage={storage}\).*default bnb_4bit_quant_storage"):
        get_peft_model(prepare_model_for_kbit_training(model), GreenTrainerConfig(units="lora", target_modules=TARGETS))


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_keeps_loss_trajectory_and_savings(reentrant):
    def run(checkpointing: bool, selection: list[str] | None = None):
        model = get_peft_model(tiny_model("llama", seed=3), GreenTrainerConfig(units="tensors", rho=0.5))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batches = [tiny_batch(model, seed=s) for s in range(4)]
        model.select_units(batches[:1], optimizer)
        if selection is not None:  # the same units as the other run (recompute changes costs, so could the DP)
            model.base_model.restore_selection(selection)
        losses = []
        for batch in batches:
            with torch.random.fork_rng(devices=[]):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return model, list(model.greentrainer_state.selected), losses

    plain, selection, losses_plain = run(False)
    checkpointed, _, losses_checkpointed = run(True, selection)
    np.testing.assert_allclose(losses_checkpointed, losses_plain, rtol=1e-5)
    batch = tiny_batch(plain, seed=9)
    tuner = checkpointed.base_model
    costs = tuner.unit_costs(batch)
    predicted = costs.predicted_backward(np.array([u.name in selection for u in costs.units]))
    _, backward = measure_flops(checkpointed, batch)
    assert backward <= predicted * 1.1  # recompute is accounted, and frozen blocks below are not recomputed
    assert backward >= predicted * 0.8  # over-predicts a little: recompute stops early once it has what it needs
    _, full_plain = measure_flops(plain, batch, [n for n, _ in plain.named_parameters()])
    assert backward < 0.8 * full_plain


def test_switching_to_non_reentrant_checkpointing_keeps_activation_offloading():
    """transformers' ``offload=True`` wraps torch's checkpoint in a function that keeps the saved activations on the
    host; making a reentrant layer non-reentrant kept the keywords and dropped that function (and the memory it
    saves)."""

    def offloading(function, *args, **kwargs):  # as transformers' (whose pinned memory needs an accelerator)
        with torch.autograd.graph.save_on_cpu(pin_memory=False):
            return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    base = tiny_model("llama", seed=3)
    enable_activation_checkpointing(base, use_reentrant=True)
    for layer in base.model.layers:
        layer._gradient_checkpointing_func = functools.partial(offloading, use_reentrant=True)
    model = get_peft_model(base, GreenTrainerConfig(units="tensors", rho=0.5)).train()
    batch = tiny_batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.select_units([batch], optimizer)
    model(**batch).loss.backward()
    functions = [layer._gradient_checkpointing_func for layer in base.model.layers]
    assert all(f.func is offloading and f.keywords == {"use_reentrant": False} for f in functions)


def test_bf16_model_importance_is_finite_and_trains():
    model = get_peft_model(tiny_model("llama").to(torch.bfloat16), GreenTrainerConfig(units="tensors", rho=0.5))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = tiny_batch(model)
    selection = model.select_units([batch], optimizer)
    assert np.isfinite(selection.importance) and selection.mask.any()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_trainer_with_bf16_autocast(tmp_path):
    model = get_peft_model(
        tiny_model("llama"), GreenTrainerConfig(units="lora", rho=0.7, r=4, target_modules=["q_proj", "v_proj"])
    )
    rows = [list(range(3, 27))] * 16
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        bf16=True,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}),
        callbacks=[GreenTrainerCallback()],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert model.greentrainer_state.history and np.isfinite(model.greentrainer_state.history[-1].importance)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense-head", "sparse-head"])
def test_rho_reference_of_a_quantized_base_is_full_fine_tuning_of_its_float_model(checkpoint, kind, sparse):
    """rho is a fraction of full fine-tuning of the base in float (what a quantized model cannot run): priced on a
    twin of fake tensors on the real device, so attention runs the kernel the float model would (SDPA's fused op,
    not meta's math path) and a sparse LM head skips the same positions."""
    ids = torch.randint(3, 30, (2, 64), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :40] = -100  # a prompt
    batch = {"input_ids": ids, "labels": labels}
    config = GreenTrainerConfig(rho=0.7, units="lora", target_modules=TARGETS, sparse_lm_head=sparse)
    tuner = get_peft_model(_quantized(checkpoint, kind, prepare=False), config).base_model.train()
    reference = tuner.cost_profile(batch)[1]
    float_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).train()
    if sparse:
        enable_sparse_lm_head(float_model)
    assert reference == sum(measure_flops(float_model, batch, [n for n, _ in float_model.named_parameters()]))


def test_a_quantized_base_saving_attention_in_its_checkpoints_is_priced_so(checkpoint):
    """The float twin that prices the reference checkpoints as the model's layers do: recomputing in full where the
    model saves attention (TRL's ``selective``), it priced full fine-tuning 2.6% above what it costs with that policy,
    a budget that much too large."""

    from peft_greentrainer.engine.checkpointing import non_reentrant_keywords

    batch = _batch(length=64)
    selective = {"selective": True}  # TRL's flag, made into its policy by GreenTrainer
    quantized = _quantized(checkpoint, "int8", prepare=False)
    quantized.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(selective))
    config = GreenTrainerConfig(rho=0.6, units="lora", target_modules=TARGETS)
    model = get_peft_model(quantized, config).train()
    selection = model.base_model.select_units([batch], torch.optim.SGD([p for p in model.parameters()], lr=0.0))
    float_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    float_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(selective))
    float_model.train()
    for layer in float_model.model.layers:  # as GreenTrainer makes the flag the policy it asks for
        keywords = non_reentrant_keywords(layer)
        layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, **keywords)
    full = sum(measure_flops(float_model, batch, [n for n, _ in float_model.named_parameters()]))
    assert selection.full_flops <= full * (1 + row_scaling_rel(0.0))
    assert sum(measure_flops(model.base_model.model, batch)) <= 0.6 * full


def test_a_quantized_vision_language_model_is_priced_on_its_float_twin(tmp_path):
    """The float twin that prices a quantized base's reference runs on fake tensors; a vision-language model counts its
    image tokens in ``input_ids`` by value (``get_placeholder_mask``), so its selection crashed on them
    (DataDependentOutputException): the twin now takes the input ids as they are."""
    torch.manual_seed(0)
    transformers.Mistral3ForConditionalGeneration(tiny_mistral3_config(hidden=64)).save_pretrained(tmp_path)
    batch = mistral3_batch(32)
    skip = ["multi_modal_projector", "lm_head"]
    quantization = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    quantized = transformers.Mistral3ForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=quantization, dtype=torch.float32
    )
    model = get_peft_model(quantized, GreenTrainerConfig(rho=0.6, units="lora", r=4, target_modules=TARGETS)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    selection = model.base_model.select_units([batch], optimizer)
    model(**batch).loss.backward()
    float_model = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).train()
    enable_sparse_lm_head(float_model)
    measured = sum(measure_flops(float_model, batch, [n for n, _ in float_model.named_parameters()]))
    # priced as the float model's own selection prices it: full fine-tuning at the label bucket's fewest labels, a
    # row fewer per sequence here (a stricter budget)
    float_config = GreenTrainerConfig(rho=0.6, units="lora", r=4, target_modules=TARGETS)
    float_tuner = get_peft_model(float_model, float_config).base_model
    float_optimizer = torch.optim.AdamW([p for p in float_tuner.parameters() if p.requires_grad])
    assert selection.full_flops == float_tuner.select_units([batch], float_optimizer).full_flops
    assert 0.999 * measured <= selection.full_flops <= measured


def _qwen2_vl(image_token: int) -> tuple[transformers.PreTrainedModel, dict]:
    vision = {
        "depth": 2, "embed_dim": 64, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    }  # fmt: skip
    text = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }  # fmt: skip
    config = transformers.Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token, video_token_id=101,
        vision_start_token_id=102, vision_end_token_id=103,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    text_ids = torch.randint(3, 90, (2, 32), generator=generator)
    image = [torch.full((2, 1), 102), torch.full((2, 4), image_token), torch.full((2, 1), 103)]
    ids = torch.cat([text_ids[:, :2], *image, text_ids[:, 2:]], dim=1)
    batch = {
        "input_ids": ids, "pixel_values": torch.randn(32, 96, generator=generator),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]), "mm_token_type_ids": (ids == image_token).long(),
    }  # fmt: skip
    return transformers.Qwen2VLForConditionalGeneration(config), batch


def _idefics3(image_token: int) -> tuple[transformers.PreTrainedModel, dict]:
    vision = transformers.Idefics3VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    config = transformers.Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_token)
    generator = torch.Generator().manual_seed(0)
    text_ids = torch.randint(3, 90, (2, 32), generator=generator)
    ids = torch.cat([text_ids[:, :2], torch.full((2, 4), image_token), text_ids[:, 2:]], dim=1)
    batch = {
        "input_ids": ids, "pixel_values": torch.randn(2, 1, 3, 32, 32, generator=generator),
        "pixel_attention_mask": torch.ones(2, 1, 32, 32, dtype=torch.bool),
    }  # fmt: skip
    return transformers.Idefics3ForConditionalGeneration(config), batch


@pytest.mark.parametrize("family", [_qwen2_vl, _idefics3], ids=["qwen2-vl", "idefics3"])
def test_a_quantized_vision_language_model_whose_inputs_are_read_by_value_selects(family, tmp_path):
    """The float twin keeps the values of the inputs such models read: Qwen2-VL's rope indexes its image tokens by
    ``mm_token_type_ids``, Idefics3 drops all-zero images from ``pixel_values``; made fake, both crashed the first
    selection of a 4-bit model."""
    torch.manual_seed(0)
    model, batch = family(image_token=100)
    model.save_pretrained(tmp_path)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -8:] = batch["input_ids"][:, -8:]
    batch["labels"] = labels
    skip = ["lm_head", "merger", "connector"]
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip)
    quantized = type(model).from_pretrained(tmp_path, dtype=torch.float32, quantization_config=quantization)
    model = get_peft_model(quantized, GreenTrainerConfig(rho=0.6, units="lora", r=4, target_modules=["q_proj"]))
    model.train()
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    selection = model.base_model.select_units([batch], optimizer)
    assert selection.mask.any() and selection.flops <= 0.6 * selection.full_flops


def test_a_quantized_model_whose_forward_reads_computed_values_is_refused_with_what_to_do(tmp_path):
    """Qwen2-Audio keeps the frames its mask selects from the features its encoder computed: a weightless twin has no
    values to select by, and the first selection crashed with torch's DynamicOutputShapeException."""
    transformers.Qwen2AudioForConditionalGeneration(tiny_qwen2_audio_config(hidden=64)).save_pretrained(tmp_path)
    ids = torch.cat([torch.full((1, 16), QWEN2_AUDIO_TOKEN), torch.randint(10, 240, (1, 8))], dim=1)  # 64 frames
    batch = {
        "input_ids": ids, "labels": ids.masked_fill(ids == QWEN2_AUDIO_TOKEN, -100),
        "input_features": torch.randn(1, 16, 64), "feature_attention_mask": torch.ones(1, 64, dtype=torch.long),
    }  # fmt: skip
    quantization = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    quantized = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=quantization, dtype=torch.float32
    )
    model = get_peft_model(quantized, GreenTrainerConfig(rho=0.6, units="lora", r=4, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    with pytest.raises(NotImplementedError, match=r"weightless twin.*plain LoRA"):
        model.train().base_model.select_units([batch], optimizer)


def test_rho_reference_of_a_quantized_mixture_of_experts_is_full_fine_tuning_of_its_float_model(tmp_path):
    """transformers 5 runs stacked experts as one grouped matmul, whose meta kernel takes bf16 only: the float twin
    that prices the reference must still run (and count the experts as the float model does)."""
    tiny_model("mixtral").save_pretrained(tmp_path)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.BitsAndBytesConfig(**QUANTIZATIONS["nf4"]), dtype=torch.float32
    )
    assert quantized.config._experts_implementation == "grouped_mm"
    tuner = get_peft_model(quantized, GreenTrainerConfig(rho=0.7, units="lora", target_modules=TARGETS)).base_model
    reference = tuner.cost_profile(batch)[1]
    float_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).train()
    measured = sum(measure_flops(float_model, batch, [n for n, _ in float_model.named_parameters()]))
    float_config = GreenTrainerConfig(rho=0.7, units="lora", target_modules=TARGETS)
    assert reference == get_peft_model(float_model, float_config).base_model.cost_profile(batch)[1]
    # the profile prices the router's backward a little low (the reference is then smaller: a stricter budget)
    assert 0.995 * measured <= reference <= measured


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["applied", "none in force"])
def test_training_after_an_evaluation_on_the_cpu_still_reaches_every_adapter(checkpoint, selection):
    """bitsandbytes repacks 4-bit weights for CPU inference when a layer runs in eval mode without gradients (an
    evaluation, generate) and keeps them so; the packed matmul has no backward, so later steps got no gradient below
    it (units="lora": the adapters of lower layers stopped training, or the step crashed)."""
    model = get_peft_model(
        _quantized(checkpoint, "nf4"), GreenTrainerConfig(units="lora", rho=1.0, r=4, target_modules=TARGETS)
    )
    if not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules()):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights here")
    batch = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.base_model.select_units([batch], optimizer)
    if selection == "none in force":  # a second stage before its first selection, or a trainable load
        model.base_model.unfreeze_candidates()
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=batch["input_ids"][:1, :5], max_new_tokens=2, do_sample=False)
    model.train()
    model(**batch).loss.backward()
    adapters = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    assert adapters and all(g is not None and bool(g.any()) for g in adapters.values())
