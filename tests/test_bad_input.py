"""SPEC §3: each bad input raises one ValueError naming the column, the rows and the fix, or is counted."""

import logging
import math

import pytest
import torch
from conftest import reward_rows
from datasets import Dataset, IterableDataset

from trl_rpo import RPOConfig, RPOTrainer
from trl_rpo.data import to_reward_rows
from trl_rpo.target_pass import TargetPass


def _rows(**overrides) -> Dataset:
    rows = {"prompt": ["a", "b", "c"], "completion": [" x", " y", " z"], "reward": [1.0, 0.0, 2.0]}
    rows.update(overrides)
    return Dataset.from_dict({k: v for k, v in rows.items() if v is not None})


@pytest.mark.parametrize(
    ("dataset", "column", "fragment"),
    [
        (_rows(prompt=None), "prompt", "missing column"),
        (_rows(reward=None), "reward", "no 'reward' or 'label' column"),
        (_rows(reward=[1.0, None, 2.0]), "reward", "indices 1"),
        (_rows(reward=[1.0, float("nan"), 2.0]), "reward", "NaN or infinite in 1 row(s) (indices 1)"),
        (_rows(reward=[1.0, 2.0, float("inf")]), "reward", "indices 2"),
        (_rows(reward=["1.0", "high", "2"]), "reward", "holds text"),
        (_rows(label=[True, False, True]), "label", "both a 'reward' and a 'label'"),
        (_rows(reward=None, label=[0.7, 1.0, 0.0]), "label", "must hold booleans"),
        (_rows(completion=["x", "", "z"]), "completion", "empty in 1 row(s) (indices 1)"),
        (_rows(completion=["x", None, "z"]), "completion", "missing in 1 row(s) (indices 1)"),
    ],
)
def test_bad_columns_name_column_rows_and_fix(dataset, column, fragment):
    with pytest.raises(ValueError, match=f"'{column}'|{column}") as error:
        to_reward_rows(dataset, "train")
    assert fragment in str(error.value)


def test_mixed_standard_and_conversational_columns():
    dataset = _rows(completion=[[{"role": "assistant", "content": c}] for c in "xyz"])
    with pytest.raises(ValueError, match=r"mixes formats across columns \('prompt' is standard, 'completion' is"):
        to_reward_rows(dataset, "train")


def test_empty_conversational_completion():
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": q}] for q in "ab"],
            "completion": [[{"role": "assistant", "content": "ok"}], [{"role": "assistant", "content": ""}]],
            "reward": [1.0, 0.0],
        }
    )
    with pytest.raises(ValueError, match=r"'completion' .* empty in 1 row\(s\) \(indices 1\)"):
        to_reward_rows(dataset, "train")


def test_paired_scores_are_checked_in_the_users_rows():
    pairs = {"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["u", "v"]}
    with pytest.raises(ValueError, match="'score_chosen' but not its partner"):
        to_reward_rows(Dataset.from_dict(pairs | {"score_chosen": [1.0, 2.0]}), "train")
    scores = {"score_chosen": [1.0, float("nan")], "score_rejected": [0.0, 0.0]}
    with pytest.raises(ValueError, match=r"'score_chosen' .* \(indices 1\)"):
        to_reward_rows(Dataset.from_dict(pairs | scores), "train")
    with pytest.raises(ValueError, match="Remove 'completion'"):
        to_reward_rows(Dataset.from_dict(pairs | {"completion": ["x", "y"]}), "train")


def test_bool_reward_and_extra_columns():
    out = to_reward_rows(_rows(reward=[True, False, True], note=["n1", "n2", "n3"]), "train")
    assert list(out["reward"]) == [1.0, 0.0, 1.0]
    assert set(out.column_names) == {"prompt", "completion", "reward", "source_row"}


def test_empty_dataset():
    with pytest.raises(ValueError, match="The eval dataset is empty"):
        to_reward_rows(Dataset.from_dict({"prompt": [], "completion": [], "reward": []}), "eval")


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(beta, tmp_path):
    with pytest.raises(ValueError, match="`beta` .* finite number > 0"):
        RPOConfig(str(tmp_path), beta=beta)


@pytest.mark.parametrize(
    ("option", "value"),
    [("sync_ref_model", True), ("desirable_weight", 2.0), ("undesirable_weight", 0.5), ("ref_model_sync_steps", 4)],
)
def test_kto_only_options_are_rejected(option, value, tmp_path):
    with pytest.raises(ValueError, match=f"`{option}` is a KTO option with no meaning for RPO.*Remove `{option}`"):
        RPOConfig(str(tmp_path), **{option: value})


def test_precompute_off_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="precompute_ref_log_probs=False` is not supported"):
        RPOConfig(str(tmp_path), precompute_ref_log_probs=False)


