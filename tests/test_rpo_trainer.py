"""RPOTrainer on a tiny offline Llama: what TRL tests for KTOTrainer, plus two end-to-end checks of the maths."""

import math
from collections import defaultdict

import pytest
import torch
from conftest import assert_only_adapter_moved, capture_target_passes, conversational, reward_rows
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from trl_rpo import RPOTrainer
from trl_rpo.data import DataCollatorForRewardedCompletions


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_all_changed(before: dict, model) -> None:
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(before[name], param), f"{name} did not change"


def test_train_full_finetune_changes_every_parameter(model_dir, make_args, reward_dataset):
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset)
    assert trainer.ref_model is None  # the initial policy served the target pass; no copy is kept
    before = _snapshot(trainer.model)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    _assert_all_changed(before, trainer.model)


def test_lora_moves_only_the_adapter(model_dir, make_args, reward_dataset):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset, peft_config=peft_config)
    assert trainer.ref_model is None  # the reference is the base model with the adapter disabled
    before = _snapshot(trainer.model)
    trainer.train()
    assert_only_adapter_moved(before, trainer.model)


def test_explicit_ref_model_is_used_and_stays_unchanged(model_dir, make_args, reward_dataset):
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # a reference different from the policy, so using it shows in the stored log-probs
        for p in ref_model.parameters():
            p.mul_(0.5)
    before = _snapshot(ref_model)
    trainer = RPOTrainer(model_dir, ref_model=ref_model, args=make_args(), train_dataset=reward_dataset)
    trainer.train()
    for name, param in ref_model.named_parameters():  # on CPU: the trainer moved the reference to the device
        torch.testing.assert_close(before[name], param.detach().cpu(), rtol=0, atol=0)
    logs = trainer.state.log_history[0]
    assert logs["logps/ref"] != pytest.approx(logs["logps/policy"], abs=1e-3)


def test_conversational_data_uses_the_chat_template(model_dir, make_args, tokenizer):
    dataset = Dataset.from_dict(conversational(reward_rows()))
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=dataset)
    row = trainer.train_dataset[0]
    assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(row["completion_ids"]) == "0<|im_end|>\n"
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_groups_are_tokenised_prompts(model_dir, make_args, reward_dataset):
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset)
    keys = defaultdict(set)
    for prompt, key in zip(
        list(trainer.train_dataset["prompt"]), list(trainer.train_dataset["group_key"]), strict=True
    ):
        keys[prompt].add(key)
    assert len(keys) == 4
    assert all(len(k) == 1 for k in keys.values())
    assert len({k for ks in keys.values() for k in ks}) == 4


def test_kto_label_format(model_dir, make_args):
    rows = reward_rows()
    dataset = Dataset.from_dict(
        {"prompt": rows["prompt"], "completion": rows["completion"], "label": [r > 0 for r in rows["reward"]]}
    )
    trainer = RPOTrainer(model_dir, args=make_args(reward_normalization="none"), train_dataset=dataset)
    assert list(trainer.train_dataset["reward"]) == [1.0 if r > 0 else 0.0 for r in rows["reward"]]
    trainer.train()


@pytest.mark.parametrize("with_scores", [True, False])
def test_paired_format_gives_two_rows_per_pair(model_dir, make_args, with_scores):
    pairs = {"prompt": ["1 + 1 =", "2 + 2 ="], "chosen": [" 2", " 4"], "rejected": [" 3", " 5"]}
    if with_scores:
        pairs |= {"score_chosen": [9.0, 7.0], "score_rejected": [2.0, 6.5]}
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=Dataset.from_dict(pairs))
    data = trainer.train_dataset
    assert len(data) == 4
    expected = [9.0, 2.0, 7.0, 6.5] if with_scores else [1.0, 0.0, 1.0, 0.0]
    assert list(data["reward"]) == expected  # each pair gives two consecutive rows, chosen then rejected
    assert list(data["completion"]) == [" 2<|im_end|>", " 3<|im_end|>", " 4<|im_end|>", " 5<|im_end|>"]
    assert list(data["source_row"]) == [0, 0, 1, 1]  # errors and counts name the user's pair
    trainer.train()


def test_implicit_prompt_paired_conversations(model_dir, make_args):
    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    pairs = {"chosen": [conv("1+1?", "2"), conv("2+2?", "4")], "rejected": [conv("1+1?", "3"), conv("2+2?", "5")]}
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=Dataset.from_dict(pairs))
    assert trainer.train_dataset[0]["prompt"] == [{"role": "user", "content": "1+1?"}]
    assert len(set(trainer.train_dataset["group_key"])) == 2


