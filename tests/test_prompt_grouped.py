"""The level options in the trainer: `train_sampling_strategy="group_by_prompt"` (whole prompts per batch), the
level-weighted loss, the partition temperature and empirical-Bayes shrinkage as `RPOConfig` options (stored targets,
logged credibility, eval splits, refusals)."""

import logging
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import HfArgumentParser

from tests.conftest import reward_rows
from trl_rpo import RPOConfig, RPOTrainer
from trl_rpo.data import PromptGroupedSampler
from trl_rpo.losses import normalize_rewards, rpo_loss, rpo_targets, target_level_split


def test_sampler_keeps_each_prompt_together_in_a_random_order():
    keys = np.repeat(np.array([50, -3, 7, 12, 9]), [4, 4, 4, 4, 4])[np.random.default_rng(0).permutation(20)]
    sampler = PromptGroupedSampler(keys, generator=torch.Generator().manual_seed(0))
    first, second = sampler.indices().tolist(), sampler.indices().tolist()
    for order in (first, second):
        assert sorted(order) == list(range(20))  # every row once
        runs = [keys[order[i : i + 4]] for i in range(0, 20, 4)]
        assert all(len(set(run)) == 1 for run in runs)  # batches of 4 hold one whole prompt each
    assert first != second  # a new order each pass
    again = PromptGroupedSampler(keys, generator=torch.Generator().manual_seed(0)).indices().tolist()
    assert again == first  # reproducible from the seed
    orders = {tuple(keys[PromptGroupedSampler(keys).indices()[::4]]) for _ in range(20)}
    assert len(orders) > 5  # prompts are shuffled, not sorted


def test_sampler_at_a_million_rows():
    keys = np.random.default_rng(1).integers(0, 200_000, size=1_000_000)
    order = PromptGroupedSampler(keys).indices().numpy()
    assert np.array_equal(np.sort(order), np.arange(len(keys)))
    changes = np.count_nonzero(np.diff(keys[order]))
    assert changes == len(np.unique(keys)) - 1  # each prompt's rows form one run


def test_the_trainer_batches_whole_prompts(model_dir, make_args, monkeypatch):
    dataset = Dataset.from_dict(reward_rows(num_prompts=6, completions_per_prompt=3))
    args = make_args(train_sampling_strategy="group_by_prompt", per_device_train_batch_size=6, max_steps=3)
    trainer = RPOTrainer(model_dir, args=args, train_dataset=dataset)
    assert isinstance(trainer._get_train_sampler(), PromptGroupedSampler)
    seen, real = [], RPOTrainer._loss_from_logps

    def spy(self, batch, policy_logps, outputs):
        seen.append(torch.unique(batch["group_key"], return_counts=True)[1].tolist())
        return real(self, batch, policy_logps, outputs)

    monkeypatch.setattr(RPOTrainer, "_loss_from_logps", spy)
    trainer.train()
    assert seen == [[3, 3]] * 3  # every batch: two prompts, all three rows of each