def test_iterable_dataset_is_refused_with_the_fix(model_dir, make_args, reward_dataset):
    stream = IterableDataset.from_generator(lambda: iter(reward_dataset))
    with pytest.raises(ValueError, match="map-style `Dataset`"):
        RPOTrainer(model_dir, args=make_args(), train_dataset=stream)
    with pytest.raises(ValueError, match="The ev dataset is an `IterableDataset`"):
        RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset, eval_dataset={"ev": stream})


def test_kto_config_is_refused_with_the_fix(model_dir, reward_dataset, tmp_path):
    from trl import KTOConfig

    with pytest.raises(TypeError, match="rename `KTOConfig"):
        RPOTrainer(model_dir, args=KTOConfig(str(tmp_path), bf16=False), train_dataset=reward_dataset)


def test_long_prompts_are_dropped_and_counted(model_dir, make_args, caplog):
    rows = reward_rows(num_prompts=2)
    rows["prompt"][0] = "long " * 40  # > max_length tokens: nothing of its completion would survive truncation
    with caplog.at_level(logging.WARNING):
        trainer = RPOTrainer(model_dir, args=make_args(max_length=24), train_dataset=Dataset.from_dict(rows))
    assert len(trainer.train_dataset) == 5
    assert "Dropped 1 of 6 rows of the train dataset" in caplog.text
    trainer.train()
    assert trainer.state.log_history[0]["data/train_rows_dropped_max_length"] == 1.0


def test_every_prompt_too_long_is_an_error(model_dir, make_args):
    rows = reward_rows(num_prompts=1)
    rows["prompt"] = ["long " * 40] * 3
    with pytest.raises(ValueError, match="Increase `max_length`"):
        RPOTrainer(model_dir, args=make_args(max_length=8), train_dataset=Dataset.from_dict(rows))


def test_reference_with_minus_infinity_logps_is_an_error(model_dir, make_args, reward_dataset, monkeypatch):
    real = TargetPass._reference_pass

    def broken(self, *args, **kwargs):
        sums, counts = real(self, *args, **kwargs)
        sums[4] = -math.inf  # as a reference that gives a completion token zero probability would
        return sums, counts

    monkeypatch.setattr(TargetPass, "_reference_pass", broken)
    with pytest.raises(ValueError, match=r"non-finite reference log-prob .* \(first rows: \[4\]\)"):
        RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset)


def test_sparse_prompts_strategies(model_dir, make_args, caplog):
    rows = reward_rows(num_prompts=3)
    for key in rows:  # prompt 0 keeps a single completion
        rows[key] = rows[key][:1] + rows[key][3:]
    dataset = Dataset.from_dict(rows)
    with caplog.at_level(logging.WARNING):
        kept = RPOTrainer(model_dir, args=make_args(), train_dataset=dataset)
    assert "1 prompt(s) (1 rows) of the train dataset have fewer than 2 completions" in caplog.text
    assert kept._data_stats["data/train_sparse_prompts"] == 1.0
    assert len(kept.train_dataset) == 7
    dropped = RPOTrainer(model_dir, args=make_args(sparse_prompt_strategy="drop"), train_dataset=dataset)
    assert len(dropped.train_dataset) == 6
    assert dropped._data_stats["data/train_rows_dropped_sparse"] == 1.0
    assert rows["prompt"][0] not in list(dropped.train_dataset["prompt"])
    with pytest.raises(ValueError, match=r"\b0\b"):
        RPOTrainer(model_dir, args=make_args(sparse_prompt_strategy="error"), train_dataset=dataset)


def test_constant_reward_is_centred_not_scaled(model_dir, make_args, caplog):
    rows = reward_rows()
    rows["reward"] = [3.0] * len(rows["reward"])
    with caplog.at_level(logging.WARNING):
        trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=Dataset.from_dict(rows))
    assert "constant" in caplog.text
    targets = torch.tensor(list(trainer.train_dataset["target"]))
    assert torch.isfinite(targets).all()


# ------------------------------------------------------------------------------------ SPEC §3, the holes
def test_sparse_drop_of_every_row_is_an_error_at_construction(model_dir, make_args):
    rows = {"prompt": ["a =", "b =", "c ="], "completion": [" 1", " 2", " 3"], "reward": [1.0, 0.0, 2.0]}
    with pytest.raises(ValueError, match=r"No row of the train dataset is left.*sparse_prompt_strategy='drop'"):
        RPOTrainer(model_dir, args=make_args(sparse_prompt_strategy="drop"), train_dataset=Dataset.from_dict(rows))


def test_evaluate_refuses_an_iterable_dataset(model_dir, make_args, reward_dataset):
    trainer = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset)
    stream = IterableDataset.from_generator(lambda: iter(reward_dataset))
    with pytest.raises(ValueError, match="The eval dataset is an `IterableDataset`.*map-style `Dataset`"):
        trainer.evaluate(stream)
    with pytest.raises(ValueError, match="The held_out dataset is an `IterableDataset`"):
        trainer.evaluate({"held_out": stream})


