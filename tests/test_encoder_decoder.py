"""Encoder-decoder policies (Flan-T5, the paper's models) on a tiny offline T5: the prompt feeds the encoder, the
completion plus EOS is the decoder's target, and log-probs cover exactly those tokens."""

import math

import pytest
import torch
from conftest import assert_only_adapter_moved, capture_target_passes, conversational, reward_rows
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from trl_rpo import RPOTrainer


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _naive_logps(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """Summed log-prob of the completion tokens (EOS included) with plain logits, and their count."""
    prompt_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    labels = torch.tensor([tokenizer(completion)["input_ids"]])
    assert labels[0, -1].item() == tokenizer.eos_token_id
    with torch.no_grad():
        logits = model(input_ids=prompt_ids.to(model.device), labels=labels.to(model.device)).logits[0].double().cpu()
    token_logps = torch.log_softmax(logits, -1).gather(1, labels[0][:, None]).squeeze(1)
    return token_logps.sum().item(), labels.size(1)


def test_full_finetune_trains_every_parameter_and_logs(t5_dir, make_args, reward_dataset):
    trainer = RPOTrainer(t5_dir, args=make_args(eval_strategy="steps", eval_steps=3), train_dataset=reward_dataset,
                         eval_dataset=reward_dataset)  # fmt: skip
    assert trainer.is_encoder_decoder
    assert trainer.ref_model is None
    before = _snapshot(trainer.model)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(before[name], param), name
    logs = trainer.state.log_history
    assert {"loss", "logps/policy", "entropy", "residual_rms"} <= logs[0].keys()
    assert math.isfinite(next(log["eval_loss"] for log in logs if "eval_loss" in log))


def test_stored_reference_logps_cover_exactly_the_completion_tokens(t5_dir, make_args, reward_dataset):
    trainer = RPOTrainer(t5_dir, args=make_args(logps_aggregation="sum"), train_dataset=reward_dataset)
    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval()
    for row in trainer.train_dataset.select(range(5)):
        assert row["completion_ids"] == tokenizer(row["completion"])["input_ids"]  # EOS included once
        expected, _ = _naive_logps(model, tokenizer, row["prompt"], row["completion"])
        assert row["ref_logps"] == pytest.approx(expected, rel=1e-5)


def test_lora_moves_only_the_adapter(t5_dir, make_args, reward_dataset, monkeypatch):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    trainer = RPOTrainer(t5_dir, args=make_args(), train_dataset=reward_dataset, peft_config=peft_config)
    before = _snapshot(trainer.model)
    trainer.train()
    assert_only_adapter_moved(before, trainer.model)
    # A split first seen after training is scored with the adapter disabled: the bare base model's log-probs.
    seen = capture_target_passes(trainer, monkeypatch)
    new_split = Dataset.from_dict(reward_rows(num_prompts=5, completions_per_prompt=2))
    metrics = trainer.evaluate({"held_out": new_split})
    base = RPOTrainer(t5_dir, args=make_args(), train_dataset=new_split)
    torch.testing.assert_close(
        torch.tensor(list(seen["held_out"]["ref_logps"])), torch.tensor(list(base.train_dataset["ref_logps"]))
    )
    assert abs(metrics["eval_held_out_log_ratio"]) > 1e-4  # and the policy that trained is not that reference


def test_explicit_reference_stays_unchanged(t5_dir, make_args, reward_dataset):
    ref_model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    before = _snapshot(ref_model)
    trainer = RPOTrainer(t5_dir, ref_model=ref_model, args=make_args(), train_dataset=reward_dataset)
    trainer.train()
    for name, param in ref_model.named_parameters():  # on CPU: the trainer moved the reference to the device
        torch.testing.assert_close(before[name], param.detach().cpu(), rtol=0, atol=0)


def test_conversational_prompts_need_a_chat_template(t5_dir, make_args):
    dataset = Dataset.from_dict(conversational(reward_rows()))
    with pytest.raises(ValueError, match="no chat template"):
        RPOTrainer(t5_dir, args=make_args(), train_dataset=dataset)
    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    trainer = RPOTrainer(t5_dir, args=make_args(), train_dataset=dataset, processing_class=tokenizer)
    row = trainer.train_dataset[0]
    assert tokenizer.decode(row["prompt_ids"]) == "user: 0 + 1 =\n"
    assert tokenizer.decode(row["completion_ids"]) == "0</s>"
    trainer.train()


@pytest.mark.parametrize(("aggregation", "tau"), [("mean", 5.0), ("sum", 1.0)])
def test_first_logged_loss_is_half_mean_squared_target(t5_dir, make_args, aggregation, tau):
    rows = reward_rows(num_prompts=3)
    args = make_args(per_device_train_batch_size=9, max_steps=1, beta=tau, logps_aggregation=aggregation)
    trainer = RPOTrainer(t5_dir, args=args, train_dataset=Dataset.from_dict(rows))
    trainer.train()
    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval()
    ref = []
    for prompt, completion in zip(rows["prompt"], rows["completion"], strict=True):
        total, count = _naive_logps(model, tokenizer, prompt, completion)
        ref.append(total if aggregation == "sum" else total / count)
    r = torch.tensor(rows["reward"], dtype=torch.float64)
    z = ((r - r.mean()) / r.std(unbiased=False)).view(3, 3) / tau  # global z-score, then r/τ
    log_z = torch.logsumexp(torch.tensor(ref, dtype=torch.float64).view(3, 3) + z, dim=1, keepdim=True)
    targets = z - log_z
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.5 * targets.pow(2).mean().item(), rel=1e-5)


def test_training_converges_to_the_softmax_over_completions(t5_dir, make_args):
    rows = {
        "prompt": ["1 + 2 ="] * 3 + ["4 + 4 ="] * 3,
        "completion": [" 3", " 4", " 5", " 8", " 7", " 9"],
        "reward": [2.0, 0.0, -1.0, 1.0, 1.0, -2.0],
    }
    args = make_args(
        per_device_train_batch_size=6, max_steps=250, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=50, gradient_checkpointing=False, beta=1.0, logps_aggregation="sum",
        reward_normalization="none",
    )  # fmt: skip
    trainer = RPOTrainer(t5_dir, args=args, train_dataset=Dataset.from_dict(rows))
    trainer.train()
    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    reference = AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval()
    policy = trainer.model.eval()
    for start in (0, 3):
        members = range(start, start + 3)
        ref = torch.tensor(
            [_naive_logps(reference, tokenizer, rows["prompt"][j], rows["completion"][j])[0] for j in members]
        )
        optimum = torch.softmax(ref + torch.tensor([rows["reward"][j] for j in members], dtype=ref.dtype), 0)
        probs = torch.tensor(
            [math.exp(_naive_logps(policy, tokenizer, rows["prompt"][j], rows["completion"][j])[0]) for j in members]
        )
        assert 0.5 * (probs - optimum).abs().sum().item() < 0.05, (probs, optimum)
        assert 0.5 * (ref.exp() - optimum).abs().sum().item() > 0.3
