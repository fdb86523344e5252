"""Prepared data is never trusted blindly: a dataset that already carries token ids, targets or values (an earlier
trainer's `train_dataset`, a `save_to_disk` of it) gets the targets of *this* trainer's settings, and eval splits
always use this trainer's training-split statistics."""

import logging

import pytest
import torch
from conftest import reward_rows
from datasets import Dataset, load_from_disk

from trl_rpo import RPOTrainer


def _targets(trainer, split=None) -> torch.Tensor:
    data = trainer.train_dataset if split is None else trainer.eval_dataset
    return torch.tensor(list(data["target"]), dtype=torch.float64)


def test_a_previous_trainers_rows_get_this_trainers_targets(model_dir, make_args, reward_dataset, caplog):
    old = RPOTrainer(model_dir, args=make_args(beta=5.0), train_dataset=reward_dataset)
    with caplog.at_level(logging.WARNING):
        reused = RPOTrainer(model_dir, args=make_args(beta=0.5), train_dataset=old.train_dataset)
    derived = "completion_ids, completion_key, group_key, length, prompt_ids, ref_logps, source_row, target, value"
    assert f"carries columns a trainer derived ({derived}). They are ignored and recomputed" in caplog.text
    fresh = RPOTrainer(model_dir, args=make_args(beta=0.5), train_dataset=reward_dataset)
    torch.testing.assert_close(_targets(reused), _targets(fresh), rtol=0, atol=1e-9)
    assert not torch.allclose(_targets(reused), _targets(old))  # τ = 5 targets would have been kept as they were


def test_saved_and_reloaded_rows_are_recomputed(model_dir, make_args, reward_dataset, tmp_path):
    old = RPOTrainer(model_dir, args=make_args(partition_estimator="monte_carlo"), train_dataset=reward_dataset)
    old.train_dataset.save_to_disk(str(tmp_path / "prepared"))
    reloaded = load_from_disk(str(tmp_path / "prepared"))
    trainer = RPOTrainer(model_dir, args=make_args(partition_estimator="empirical"), train_dataset=reloaded)
    fresh = RPOTrainer(model_dir, args=make_args(partition_estimator="empirical"), train_dataset=reward_dataset)
    torch.testing.assert_close(_targets(trainer), _targets(fresh), rtol=0, atol=1e-9)
    assert not torch.allclose(_targets(trainer), _targets(old))


def test_token_ids_are_recomputed_with_this_tokenizer(model_dir, make_args, reward_dataset):
    """Forged token ids in the input (another tokenizer's) are replaced by this trainer's tokenisation."""
    fresh = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset)
    forged = reward_dataset.add_column("prompt_ids", [[1, 2, 3]] * len(reward_dataset))
    forged = forged.add_column("completion_ids", [[4]] * len(forged))
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=forged)
    assert list(trainer.train_dataset["prompt_ids"]) == list(fresh.train_dataset["prompt_ids"])
    assert list(trainer.train_dataset["completion_ids"]) == list(fresh.train_dataset["completion_ids"])


def test_prepared_eval_split_uses_this_trainers_train_statistics(model_dir, make_args, reward_dataset):
    """An eval split prepared by a trainer with other training rewards is re-normalised with this train split."""
    scaled = reward_rows()
    scaled["reward"] = [10 * r + 3 for r in scaled["reward"]]
    other = RPOTrainer(
        model_dir, args=make_args(), train_dataset=Dataset.from_dict(scaled), eval_dataset=reward_dataset
    )
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset, eval_dataset=other.eval_dataset)
    expected = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset, eval_dataset=reward_dataset)
    torch.testing.assert_close(_targets(trainer, "eval"), _targets(expected, "eval"), rtol=0, atol=1e-9)
    assert not torch.allclose(_targets(trainer, "eval"), _targets(other, "eval"))


def test_derived_columns_without_text_are_refused(model_dir, make_args, reward_dataset):
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset)
    tokens_only = trainer.train_dataset.remove_columns(["prompt", "completion"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt', 'completion'\]"):
        RPOTrainer(model_dir, args=make_args(), train_dataset=tokens_only)
