"""Grouped rows (`prompt` + `completions` + `rewards` lists) and rewards built from several columns
(`reward_columns`, `reward_column_weights`, `reward_column_transforms`): what they become, and the errors that name
the row and the list position."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from tests.conftest import conversational, reward_rows
from trl_rpo import RPOConfig, RPOTrainer
from trl_rpo.data import RewardSpec, check_rows, to_reward_rows


def grouped(rows: dict[str, list]) -> dict[str, list]:
    """The same rows, one per prompt: its completions and rewards as lists, in row order."""
    out = {"prompt": [], "completions": [], "rewards": []}
    for prompt, completion, reward in zip(rows["prompt"], rows["completion"], rows["reward"], strict=True):
        if not out["prompt"] or out["prompt"][-1] != prompt:
            out["prompt"].append(prompt)
            out["completions"].append([])
            out["rewards"].append([])
        out["completions"][-1].append(completion)
        out["rewards"][-1].append(reward)
    return out


def spec(columns, weights=None, transforms=None) -> RewardSpec:
    args = RPOConfig(
        "unused", reward_columns=columns, reward_column_weights=weights, reward_column_transforms=transforms
    )
    return RewardSpec.from_config(args)


# ----------------------------------------------------------------------------------------------- grouped rows
@pytest.mark.parametrize("style", ["standard", "conversational"])
def test_grouped_rows_explode_to_the_flat_rows(style):
    flat = reward_rows(num_prompts=3, completions_per_prompt=3)
    flat = conversational(flat) if style == "conversational" else flat
    rows = to_reward_rows(Dataset.from_dict(grouped(flat)), "train")
    assert rows["prompt"] == flat["prompt"]
    assert rows["completion"] == flat["completion"]
    assert rows["reward"] == flat["reward"]
    assert rows["source_row"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # the prompt's row in the grouped dataset


def test_grouped_rows_train_with_the_targets_of_the_flat_rows(model_dir, make_args):
    """Groups of unequal size: the same targets, values and rows as the flat dataset."""
    flat = reward_rows(num_prompts=4, completions_per_prompt=3)
    for name in ("prompt", "completion", "reward"):
        del flat[name][4]  # prompt 1 keeps 2 completions
    trainers = [
        RPOTrainer(model_dir, args=make_args(), train_dataset=Dataset.from_dict(data))
        for data in (flat, grouped(flat))
    ]
    for column in ("completion_ids", "target", "value", "reward"):
        assert trainers[1].train_dataset[column] == trainers[0].train_dataset[column], column
    assert len(trainers[1].train_dataset) == 11


def test_grouped_rows_keep_passthrough_columns():
    data = {"prompt": ["a", "b"], "completions": [["x", "y"], ["z"]], "rewards": [[1, 0], [2]]}
    data["chat_template_kwargs"] = [{"k": 1}, {"k": 2}]
    rows = to_reward_rows(Dataset.from_dict(data), "train")
    assert rows["chat_template_kwargs"] == [{"k": 1}, {"k": 1}, {"k": 2}]
    assert rows["reward"] == [1.0, 0.0, 2.0]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"completions": [["x", "y"], ["z"]], "rewards": [[1.0, 0.0], [1.0, 2.0]]},
         r"'rewards' .* does not have one value per completion in 1 row\(s\) \(indices 1\)"),
        ({"completions": [["x", "y"], ["z", "w"]], "rewards": [[1.0, 0.0], [float("nan"), 2.0]]},
         r"'rewards' .* NaN or infinite in 1 item\(s\) \(row 1 position 0\)"),
        ({"completions": [["x", "y"], ["z", "w"]], "rewards": [[1.0, None], [1.0, 2.0]]},
         r"'rewards' .* in 1 item\(s\) \(row 0 position 1\)"),
        ({"completions": [["x", ""], ["z", "w"]], "rewards": [[1.0, 0.0], [1.0, 2.0]]},
         r"empty completions in 1 item\(s\) \(row 0 position 1\)"),
        ({"completions": [["x", None], ["z", "w"]], "rewards": [[1.0, 0.0], [1.0, 2.0]]},
         r"missing completions in 1 item\(s\) \(row 0 position 1\)"),
        ({"completions": [["x"], None], "rewards": [[1.0], [1.0]]}, r"'completions' .* missing in 1 row\(s\)"),
        ({"completions": ["x", "y"], "rewards": [[1.0], [1.0]]}, r"not one list of completions per prompt"),
        ({"completions": [["x"], ["y"]], "rewards": [1.0, 2.0]}, r"one list of real numbers"),
        ({"completions": [["x"], ["y"]], "rewards": [["1"], ["2"]]}, r"one list of real numbers"),
        ({"completions": [["x"], ["y"]]}, r"no 'rewards' column"),
        ({"completions": [["x"], ["y"]], "rewards": [[1.0], [1.0]], "completion": ["x", "y"]},
         r"both 'completion' and 'completions'"),
    ],
)  # fmt: skip
def test_grouped_bad_input_names_the_row_and_position(data, match):
    with pytest.raises(ValueError, match=match):
        check_rows(Dataset.from_dict({"prompt": ["p", "q"], **data}), "train")


def test_grouped_prompt_and_completions_share_a_format():
    data = {"prompt": ["p"], "completions": [[[{"role": "assistant", "content": "x"}]]], "rewards": [[1.0]]}
    with pytest.raises(ValueError, match="mixes formats"):
        check_rows(Dataset.from_dict(data), "train")


def test_prompts_without_completions_are_counted(caplog):
    data = {"prompt": ["p", "q", "r"], "completions": [["x"], [], ["y", "z"]], "rewards": [[1.0], [], [0.0, 1.0]]}
    rows = to_reward_rows(Dataset.from_dict(data), "train")
    assert rows["source_row"] == [0, 2, 2]
    assert "1 prompt row(s) of the train dataset have no completion (1 row(s) (indices 1))" in caplog.text


# ------------------------------------------------------------------------------------------ reward columns
def test_reward_columns_are_a_weighted_sum_of_transformed_columns():
    data = {"prompt": ["p"] * 3, "completion": ["x", "y", "z"], "help": [4, 2, 0], "votes": [0, 9, -3]}
    rows = to_reward_rows(Dataset.from_dict(data), "train", reward_spec=spec(["help", "votes"], [0.5, 2.0],
                                                                            ["identity", "log1p"]))  # fmt: skip
    expected = [0.5 * 4 + 2 * 0.0, 0.5 * 2 + 2 * math.log(10), 0.5 * 0 - 2 * math.log(4)]
    np.testing.assert_allclose(rows["reward"], expected, rtol=1e-12)


def test_reward_columns_of_grouped_rows_are_lists():
    data = {"prompt": ["p", "q"], "completions": [["x", "y"], ["z"]], "a": [[1, 2], [3]], "b": [[0.5, 0.0], [1.0]]}
    rows = to_reward_rows(Dataset.from_dict(data), "train", reward_spec=spec(["a", "b"], [1.0, -2.0]))
    assert rows["reward"] == [1 - 1.0, 2 - 0.0, 3 - 2.0]


def test_reward_columns_train_like_the_summed_reward_column(model_dir, make_args):
    """Weighting happens before `reward_normalization`: the targets equal those of a `reward` column holding the
    weighted sum, with the global z-score on top."""
    base = reward_rows()
    help_, verbosity = base["reward"], [float(len(c)) for c in base["completion"]]
    weighted = {k: base[k] for k in ("prompt", "completion")} | {"helpfulness": help_, "verbosity": verbosity}
    summed = {k: base[k] for k in ("prompt", "completion")}
    summed["reward"] = [0.8 * h - 0.4 * v for h, v in zip(help_, verbosity, strict=True)]
    options = {"reward_columns": ["helpfulness", "verbosity"], "reward_column_weights": [0.8, -0.4]}
    by_columns = RPOTrainer(model_dir, args=make_args(**options), train_dataset=Dataset.from_dict(weighted))
    by_reward = RPOTrainer(model_dir, args=make_args(), train_dataset=Dataset.from_dict(summed))
    torch.testing.assert_close(
        torch.tensor(by_columns.train_dataset["target"]), torch.tensor(by_reward.train_dataset["target"])
    )
    assert by_columns.train_dataset["reward"] == pytest.approx(summed["reward"])


@pytest.mark.parametrize(
    ("data", "columns", "match"),
    [
        ({"completion": ["x"], "a": [1.0]}, ["a", "b"], r"names \['b'\], which the train dataset does not have"),
        ({"completion": ["x"], "a": [1.0], "reward": [1.0]}, ["a"], "has a 'reward' column .* ambiguous"),
        ({"completion": ["x"], "a": [1.0], "label": [True]}, ["a"], "has a 'label' column .* ambiguous"),
        ({"completion": ["x"], "a": ["1"]}, ["a"], "holds text, not real numbers"),
        ({"completions": [["x"]], "a": [[1.0]], "rewards": [[1.0]]}, ["a"], "has a 'rewards' column"),
        ({"chosen": ["x"], "rejected": ["y"], "a": [1.0]}, ["a"], "applies to unpaired and grouped rows"),
    ],
)
def test_reward_columns_bad_input(data, columns, match):
    with pytest.raises(ValueError, match=match):
        check_rows(Dataset.from_dict({"prompt": ["p"], **data}), "train", reward_spec=spec(columns))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"reward_column_weights": [1.0]}, "apply to `reward_columns`, which is not set"),
        ({"reward_columns": ["a", "b"], "reward_column_weights": [1.0]}, "one finite number per column"),
        ({"reward_columns": ["a"], "reward_column_weights": [float("inf")]}, "one finite number per column"),
        ({"reward_columns": ["a", "a"]}, "distinct columns"),
        ({"reward_columns": ["a"], "reward_column_transforms": ["sqrt"]}, r"one of \['identity', 'log1p'\]"),
    ],
)
def test_reward_column_options_are_validated(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        RPOConfig(str(tmp_path), **options)


def test_one_transform_applies_to_every_column():
    assert spec(["a", "b"], transforms=["log1p"]).transforms == ("log1p", "log1p")
    assert spec(["a", "b"]).weights == (1.0, 1.0)
