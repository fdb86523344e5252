"""The real-model demo (`examples/smollm2_demo/`): its reward function on hand-written answers, and both scripts end
to end on the tiny offline model: data made by `trl-rpo generate` + `trl-rpo score` (their Python API, and the
commands the script prints), then trained on (the real run, on SmolLM2-135M-Instruct, takes minutes and is
`make demo`)."""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from trl_rpo import score_completions
from trl_rpo.cli import cli


DEMO_DIR = Path(__file__).resolve().parents[1] / "examples" / "smollm2_demo"
sys.path.insert(0, str(DEMO_DIR))  # the scripts import their sibling modules by name, as when run directly

import task  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


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


def test_addition_reward_is_the_reward_with_grpo_signature():
    completions = ["7", "3 + 4 = 8", "none", ""]
    expected = [1.0, task.reward("3 + 4 = 8", 7), 0.0, None]  # empty: no reward, the row is dropped
    assert task.addition_reward(completions, answer=[7] * 4) == expected
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    assert task.addition_reward(conversational, answer=[7] * 4, prompts=[[]] * 4, trainer_state=None) == expected

    rows = Dataset.from_dict({"prompt": ["What is 3 + 4?"] * 4, "completion": completions, "answer": [7] * 4})
    scored = score_completions(rows, task.addition_reward)
    assert scored["completion"] == completions[:3]
    assert scored["reward"] == expected[:3]


def test_generate_then_train_end_to_end(model_dir, tmp_path):
    """generate_data.py makes the data with generate_completions + score_completions, its printed `trl-rpo generate`
    / `trl-rpo score` commands make the same rows, and train.py trains on them."""
    data_dir, output_dir = tmp_path / "data", tmp_path / "out"
    generate_data = load_script("generate_data")
    args = ["--model", model_dir, "--output_dir", str(data_dir), "--num_train_prompts", "3"]
    args += ["--num_generations", "2", "--num_eval", "4", "--max_new_tokens", "6"]
    generate_data.main(args)
    train_rows = read_jsonl(data_dir / "train.jsonl")
    eval_rows = read_jsonl(data_dir / "eval.jsonl")
    samples = read_jsonl(data_dir / "samples" / "completions.jsonl")  # generate_completions' output, unscored
    settings = json.loads((data_dir / "samples" / "generation_config.json").read_text())
    assert {k: settings[k] for k in ("num_generations", "temperature", "top_k", "max_new_tokens", "num_prompts")} == {
        "num_generations": 2,
        "temperature": 0.7,  # the shipped data's settings
        "top_k": 50,
        "max_new_tokens": 6,
        "num_prompts": 3,
    }
    assert len(samples) == 3 * 2
    kept = [row for row in samples if row["completion"][0]["content"]]  # an empty answer has no reward: dropped
    assert len(train_rows) == len(kept)
    assert len(eval_rows) == 4
    assert all(set(row) == {"prompt", "completion", "reward", "answer"} for row in train_rows)
    for row, sample in zip(train_rows, kept, strict=True):  # the model's own samples, in order, nothing added
        assert {k: row[k] for k in ("prompt", "completion", "answer")} == {
            k: sample[k] for k in ("prompt", "completion", "answer")
        }
        assert row["prompt"][0]["role"] == "user"
        assert row["completion"][0]["role"] == "assistant"
        assert row["reward"] == task.reward(row["completion"][0]["content"], row["answer"])
        a, b = map(int, row["prompt"][0]["content"].removeprefix("What is ").split("?")[0].split(" + "))
        assert row["answer"] == a + b
    assert len({json.dumps(r["prompt"]) for r in train_rows}) == 3
    assert not {json.dumps(r["prompt"]) for r in train_rows} & {json.dumps(r["prompt"]) for r in eval_rows}

    # The CLI path the script prints, run in a fresh folder on the prompts it wrote: the same rows and rewards.
    cli_dir = tmp_path / "cli"
    cli_dir.mkdir()
    shutil.copy(data_dir / "samples" / "prompts.jsonl", cli_dir / "prompts.jsonl")
    commands = generate_data.cli_commands(generate_data.parse_args(args), model_dir, cli_dir)
    assert [command[:2] for command in commands] == [["trl-rpo", "generate"], ["trl-rpo", "score"]]
    for command in commands:
        cli(command[1:])
    scored = read_jsonl(cli_dir / "scored.jsonl")
    assert [{k: row[k] for k in generate_data.TRAIN_COLUMNS} for row in scored] == train_rows

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


def test_iterate_demo_asks_for_answers_that_finish():
    """`make demo-iterate` puts the short-answer system prompt before every shipped question (train and held-out),
    keeps each question's answer, and lets answers run to 96 new tokens; `--system ''` drops the system prompt."""
    iterate = load_script("iterate")
    assert iterate.parse_args([]).max_new_tokens == 96
    for name in ("train.jsonl", "eval.jsonl"):
        rows = read_jsonl(DEMO_DIR / "data" / name)
        questions = {json.dumps(row["prompt"]): row["answer"] for row in rows}
        prompts = iterate.prompts_of(DEMO_DIR / "data" / name, None)
        assert len(prompts) == len(questions)  # one row per distinct question, none lost
        for prompt, answer in zip(prompts["prompt"], prompts["answer"], strict=True):
            assert prompt[0] == {"role": "system", "content": iterate.SYSTEM}
            assert questions[json.dumps(prompt[1:])] == answer
        assert iterate.prompts_of(DEMO_DIR / "data" / name, None, "")["prompt"][0][0]["role"] == "user"