def test_eval_and_several_eval_datasets(model_dir, make_args, reward_dataset):
    args = make_args(eval_strategy="steps", eval_steps=2)
    eval_sets = {"data1": reward_dataset, "data2": Dataset.from_dict(reward_rows(num_prompts=2))}
    trainer = RPOTrainer(model_dir, args=args, train_dataset=reward_dataset, eval_dataset=eval_sets)
    trainer.train()
    keys = set().union(*trainer.state.log_history)
    assert {"eval_data1_loss", "eval_data2_loss", "eval_data1_rewards/accuracies", "eval_data2_residual_rms"} <= keys


def test_eval_split_reuses_train_reward_statistics(model_dir, make_args, reward_dataset):
    doubled = reward_rows()
    doubled["reward"] = [2 * r for r in doubled["reward"]]
    args = make_args(partition_estimator="monte_carlo")
    trainer = RPOTrainer(model_dir, args=args, train_dataset=reward_dataset, eval_dataset=Dataset.from_dict(doubled))
    # z-scored with the *train* mean m and std s, the eval rewards are z = (2r - m)/s, twice as spread as the train
    # ones. Monte-Carlo targets ignore the per-prompt shift: t = z/τ - logsumexp(z/τ) + log n.
    r = torch.tensor(list(reward_dataset["reward"]), dtype=torch.float64)
    m, s = r.mean(), r.std(unbiased=False)
    z = ((2 * r - m) / s).view(4, 3) / args.beta
    expected = z - torch.logsumexp(z, dim=1, keepdim=True) + math.log(3)
    torch.testing.assert_close(
        torch.tensor(list(trainer.eval_dataset["target"]), dtype=torch.float64).view(4, 3), expected, rtol=0, atol=1e-9
    )
    # Had the eval split been z-scored with its own statistics, its targets would equal the train ones.
    assert not torch.allclose(
        torch.tensor(list(trainer.eval_dataset["target"])), torch.tensor(list(trainer.train_dataset["target"]))
    )


@pytest.mark.parametrize("gradient_checkpointing", [True, False])
def test_gradient_checkpointing(model_dir, make_args, reward_dataset, gradient_checkpointing):
    args = make_args(gradient_checkpointing=gradient_checkpointing)
    trainer = RPOTrainer(model_dir, args=args, train_dataset=reward_dataset)
    before = _snapshot(trainer.model)
    trainer.train()
    _assert_all_changed(before, trainer.model)


def test_batch_size_one_and_random_sampling(model_dir, make_args, reward_dataset):
    # KTO needs batches > 1 and a sequential sampler for its KL term; RPO's targets are per row, so neither applies.
    args = make_args(per_device_train_batch_size=1, train_sampling_strategy="random")
    trainer = RPOTrainer(model_dir, args=args, train_dataset=reward_dataset)
    assert "KL_completion_ids" not in trainer.train_dataset.column_names
    trainer.train()


def test_evaluate_on_a_raw_dataset(model_dir, make_args, reward_dataset):
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset)
    metrics = trainer.evaluate(Dataset.from_dict(reward_rows(num_prompts=2)))
    assert math.isfinite(metrics["eval_loss"])
    metrics = trainer.evaluate({"a": reward_dataset, "b": Dataset.from_dict(reward_rows(num_prompts=2))})
    assert {"eval_a_loss", "eval_b_loss"} <= metrics.keys()
    trainer.train()
    with pytest.raises(ValueError, match="after training started"):
        trainer.evaluate(reward_dataset)


def test_evaluate_new_split_after_lora_training_uses_the_base_model(model_dir, make_args, reward_dataset, monkeypatch):
    """A split first seen after training is scored by the base with the adapter disabled, not by the trained policy."""
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset, peft_config=peft_config)
    trainer.train()
    seen = capture_target_passes(trainer, monkeypatch)
    new_split = Dataset.from_dict(reward_rows(num_prompts=6, completions_per_prompt=2))
    metrics = trainer.evaluate({"held_out": new_split})
    assert trainer.target_pass_log["held_out"]["rows_scored_here"] == 12  # its reference pass ran
    base = RPOTrainer(model_dir, args=make_args(), train_dataset=new_split)  # the bare base model, no adapter
    torch.testing.assert_close(
        torch.tensor(list(seen["held_out"]["ref_logps"])), torch.tensor(list(base.train_dataset["ref_logps"]))
    )
    assert abs(metrics["eval_held_out_log_ratio"]) > 1e-4  # the adapter did move: the policy is not the reference


