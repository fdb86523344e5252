"""The real-model demo (`examples/smollm2_demo/`): its reward function on hand-written answers, and both scripts end
to end on the tiny offline model (the real run, on SmolLM2-135M-Instruct, takes minutes and is `make demo`)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest


DEMO_DIR = Path(__file__).resolve().parents[1] / "examples" / "smollm2_demo"
sys.path.insert(0, str(DEMO_DIR))  # the scripts import their sibling modules by name, as when run directly

import task  # noqa: E402


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"smollm2_demo_{name}", DEMO_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("71", 71, 1.0),
        ("  71\n", 71, 1.0),
        ("71.0", 71, 1.0),
        ("-5", -5, 1.0),
        ("23 + 48 = 71", 71, 1.0),  # the answer in a sentence counts as much as alone
        ("The answer is 71!", 71, 1.0),
        ("70", 71, 0.225),  # off by 1: 0.25 · (1 − 1/10)
        ("The sum is 75", 71, 0.15),
        ("-3", -5, 0.2),
        ("5", -5, 0.0),  # the sign counts: 10 off
        ("81", 71, 0.0),
        ("71 is the answer, not 70", 71, 0.225),  # the last number is the one scored
        ("seventy-one", 71, 0.0),
        ("", 71, 0.0),
    ],
)
def test_reward(completion, answer, expected):
    assert task.reward(completion, answer) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "number"), [("71", 71.0), ("-12 apples", -12.0), ("3.5 and then 4", 4.0), ("1 - 2", 2.0), ("none", None)]
)
def test_parse_answer(text, number):
    assert task.parse_answer(text) == number


def test_train_and_eval_problems_are_disjoint_and_seeded():
    eval_problems = task.make_problems(40, seed=1)
    train_problems = task.make_problems(60, seed=0, exclude=set(eval_problems))  # all 100 one-digit pairs
    assert len(set(train_problems)) == 60
    assert not set(train_problems) & set(eval_problems)
    assert task.make_problems(40, seed=1) == eval_problems
    with pytest.raises(ValueError, match="distinct problems"):
        task.make_problems(1, seed=0, exclude=set(train_problems) | set(eval_problems))


def test_generate_then_train_end_to_end(model_dir, tmp_path):
    data_dir, output_dir = tmp_path / "data", tmp_path / "out"
    generate_data = load_script("generate_data")
    generate_data.main(
        ["--model", model_dir, "--output_dir", str(data_dir), "--num_train_prompts", "3"]
        + ["--completions_per_prompt", "2", "--num_eval", "4", "--max_new_tokens", "6"]
    )
    train_rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(line) for line in (data_dir / "eval.jsonl").read_text().splitlines()]
    groups = {}
    for row in train_rows:
        groups.setdefault(row["prompt"][0]["content"], []).append(row["completion"][0]["content"])
    assert len(groups) == 3
    assert all(len(completions) == 2 for completions in groups.values())  # the model's own samples, nothing added
    assert len(eval_rows) == 4
    assert all(set(row) == {"prompt", "completion", "reward", "answer"} for row in train_rows)
    for row in train_rows:
        assert row["prompt"][0]["role"] == "user"
        assert row["completion"][0]["role"] == "assistant"
        assert row["reward"] == task.reward(row["completion"][0]["content"], row["answer"])
        a, b = map(int, row["prompt"][0]["content"].removeprefix("What is ").split("?")[0].split(" + "))
        assert row["answer"] == a + b
    assert not {json.dumps(r["prompt"]) for r in train_rows} & {json.dumps(r["prompt"]) for r in eval_rows}

    results = load_script("train").main(
        ["--model", model_dir, "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--max_steps", "2"]
        + ["--batch_size", "4", "--logging_steps", "1", "--lora_r", "4", "--max_new_tokens", "4"]
    )
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert (output_dir / "smollm2_demo.png").stat().st_size > 10_000
    saved = json.loads((output_dir / "smollm2_demo.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["steps"] == 2
    assert saved["eval_prompts"] == 4
    for phase in ("before", "after"):
        assert set(saved[phase]) == {"mean_reward", "accuracy"}
        assert all(0.0 <= value <= 1.0 for value in saved[phase].values())
    assert math.isfinite(saved["train"]["final_loss"])
    assert saved["train"]["final_loss"] >= 0.0
