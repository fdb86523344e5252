"""Two end-to-end checks that would catch wrong maths anywhere between the dataset and the optimiser.

Both compute the expected numbers independently: reference log-probs from a plain `model(input_ids).logits`
forward (not the fused head the trainer uses), groups by prompt string, partition sums with Python loops.
"""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM


def _sequence_logps(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """Summed log-prob of `completion + EOS` after `prompt`, and its token count, from plain logits."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids, "test data must tokenise on a clean boundary"
    with torch.no_grad():
        logits = model(torch.tensor([full_ids], device=model.device)).logits[0].double().cpu()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # position i predicts token i + 1
    targets = torch.tensor(full_ids[1:])
    token_logps = logprobs.gather(1, targets[:, None]).squeeze(1)[len(prompt_ids) - 1 :]
    return token_logps.sum().item(), len(token_logps)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _naive_targets(rows, ref_logps, *, tau, estimator, normalization):
    """Targets of SPEC §1 with loops: z-scored rewards, per-prompt partition, global baseline for single rows."""
    rewards = rows["reward"]
    if normalization == "global":
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
        rewards = [(r - mean) / std for r in rewards]
    groups = {}
    for i, prompt in enumerate(rows["prompt"]):
        groups.setdefault(prompt, []).append(i)
    global_value = tau * (_logsumexp([r / tau for r in rewards]) - math.log(len(rewards)))
    targets = [0.0] * len(rewards)
    for members in groups.values():
        if len(members) < 2:
            log_z = global_value / tau
        elif estimator == "empirical":
            log_z = _logsumexp([ref_logps[j] + rewards[j] / tau for j in members])
        else:
            log_z = _logsumexp([rewards[j] / tau for j in members]) - math.log(len(members))
        for j in members:
            targets[j] = rewards[j] / tau - log_z
    return targets


ROWS = {
    "prompt": ["1 + 2 ="] * 3 + ["4 + 4 ="] * 4 + ["9 + 0 ="],  # the last prompt has one completion: sparse
    "completion": [" 3", " 4", " 12", " 8", " 7", " 9", " 44", " 9"],
    "reward": [1.0, 0.2, -0.5, 2.0, 0.5, 0.4, -1.5, 0.7],
}


@pytest.mark.parametrize(
    ("aggregation", "estimator", "normalization", "tau"),
    [("mean", "empirical", "global", 5.0), ("sum", "monte_carlo", "none", 0.7), ("sum", "empirical", "none", 2.0)],
)
def test_first_logged_loss_is_half_mean_squared_target(
    model_dir, tokenizer, make_args, aggregation, estimator, normalization, tau
):
    args = make_args(
        per_device_train_batch_size=len(ROWS["prompt"]),
        max_steps=1,
        beta=tau,
        logps_aggregation=aggregation,
        partition_estimator=estimator,
        reward_normalization=normalization,
    )
    from trl_rpo import RPOTrainer

    trainer = RPOTrainer(model_dir, args=args, train_dataset=Dataset.from_dict(ROWS))
    trainer.train()

    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref_logps = []
    for prompt, completion in zip(ROWS["prompt"], ROWS["completion"], strict=True):
        total, count = _sequence_logps(reference, tokenizer, prompt, completion)
        ref_logps.append(total if aggregation == "sum" else total / count)
    targets = _naive_targets(ROWS, ref_logps, tau=tau, estimator=estimator, normalization=normalization)
    # At step 0 the policy is the reference, so the residual is -t and the loss ½·mean(t²).
    expected = 0.5 * sum(t * t for t in targets) / len(targets)
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["target"] == pytest.approx(sum(targets) / len(targets), rel=1e-5, abs=1e-6)
    assert first["data/train_sparse_prompts"] == 1.0


def test_first_logged_loss_with_huber_delta_is_huber_of_the_targets(model_dir, tokenizer, make_args):
    """`huber_delta` reaches the loss: at step 0 the residual is -t, so the first loss is the mean Huber loss of the
    targets (here well below ½·mean(t²): most targets lie beyond the threshold)."""
    tau, delta = 0.35, 0.5
    args = make_args(
        per_device_train_batch_size=len(ROWS["prompt"]), max_steps=1, beta=tau, logps_aggregation="sum",
        partition_estimator="monte_carlo", reward_normalization="none", huber_delta=delta,
    )  # fmt: skip
    from trl_rpo import RPOTrainer

    trainer = RPOTrainer(model_dir, args=args, train_dataset=Dataset.from_dict(ROWS))
    trainer.train()

    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = zip(ROWS["prompt"], ROWS["completion"], strict=True)
    ref_logps = [_sequence_logps(reference, tokenizer, prompt, completion)[0] for prompt, completion in rows]
    targets = _naive_targets(ROWS, ref_logps, tau=tau, estimator="monte_carlo", normalization="none")
    huber = [0.5 * t * t if abs(t) <= delta else delta * (abs(t) - delta / 2) for t in targets]
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(sum(huber) / len(huber), rel=1e-5)
    assert first["loss"] < 0.5 * 0.5 * sum(t * t for t in targets) / len(targets)


@pytest.mark.parametrize("level_weight", [1.0, 0.1])
def test_training_converges_to_the_softmax_over_completions(model_dir, tokenizer, make_args, level_weight):
    """Empirical partition + summed log-probs: the optimum is π(y_i|x) = softmax_j(ℓ_ref,j + r_j/τ)_i, with the plain
    loss and with the level-weighted one (λ = 0.1, whole prompts per batch), whose minimum is the same."""
    rows = {
        "prompt": ["1 + 2 ="] * 3 + ["4 + 4 ="] * 3,
        "completion": [" 3", " 4", " 5", " 8", " 7", " 9"],
        "reward": [2.0, 0.0, -1.0, 1.0, 1.0, -2.0],
    }
    tau = 1.0
    args = make_args(
        per_device_train_batch_size=6,
        max_steps=250,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=50,
        gradient_checkpointing=False,
        beta=tau,
        logps_aggregation="sum",
        partition_estimator="empirical",
        reward_normalization="none",
        level_weight=level_weight,
        train_sampling_strategy="group_by_prompt",
    )
    from trl_rpo import RPOTrainer

    trainer = RPOTrainer(model_dir, args=args, train_dataset=Dataset.from_dict(rows))
    trainer.train()

    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    policy = trainer.model.eval()
    for start in (0, 3):
        members = range(start, start + 3)
        ref = [_sequence_logps(reference, tokenizer, rows["prompt"][j], rows["completion"][j])[0] for j in members]
        optimum = torch.softmax(torch.tensor([ref[k] + rows["reward"][j] / tau for k, j in enumerate(members)]), 0)
        probs = torch.tensor(
            [
                math.exp(_sequence_logps(policy, tokenizer, rows["prompt"][j], rows["completion"][j])[0])
                for j in members
            ]
        )
        total_variation = 0.5 * (probs - optimum).abs().sum().item()
        assert total_variation < 0.05, (probs, optimum)
        # and the reference itself was far from it, so the test measures learning, not luck
        assert 0.5 * (torch.tensor(ref).exp() - optimum).abs().sum().item() > 0.3