SPEC_METRICS = {
    "loss", "logps/policy", "logps/ref", "log_ratio", "target", "residual_rms", "value", "rewards/implicit",
    "rewards/accuracies", "kl", "entropy", "num_tokens",
}  # fmt: skip


def test_logged_metrics(model_dir, make_args):
    # One batch of 12 rows holds every prompt's 3 completions, so within-prompt pairs exist in each step.
    args = make_args(per_device_train_batch_size=12, eval_strategy="steps", eval_steps=1, max_steps=1)
    data = Dataset.from_dict(reward_rows())
    trainer = RPOTrainer(model_dir, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    train_log, eval_log = trainer.state.log_history[0], trainer.state.log_history[1]
    assert SPEC_METRICS <= train_log.keys()
    assert {f"eval_{k}" for k in SPEC_METRICS - {"loss"}} | {"eval_loss"} <= eval_log.keys()
    assert {
        "data/train_sparse_prompts",
        "data/train_sparse_rows",
        "data/train_rows_dropped_max_length",
    } <= train_log.keys()
    assert train_log["kl"] == train_log["log_ratio"] == 0.0  # policy = reference at the first step
    assert train_log["rewards/implicit"] == pytest.approx(args.beta * train_log["log_ratio"])
    assert train_log["residual_rms"] == pytest.approx(math.sqrt(2 * train_log["loss"]), rel=1e-5)
    assert train_log["num_tokens"] == sum(
        len(r["prompt_ids"]) + len(r["completion_ids"]) for r in trainer.train_dataset
    )


def test_model_card_and_tags(model_dir, make_args, reward_dataset, tmp_path):
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset)
    assert {"trl", "rpo", "trl-rpo"} <= set(trainer.model.model_tags)
    trainer.create_model_card(model_name="tiny-rpo")
    card = (tmp_path / "out" / "README.md").read_text()
    for expected in ("RPO", "2506.13702", "faye2025rpo", "trl-rpo"):
        assert expected in card


