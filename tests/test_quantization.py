"""QLoRA and 8-bit LoRA through `quantization_config`, for real, with bitsandbytes' CPU kernels: the base stays
quantized and frozen, only the adapter moves, and the reference is the base with the adapter disabled."""

import math

import pytest
import torch
from peft import LoraConfig
from transformers import BitsAndBytesConfig

from trl_rpo import RPOTrainer


QUANTIZATIONS = {
    "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
@pytest.mark.parametrize(("model_fixture", "task_type", "targets"), [
    ("model_dir", "CAUSAL_LM", ["q_proj", "v_proj"]),
    ("t5_dir", "SEQ_2_SEQ_LM", ["q", "v"]),
])  # fmt: skip
def test_quantized_lora_trains_only_the_adapter(
    request, make_args, reward_dataset, bits, model_fixture, task_type, targets
):
    model_path = request.getfixturevalue(model_fixture)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type)
    trainer = RPOTrainer(
        model_path,
        args=make_args(max_steps=2, learning_rate=1e-2),
        train_dataset=reward_dataset,
        quantization_config=QUANTIZATIONS[bits],
        peft_config=peft_config,
    )
    base = trainer.model.get_base_model()
    assert getattr(base, f"is_loaded_in_{bits}")
    assert trainer.ref_model is None  # π_ref = the quantized base with the adapter disabled, no second copy
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert moved, "nothing trained"
    assert all("lora_" in n for n in moved), moved
    first = trainer.state.log_history[0]
    assert math.isfinite(first["loss"])
    # step 1: the adapter starts at zero (LoRA's B = 0), so policy and reference agree
    assert first["logps/policy"] == pytest.approx(first["logps/ref"], abs=1e-3)


def test_quantization_through_model_init_kwargs(model_dir, make_args, reward_dataset):
    """`model_init_kwargs={"quantization_config": ...}` (as a YAML recipe may set it) works the same way."""
    args = make_args(
        max_steps=1, model_init_kwargs={"quantization_config": QUANTIZATIONS["4bit"]}, cache_ref_log_probs=True
    )
    peft_config = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    trainer = RPOTrainer(model_dir, args=args, train_dataset=reward_dataset, peft_config=peft_config)
    assert trainer.model.get_base_model().is_loaded_in_4bit
    assert trainer.target_pass_log["train"]["cache"] == "miss"  # the cache key digests the packed 4-bit weights
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
