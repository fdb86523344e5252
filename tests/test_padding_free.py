"""`padding_free=True`: the rows of a micro-batch laid end to end in one sequence give the padded path's per-row
log-probs, targets, losses and gradients, and configurations that cannot keep the rows apart are refused."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests.conftest import conversational
from trl_rpo import DROConfig, RPOTrainer
from trl_rpo.data import DataCollatorForRewardedCompletions, pack_rows


def mixed_length_rows() -> dict[str, list]:
    """Prompts of 1 to 9 words and completions of 1 to 12, several per prompt, with distinct rewards."""
    rows = {"prompt": [], "completion": [], "reward": []}
    for p in range(6):
        for c in range(3):
            rows["prompt"].append(" ".join(["what", "is"] + [str(p)] * (1 + (p * 3) % 8)) + " ?")
            rows["completion"].append(" ".join(["it", "is"] + [str(p + c)] * (1 + (p * 5 + c * 4) % 11)))
            rows["reward"].append(float((p + 2 * c) % 5))
    return rows


def test_pack_rows_lays_the_padded_rows_end_to_end():
    collator = DataCollatorForRewardedCompletions(
        pad_token_id=0, max_length=5, value_columns={"target": torch.float32}
    )
    rows = [
        {"prompt_ids": [1, 2], "completion_ids": [3, 4, 5, 6], "target": 0.5},  # cut at 5 tokens
        {"prompt_ids": [7], "completion_ids": [8], "target": -1.0},
        {"prompt_ids": [9, 10, 11], "completion_ids": [12], "target": 2.0},
    ]
    packed = pack_rows(collator(rows))
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]]
    assert packed["completion_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3]]
    assert packed["row_lengths"].tolist() == [5, 2, 4]
    assert packed["target"].tolist() == [0.5, -1.0, 2.0]
    assert "attention_mask" not in packed
    # The collator's own padding-free output, per row (training) and from Arrow columns (target pass), is the same.
    free = DataCollatorForRewardedCompletions(pad_token_id=0, max_length=5, padding_free=True)
    for batch in (free(rows), free.collate_arrow(*_arrow_columns(rows))):
        for key in ("input_ids", "completion_mask", "position_ids", "row_lengths"):
            torch.testing.assert_close(batch[key], packed[key])


def _arrow_columns(rows):
    import pyarrow as pa

    return pa.array([r["prompt_ids"] for r in rows]), pa.array([r["completion_ids"] for r in rows])


def _trainer(model_dir, make_args, dataset, padding_free, attention="sdpa", max_length=24, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)
    args = make_args(padding_free=padding_free, beta=0.5, logps_aggregation="sum", max_length=max_length, **kwargs)
    return RPOTrainer(
        model, args=args, train_dataset=dataset, peft_config=LoraConfig(r=4, target_modules="all-linear")
    )


def _lift_adapter(trainer):
    """Move the LoRA B matrices off zero (the same way on every trainer), so the policy differs from the reference."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_padding_free_equals_padded(model_dir, make_args, attention, chat):
    """Reference log-probs, targets, then on one mixed batch each row's policy log-prob, the loss and every LoRA
    gradient: equal with and without padding (rows truncated at `max_length` included)."""
    rows = mixed_length_rows()
    dataset = Dataset.from_dict(conversational(rows) if chat else rows)
    max_length = 40 if chat else 24  # the chat template adds 15 tokens to each row
    padded, free = (_trainer(model_dir, make_args, dataset, flag, attention, max_length) for flag in (False, True))
    lengths = padded.train_dataset["length"]
    assert len(lengths) == len(rows["prompt"])
    assert max(lengths) == max_length  # some rows cut at max_length
    assert max(lengths) - min(lengths) >= 8  # and mixed lengths
    table = free.train_dataset.select_columns(["prompt_ids", "completion_ids"]).with_format("arrow")[:4]
    assert "row_lengths" in free.target_pass._collate(table)  # the target pass packs its batches too
    assert "row_lengths" not in padded.target_pass._collate(table)
    for column in ("ref_logps", "target"):
        torch.testing.assert_close(free.train_dataset[column], padded.train_dataset[column], rtol=1e-5, atol=1e-5)
    examples = [padded.train_dataset[i] for i in (0, 5, 9, 16, 17)]
    results = []
    for trainer in (padded, free):
        _lift_adapter(trainer)
        trainer.model.train()
        batch = trainer.data_collator(examples)
        assert ("row_lengths" in batch) == (trainer is free)
        sum_logps, num_tokens, entropy, _ = trainer._completion_logps(trainer.model, batch, with_entropy=True)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((sum_logps.detach(), num_tokens, entropy, loss.detach(), grads))
    (p_logps, p_tokens, p_entropy, p_loss, p_grads), (f_logps, f_tokens, f_entropy, f_loss, f_grads) = results
    assert len(f_logps) == len(examples)
    torch.testing.assert_close(f_logps, p_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_tokens, p_tokens)
    torch.testing.assert_close(f_entropy, p_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_loss, p_loss, rtol=1e-5, atol=1e-6)
    assert p_grads.keys() == f_grads.keys()
    for name, grad in p_grads.items():
        scale = grad.abs().max().item()  # fp32 sums in another order: 1e-4 of the tensor's own scale
        assert scale > 0, name
        message = lambda text, name=name: f"{name}: {text}"  # noqa: E731
        torch.testing.assert_close(f_grads[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=message)


def test_padding_free_trains_like_padded(model_dir, make_args):
    """Three optimizer steps on the same batches: the same logged losses and token counts, the same adapter (plain
    SGD, whose steps are linear in the gradients: Adam's first steps turn rounding noise in near-zero gradients into
    ±lr)."""
    dataset = Dataset.from_dict(mixed_length_rows())
    trained = []
    for flag in (False, True):
        trainer = _trainer(model_dir, make_args, dataset, flag, learning_rate=0.5, optim="sgd")
        trainer.train()
        losses = [(e["loss"], e["num_tokens"]) for e in trainer.state.log_history if "loss" in e]
        adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        trained.append((losses, adapter))
    (padded_losses, padded_adapter), (free_losses, free_adapter) = trained
    assert len(free_losses) == 3
    for (free_loss, free_tokens), (padded_loss, padded_tokens) in zip(free_losses, padded_losses, strict=True):
        assert free_loss == pytest.approx(padded_loss, rel=1e-4)
        assert free_tokens == padded_tokens  # non-pad tokens either way
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in free_adapter.items() if "lora_B" in n)
    for name, param in padded_adapter.items():
        torch.testing.assert_close(free_adapter[name], param, rtol=1e-3, atol=1e-5, msg=name)