def test_collator_pads_right_and_truncates_before_padding():
    value_columns = {"target": torch.float32, "group_key": torch.int64}
    collator = DataCollatorForRewardedCompletions(pad_token_id=0, max_length=4, value_columns=value_columns)
    batch = collator(
        [
            {"prompt_ids": [1, 2], "completion_ids": [3, 4, 5], "target": 0.5, "group_key": 7},
            {"prompt_ids": [6], "completion_ids": [8], "target": -1.0, "group_key": 9},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [6, 8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert batch["target"].tolist() == [0.5, -1.0]
    assert batch["group_key"].dtype == torch.int64


@pytest.mark.parametrize("is_encoder_decoder", [False, True])
@pytest.mark.parametrize(("max_length", "multiple"), [(None, None), (5, None), (7, 4)])
def test_arrow_collation_equals_the_row_collator(is_encoder_decoder, max_length, multiple):
    """The target pass collates Arrow batches without a Python loop over rows: the same tensors as `torch_call`."""
    import pyarrow as pa

    gen = torch.Generator().manual_seed(0)
    lengths = torch.stack([torch.randint(1, 6, (9,), generator=gen), torch.randint(1, 8, (9,), generator=gen)], 1)
    rows = [
        {"prompt_ids": torch.randint(3, 50, (int(p),), generator=gen).tolist(),
         "completion_ids": torch.randint(3, 50, (int(c),), generator=gen).tolist()}
        for p, c in lengths
    ]  # fmt: skip
    collator = DataCollatorForRewardedCompletions(
        pad_token_id=0, max_length=max_length, pad_to_multiple_of=multiple, is_encoder_decoder=is_encoder_decoder
    )
    table = pa.Table.from_pylist(rows)
    expected = collator(rows)
    got = collator.collate_arrow(table.column("prompt_ids"), table.column("completion_ids"))
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_peft_model_instance_trains_against_a_frozen_copy_of_its_adapter(model_dir, make_args, reward_dataset):
    from peft import get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    trainer = RPOTrainer(model, args=make_args(), train_dataset=reward_dataset)
    assert "ref" in trainer.model.peft_config  # KTOTrainer's frozen "ref" adapter serves as π_ref
    ref_before = {n: p.clone() for n, p in trainer.model.named_parameters() if ".ref." in n}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if ".ref." in name:
            torch.testing.assert_close(ref_before[name], param, rtol=0, atol=0)
    # the stored reference log-probs are the adapted model's, not the bare base model's
    first = trainer.state.log_history[0]
    assert first["logps/ref"] == pytest.approx(first["logps/policy"], abs=1e-5)


def test_resume_from_checkpoint_reproduces_the_loss_curve(model_dir, make_args, reward_dataset, tmp_path):
    common = {"max_steps": 6, "learning_rate": 1e-2, "save_strategy": "steps", "save_steps": 3, "seed": 3}
    full = RPOTrainer(model_dir, args=make_args(**common), train_dataset=reward_dataset)
    full.train()
    full_losses = [log["loss"] for log in full.state.log_history if "loss" in log]

    args = make_args(**common, output_dir=str(tmp_path / "resumed"))
    resumed = RPOTrainer(model_dir, args=args, train_dataset=reward_dataset)
    assert list(resumed.train_dataset["target"]) == list(full.train_dataset["target"])
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    # the history holds steps 1-3 from the checkpoint, then the steps trained after resuming
    resumed_losses = {log["step"]: log["loss"] for log in resumed.state.log_history if "loss" in log}
    assert [resumed_losses[step] for step in (4, 5, 6)] == pytest.approx(full_losses[3:], rel=1e-5)


def test_gradient_accumulation_gives_the_same_first_update(model_dir, make_args, reward_dataset):
    """Per-device batch 4 × accumulation 1 and 2 × 2 see the same 4 rows and must take the same first step."""
    updated = []
    for batch, accumulation in [(4, 1), (2, 2)]:
        args = make_args(
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=1e-3,
            train_sampling_strategy="sequential",
            optim="sgd",  # linear in the gradient, so a wrong scaling would show
        )
        trainer = RPOTrainer(model_dir, args=args, train_dataset=reward_dataset)
        trainer.train()
        updated.append({n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()})
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    for name, param in base.named_parameters():
        step_a, step_b = updated[0][name] - param, updated[1][name] - param
        assert step_a.abs().max() > 0, name
        torch.testing.assert_close(step_a, step_b, rtol=1e-4, atol=1e-7)


def _halved(model_dir):
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.mul_(0.5)
    return ref_model


def test_explicit_ref_model_is_released_after_the_target_pass(model_dir, make_args, reward_dataset, monkeypatch):
    import gc
    import weakref

    ref_model = _halved(model_dir)
    alive = weakref.ref(ref_model)
    trainer = RPOTrainer(model_dir, ref_model=ref_model, args=make_args(), train_dataset=reward_dataset)
    del ref_model
    gc.collect()
    assert trainer.ref_model is None
    assert alive() is None  # nothing (the trainer, its accelerator) holds the reference any more: its memory is free
    with pytest.raises(ValueError, match="released after the target pass.*keep_ref_model=True"):
        trainer.evaluate(Dataset.from_dict(reward_rows(num_prompts=2)))
    kept = RPOTrainer(
        model_dir, ref_model=_halved(model_dir), args=make_args(keep_ref_model=True), train_dataset=reward_dataset
    )
    assert kept.ref_model is not None
    seen = capture_target_passes(kept, monkeypatch)
    kept.evaluate(reward_dataset)
    # the new split is scored by the kept reference: the same values as the training split's, row for row
    assert list(seen["eval"]["ref_logps"]) == pytest.approx(list(kept.train_dataset["ref_logps"]), abs=1e-6)


def test_eval_accuracy_ranks_every_pair_of_the_split(model_dir, make_args, reward_dataset):
    """With an eval batch of one row, no pair shares a batch; the metric still ranks every within-prompt pair with
    different rewards (2 per prompt here: the two near misses tie), so it moves in steps of 1/16 (a tie counts ½),
    and equals the value of a single batch holding the whole split."""
    accuracies = []
    for batch_size in (12, 1):
        args = make_args(per_device_eval_batch_size=batch_size, keep_ref_model=True)
        trainer = RPOTrainer(model_dir, ref_model=_halved(model_dir), args=args, train_dataset=reward_dataset)
        accuracies.append(trainer.evaluate(reward_dataset)["eval_rewards/accuracies"])  # absent if no pair is seen
    assert accuracies[1] == accuracies[0]
    assert (16 * accuracies[0]) == pytest.approx(round(16 * accuracies[0]))
    assert 0 < accuracies[0] < 1  # a reference unlike the policy orders some pairs right and some wrong