def test_level_weighted_loss_in_the_trainer(model_dir, make_args):
    """The trainer's loss on a batch is ½·mean over prompts of Σ(δ − δ̄)² + λ·n·δ̄², not the plain loss."""
    dataset = Dataset.from_dict(reward_rows(num_prompts=4, completions_per_prompt=3))
    args = make_args(
        train_sampling_strategy="group_by_prompt", level_weight=0.25, per_device_train_batch_size=6, beta=0.5
    )
    trainer = RPOTrainer(model_dir, args=args, train_dataset=dataset)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        sums, counts, _, _ = trainer._completion_logps(trainer.model, batch)
    delta = trainer._aggregate(sums, counts) - batch["ref_logps"] - batch["target"]
    expected = 0.0
    for key in batch["group_key"].unique():
        rows = delta[batch["group_key"] == key]
        expected += 0.5 * (((rows - rows.mean()) ** 2).sum() + 0.25 * len(rows) * rows.mean() ** 2)
    assert loss.item() == pytest.approx(expected.item() / 6, rel=1e-5)
    assert loss.item() != pytest.approx(0.5 * (delta**2).mean().item(), rel=1e-3)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_partition_temperature_and_shrinkage_targets_and_logs(model_dir, make_args):
    rows = reward_rows(num_prompts=5, completions_per_prompt=3)
    rows["reward"] = [r + (i // 3) * 0.5 for i, r in enumerate(rows["reward"])]  # prompts differ in mean reward
    dataset = Dataset.from_dict(rows)
    options = {"partition_estimator": "monte_carlo", "partition_temperature": math.inf, "beta": 0.5}
    options |= {"value_shrinkage": "empirical_bayes", "logps_aggregation": "sum"}
    trainer = RPOTrainer(model_dir, args=make_args(**options), train_dataset=dataset, eval_dataset=dataset)
    train = trainer.train_dataset
    groups = torch.tensor(train["group_key"])
    rewards, _ = normalize_rewards(torch.tensor(train["reward"], dtype=torch.float64), groups)
    expected = rpo_targets(
        torch.tensor(train["ref_logps"]), rewards, groups, beta=0.5, estimator="monte_carlo",
        partition_temperature=math.inf, value_shrinkage="empirical_bayes",
    )  # fmt: skip
    torch.testing.assert_close(torch.tensor(train["target"], dtype=torch.float64), expected.targets)
    plain = rpo_targets(torch.tensor(train["ref_logps"]), rewards, groups, beta=0.5, estimator="monte_carlo")
    assert not torch.allclose(expected.targets, plain.targets)  # the options change the targets
    k = trainer._data_stats["data/train_value_credibility_k"]
    assert k == pytest.approx(expected.credibility_k)
    assert 0 < k < math.inf
    assert trainer._data_stats["data/train_value_credibility"] == pytest.approx(3 / (3 + k))
    # the eval split (the same rows) reuses the training k and V_g: the same targets
    torch.testing.assert_close(
        torch.tensor(trainer.eval_dataset["target"]), torch.tensor(train["target"]), rtol=1e-6, atol=1e-6
    )
    assert trainer._data_stats["data/eval_value_credibility_k"] == k


def test_level_options_refused_with_a_message():
    with pytest.raises(ValueError, match="partition_estimator='monte_carlo'"):
        RPOConfig("out", partition_temperature=2.0)
    with pytest.raises(ValueError, match="partition_estimator='monte_carlo'"):
        RPOConfig("out", partition_estimator="none", value_shrinkage="empirical_bayes")
    with pytest.raises(ValueError, match="group_by_prompt"):
        RPOConfig("out", level_weight=0.5)
    with pytest.raises(ValueError, match="level_weight"):
        RPOConfig("out", level_weight=-1.0, train_sampling_strategy="group_by_prompt")
    with pytest.raises(ValueError, match="partition_temperature"):
        RPOConfig("out", partition_estimator="monte_carlo", partition_temperature=0.0)
    with pytest.raises(ValueError, match="train_sampling_strategy"):
        RPOConfig("out", train_sampling_strategy="group_by_prompts")
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="huber_delta"):
            RPOConfig("out", huber_delta=bad)
    with pytest.raises(ValueError, match="Use one"):
        RPOConfig("out", huber_delta=1.0, level_weight=0.5, train_sampling_strategy="group_by_prompt")
    assert RPOConfig("out", huber_delta=2).huber_delta == 2


def test_level_options_from_the_command_line():
    (config,) = HfArgumentParser(RPOConfig).parse_args_into_dataclasses(
        ["--output_dir", "out", "--partition_estimator", "monte_carlo", "--partition_temperature", "inf",
         "--value_shrinkage", "empirical_bayes", "--level_weight", "0.1", "--train_sampling_strategy",
         "group_by_prompt"]
    )  # fmt: skip
    assert config.partition_temperature == math.inf
    assert (config.value_shrinkage, config.level_weight) == ("empirical_bayes", 0.1)
    assert config.train_sampling_strategy == "group_by_prompt"


def test_level_weight_one_is_todays_loss():
    """λ = 1 with group ids is exactly the plain per-row loss (the default changes nothing)."""
    policy, ref, targets = torch.randn(6), torch.randn(6), torch.randn(6)
    grouped = rpo_loss(policy, ref, targets, torch.tensor([0, 0, 1, 1, 1, 2]), level_weight=1.0)
    torch.testing.assert_close(grouped.losses, rpo_loss(policy, ref, targets).losses, rtol=0, atol=0)


def test_target_level_split_by_hand():
    """Prompt a: targets (3, 1) → level 2, contrast ±1; prompt b: (−4) → level −4, contrast 0; a dropped row is left
    out. RMS contrast √(2/3), RMS level √((4 + 4 + 16)/3) = √8."""
    targets = torch.tensor([3.0, 1.0, -4.0, math.nan], dtype=torch.float64)
    contrast, level = target_level_split(targets, torch.tensor([0, 0, 1, 1]))
    assert contrast == pytest.approx(math.sqrt(2 / 3))
    assert level == pytest.approx(math.sqrt(8))


def test_targets_dominated_by_their_level_are_warned_about(model_dir, make_args, caplog):
    """The authors' defaults on rows whose rewards hardly differ: each prompt's targets are mostly its shared
    −log Σ π_ref term, so the trainer warns and says what to change; the contrast-only targets of τ_Z = ∞ do not."""
    rows = reward_rows(num_prompts=4, completions_per_prompt=3)
    dataset = Dataset.from_dict(rows)
    with caplog.at_level(logging.WARNING):
        trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=dataset)
    stats = trainer._data_stats
    assert stats["data/train_target_level"] > stats["data/train_target_contrast"] > 0
    assert "mostly move each prompt's completions together" in caplog.text
    assert "partition_temperature=float('inf')" in caplog.text
    assert "value_shrinkage='empirical_bayes'" in caplog.text
    caplog.clear()
    options = {"partition_estimator": "monte_carlo", "partition_temperature": math.inf, "logps_aggregation": "sum"}
    with caplog.at_level(logging.WARNING):
        trainer = RPOTrainer(model_dir, args=make_args(**options), train_dataset=dataset)
    assert trainer._data_stats["data/train_target_level"] == pytest.approx(0.0, abs=1e-12)
    assert "mostly move" not in caplog.text


@pytest.mark.parametrize(("learning_rate", "warned"), [(1e-9, True), (5e-2, False)])
def test_a_run_that_barely_moved_is_warned_about(model_dir, make_args, caplog, learning_rate, warned):
    """Kept from a KTO setup, a learning rate far too small for the model leaves every log-ratio near 0: at the end of
    training the trainer says so, with the numbers and what to change; a run that moved says nothing."""
    options = {"partition_estimator": "monte_carlo", "partition_temperature": math.inf, "logps_aggregation": "sum"}
    args = make_args(max_steps=4, learning_rate=learning_rate, beta=0.5, **options)
    trainer = RPOTrainer(model_dir, args=args, train_dataset=Dataset.from_dict(reward_rows(num_prompts=4)))
    with caplog.at_level(logging.WARNING):
        trainer.train()
    moved, asked = (sum(v) / len(v) for v in zip(*trainer.batch_metrics.recent_moves, strict=True))
    assert len(trainer.batch_metrics.recent_moves) == 4
    assert ("Training barely moved the policy" in caplog.text) == warned
    assert (moved**0.5 < 0.05 * asked**0.5) == warned  # the check reads what the steps recorded
    if warned:
        assert "Raise `learning_rate`" in caplog.text