def test_untrained_ranking_accuracy_is_one_half_either_way(model_dir, make_args):
    """The adapter has not moved, so every log-ratio is 0 up to float noise that differs between the layouts: the
    ranking accuracy is a tie everywhere, ½ in both (it was 0 padded and 0.33 padding-free when a tie counted as
    wrong); once the adapter moves, both layouts give the same non-tied value."""
    dataset = Dataset.from_dict(mixed_length_rows())
    untrained, lifted = [], []
    for flag in (False, True):
        trainer = _trainer(model_dir, make_args, dataset, flag, keep_ref_model=True)
        untrained.append(trainer.evaluate(dataset)["eval_rewards/accuracies"])
        _lift_adapter(trainer)
        lifted.append(trainer.evaluate(dataset)["eval_rewards/accuracies"])
    assert untrained == [0.5, 0.5]
    assert lifted[0] == lifted[1] != 0.5


def test_rows_of_one_sequence_do_not_see_each_other(model_dir, make_args):
    """The equality above would fail if attention crossed rows: here a packed forward without position ids (one
    long causal sequence) gives other log-probs for every row but the first."""
    trainer = _trainer(model_dir, make_args, Dataset.from_dict(mixed_length_rows()), True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 5, 9)])
    isolated, _, _, _ = trainer._completion_logps(trainer.model, batch)
    leaking = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    mixed, _, _, _ = trainer._completion_logps(trainer.model, leaking)
    torch.testing.assert_close(mixed[0], isolated[0], rtol=1e-5, atol=1e-5)
    assert (mixed[1:] - isolated[1:]).abs().min() > 1e-3


def test_padding_free_refusals(model_dir, t5_dir, make_args, reward_dataset):
    with pytest.raises(ValueError, match="needs a causal model"):
        RPOTrainer(t5_dir, args=make_args(padding_free=True), train_dataset=reward_dataset)
    with pytest.raises(ValueError, match="data_collator"):
        RPOTrainer(
            model_dir,
            args=make_args(padding_free=True),
            train_dataset=reward_dataset,
            data_collator=DataCollatorForRewardedCompletions(pad_token_id=0),
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config._attn_implementation = "my_kernel"  # an attention nobody told about packed rows
    with pytest.raises(ValueError, match="attention implementation that keeps packed rows apart.*'my_kernel'"):
        RPOTrainer(model, args=make_args(padding_free=True), train_dataset=reward_dataset)
    prompt_tuned = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    )
    with pytest.raises(ValueError, match="prompt-learning PEFT"):
        RPOTrainer(prompt_tuned, args=make_args(padding_free=True), train_dataset=reward_dataset)
    with pytest.raises(ValueError, match="not supported by DROConfig"):
        make_args(DROConfig, padding_free=True)


def test_target_pass_scores_longest_rows_first_and_puts_each_back(model_dir, make_args, monkeypatch):
    """Padded target-pass batches take rows longest first (little padding); each value still lands on its own row:
    equal to scoring the rows one at a time, in the dataset's order."""
    dataset = Dataset.from_dict(mixed_length_rows())
    widths = []
    real = RPOTrainer._completion_logps

    def spy(self, model, batch, with_entropy=False):
        widths.append(batch["input_ids"].shape[1])
        return real(self, model, batch, with_entropy)

    monkeypatch.setattr(RPOTrainer, "_completion_logps", spy)
    batched = _trainer(model_dir, make_args, dataset, False, per_device_train_batch_size=4)
    assert widths == sorted(widths, reverse=True)  # longest batch first
    assert len(set(widths)) > 2
    one_by_one = _trainer(model_dir, make_args, dataset, False, per_device_train_batch_size=1)
    torch.testing.assert_close(batched.train_dataset["ref_logps"], one_by_one.train_dataset["ref_logps"])
    lengths = batched.train_dataset["length"]
    assert lengths != sorted(lengths, reverse=True)  # the rows themselves keep their order