@pytest.mark.parametrize("reward", [1e300, 1e20])
def test_targets_that_overflow_float32_are_an_error(model_dir, make_args, reward):
    """One raw reward (no normalisation) of 1e20 in row 4 sets its prompt's V̂ to about 1e20, so the prompt's other
    rows (3 and 5) get targets near −1e22 nats (τ = 0.01), whose square is inf in float32 (1e300: near −1e302). The
    error names those rows and the fix instead of training on inf."""
    rows = reward_rows(num_prompts=2)
    rows["reward"][4] = reward  # row 4: the second prompt's middle completion
    args = make_args(reward_normalization="none", beta=0.01)
    with pytest.raises(ValueError, match=r"targets of 2 row\(s\) \(indices 3, 5\).*reward_normalization='global'"):
        RPOTrainer(model_dir, args=args, train_dataset=Dataset.from_dict(rows))


def test_list_valued_reward_is_an_error():
    with pytest.raises(ValueError, match="'reward' of the train dataset holds lists, not one real number per row"):
        to_reward_rows(_rows(reward=[[1.0, 2.0], [0.0], [3.0]]), "train")


def test_empty_prompt_is_an_error_naming_the_row(model_dir, make_args):
    """The tiny tokenizer adds no BOS: an empty prompt leaves the first completion token with nothing before it."""
    rows = reward_rows(num_prompts=2)
    rows["prompt"][4] = ""
    with pytest.raises(ValueError, match=r"'prompt' .* tokenises to no token in 1 row\(s\) \(indices 4\)"):
        RPOTrainer(model_dir, args=make_args(), train_dataset=Dataset.from_dict(rows))


def test_group_by_length_batches_rows_of_similar_length(model_dir, make_args):
    from trl_rpo.data import LengthGroupedSampler

    rows = reward_rows(num_prompts=4)
    for j in range(0, 12, 3):  # every prompt's first completion is long
        rows["completion"][j] = " and".join([" the answer is"] * 6)
    args = make_args(train_sampling_strategy="group_by_length", per_device_train_batch_size=4, max_steps=1)
    trainer = RPOTrainer(model_dir, args=args, train_dataset=Dataset.from_dict(rows))
    data = trainer.train_dataset
    pairs = zip(data["prompt_ids"], data["completion_ids"], strict=True)
    expected = [min(len(p) + len(c), args.max_length) for p, c in pairs]
    assert list(data["length"]) == expected
    sampler = trainer._get_train_sampler(trainer._remove_unused_columns(data))
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths.tolist() == expected  # the sampler sorts by the tokens each row feeds the model
    assert next(iter(sampler)) in {0, 3, 6, 9}  # and leads with a longest row
    trainer.train()


def test_errors_name_the_users_rows_of_paired_data(model_dir, make_args, caplog):
    """Pairs expand to two rows each; a problem in pair 2 is reported as row 2, not as expanded row 4 or 5."""
    pairs = {
        "prompt": ["1 + 1 =", "2 + 2 =", "long " * 40, "3 + 3 ="],
        "chosen": [" 2", " 4", " 9", " 6"],
        "rejected": [" 3", " 5", " 8", " 7"],
    }
    with caplog.at_level(logging.WARNING):
        RPOTrainer(model_dir, args=make_args(max_length=24), train_dataset=Dataset.from_dict(pairs))
    assert "Dropped 2 of 8 rows of the train dataset whose prompt fills `max_length=24` (1 row(s) (indices 2)" in (
        caplog.text
    )
    scores = {"score_chosen": [1.0, 1e22, 0.0, 1.0], "score_rejected": [0.0, 0.0, 0.0, 0.0]}
    pairs["prompt"][2] = "4 + 4 ="
    with pytest.raises(ValueError, match=r"targets of 1 row\(s\) \(indices 1\)"):
        RPOTrainer(
            model_dir, args=make_args(reward_normalization="none"), train_dataset=Dataset.from_dict(pairs | scores)
        )


def test_construction_never_reads_a_whole_column_into_python(model_dir, make_args, monkeypatch):
    """Validation, lengths, keys and targets read Arrow batches: `dataset["column"]` (a whole column as Python
    objects on every rank, ≈ 70 bytes per token for token ids) is never called while the trainer is built."""
    from datasets import Dataset as HFDataset

    real = HFDataset.__getitem__

    def guarded(self, key):
        if isinstance(key, str):
            raise AssertionError(f"dataset[{key!r}] read a whole column into Python")
        return real(self, key)

    paired = {"prompt": ["1 + 1 =", "2 + 2 ="] * 3, "chosen": [" 2", " 4"] * 3, "rejected": [" 3", " 5"] * 3}
    for rows in (reward_rows(), paired):
        dataset = Dataset.from_dict(rows)
        monkeypatch.setattr(HFDataset, "__getitem__", guarded)
        trainer = RPOTrainer(model_dir, args=make_args(max_length=16), train_dataset=dataset, eval_dataset=dataset)
        monkeypatch.setattr(HFDataset, "__getitem__", real)
        assert len(trainer.train_dataset) == len(dataset) * (2 if "chosen" in rows else 1)
