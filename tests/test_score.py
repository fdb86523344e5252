"""`score_completions` and `trl-rpo score` (SPEC §7): reward functions named `module:function` or `file.py:function`
with GRPOTrainer's `reward_funcs` signature, a sequence-classification reward model, weighted sums, rows without a
reward dropped and counted, errors that name the fix, and generate → score → train end to end."""

import json
import logging
import textwrap

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

from trl_rpo import RPOTrainer, generate_completions, score_completions
from trl_rpo.cli import cli
from trl_rpo.scoring import describe_rewards


MODULE = "rpo_test_rewards"  # written by the `rewards_file` fixture, importable once it ran
REWARDS = """
    import asyncio


    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]


    def matches_answer(prompts, completions, answer, **kwargs):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


    def skip_second_prompt(completions, prompt_index, **kwargs):
        return [None if i == 1 else 0.5 for i in prompt_index]


    def nan_when_long(completions, **kwargs):
        return [float("nan") if len(c) > 2 else 0.0 for c in completions]


    def one_reward(completions, **kwargs):
        return [1.0]


    def text_reward(completions, **kwargs):
        return ["good" for c in completions]


    def grpo_kwargs(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **kwargs):
        log_metric("seen", len(completions))
        log_extra("note", ["x"] * len(completions))
        return [trainer_state.global_step + len(ids) for ids in completion_ids]


    async def async_length(completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]


    def message_length(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]
"""
ROWS = {
    "prompt": ["1 + 1 =", "1 + 1 =", "2 + 2 =", "2 + 2 ="],
    "completion": [" 2", " 11", " 4", " 5"],
    "answer": ["2", "2", "4", "4"],
    "prompt_index": [0, 0, 1, 1],
}


@pytest.fixture
def rewards_file(tmp_path, monkeypatch) -> str:
    """A Python file of reward functions, also importable as the module `rpo_test_rewards`."""
    path = tmp_path / f"{MODULE}.py"
    path.write_text(textwrap.dedent(REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return str(path)


@pytest.fixture(scope="module")
def reward_model_dir(model_dir, tmp_path_factory) -> str:
    """A tiny random Llama reward model (one output) with the tiny model's tokenizer, which has a chat template."""
    config = AutoConfig.from_pretrained(model_dir)
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores that differ visibly from row to row
    folder = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return str(folder)


def _direct_score(folder: str, text: str) -> float:
    """The reward model's output on one text, by hand: one forward, no batching or padding."""
    model = LlamaForSequenceClassification.from_pretrained(folder).eval()
    inputs = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**inputs).logits[0, 0].item()


@pytest.mark.parametrize("by_module", [f"{MODULE}:length", f"{MODULE}.length"], ids=["colon", "dotted"])
def test_functions_by_module_and_by_file_combine_as_a_weighted_sum(rewards_file, by_module):
    scored = score_completions(
        Dataset.from_dict(ROWS), [by_module, f"{rewards_file}:matches_answer"], reward_weights=[0.5, 2.0]
    )
    assert scored["reward_length"] == [2.0, 3.0, 2.0, 2.0]
    assert scored["reward_matches_answer"] == [1.0, 0.0, 1.0, 0.0]
    assert scored["reward"] == [3.0, 1.5, 3.0, 1.0]  # 0.5 · length + 2 · matches_answer
    assert scored["answer"] == ROWS["answer"]  # the other columns stay


def test_an_error_in_a_reward_function_names_it_and_the_rows(rewards_file):
    def exact(completions, answer, **kwargs):
        return [1.0 / (c.strip() == a) for c, a in zip(completions, answer, strict=True)]  # fails on a wrong answer

    with pytest.raises(RuntimeError, match=r"'exact' raised ZeroDivisionError: .* 2 row\(s\) \(indices 0, 1\)"):
        score_completions(Dataset.from_dict(ROWS), [exact], batch_size=2)
    with pytest.raises(RuntimeError, match=r"indices 1\)") as raised:  # the second row here, the first wrong answer
        score_completions(Dataset.from_dict(ROWS).select([2, 3]), [f"{MODULE}:length", exact], batch_size=1)
    assert isinstance(raised.value.__cause__, ZeroDivisionError)  # the user's traceback is kept


@pytest.mark.parametrize(
    ("func", "kept", "dropped"),
    [("skip_second_prompt", [0, 1], "2 row(s) (indices 2, 3)"), ("nan_when_long", [0, 2, 3], "1 row(s) (indices 1)")],
)
def test_rows_without_a_reward_are_dropped_and_counted(rewards_file, caplog, func, kept, dropped):
    with caplog.at_level(logging.WARNING):
        scored = score_completions(Dataset.from_dict(ROWS), [f"{MODULE}:length", f"{MODULE}:{func}"])
    assert scored["completion"] == [ROWS["completion"][i] for i in kept]
    assert f"Dropped {dropped} of 4" in caplog.text
    assert f"'reward_{func}': {4 - len(kept)}" in caplog.text
    assert "'reward_length': 0" in caplog.text


def test_reward_functions_get_grpo_keyword_arguments(rewards_file, tokenizer):
    scored = score_completions(
        Dataset.from_dict(ROWS), [f"{MODULE}:grpo_kwargs", f"{MODULE}:async_length"], processing_class=tokenizer
    )
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in ROWS["completion"]]
    assert scored["reward_grpo_kwargs"] == [float(n) for n in lengths]  # step 0 of a fresh TrainerState + ids
    assert scored["reward_async_length"] == [2.0, 3.0, 2.0, 2.0]
    assert "note" not in scored.column_names


def test_log_metric_values_reach_the_command_output(rewards_file, model_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    Dataset.from_dict(ROWS).to_json(data)
    cli(["score", "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--batch_size", "2",
         "--reward_funcs", f"{MODULE}:grpo_kwargs", "--tokenizer_name_or_path", model_dir])  # fmt: skip
    assert "seen: 2 (mean over 2 batches)" in capsys.readouterr().err  # len(completions) per batch, averaged


def test_a_reward_model_scores_like_a_direct_forward(reward_model_dir):
    scored = score_completions(Dataset.from_dict(ROWS), reward_model=reward_model_dir, batch_size=4)
    (column,) = [c for c in scored.column_names if c.startswith("reward_")]
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    for row in (1, 2):  # rows of different lengths in one padded batch
        # standard rows, and the tokenizer has a chat template: a user turn and an assistant turn
        messages = [
            {"role": "user", "content": ROWS["prompt"][row]},
            {"role": "assistant", "content": ROWS["completion"][row]},
        ]
        expected = _direct_score(reward_model_dir, tokenizer.apply_chat_template(messages, tokenize=False))
        assert scored[column][row] == pytest.approx(expected, abs=1e-5)
    assert scored["reward"] == scored[column]
    assert len(set(scored["reward"])) == 4


def test_conversational_rows(rewards_file, reward_model_dir):
    rows = {
        "prompt": [[{"role": "user", "content": p}] for p in ROWS["prompt"]],
        "completion": [[{"role": "assistant", "content": c.strip()}] for c in ROWS["completion"]],
    }
    scored = score_completions(
        Dataset.from_dict(rows), [f"{MODULE}:message_length"], reward_model=reward_model_dir, reward_weights=[1, 0]
    )
    assert scored["reward"] == [1.0, 2.0, 1.0, 1.0]
    model_column = scored.column_names[-2]
    text = AutoTokenizer.from_pretrained(reward_model_dir).apply_chat_template(
        rows["prompt"][1] + rows["completion"][1], tokenize=False
    )
    assert scored[model_column][1] == pytest.approx(_direct_score(reward_model_dir, text), abs=1e-5)


@pytest.mark.parametrize(
    ("spec", "weights", "match"),
    [
        (f"{MODULE}:missing", None, r"defines no 'missing'.*'length'.*Fix the name"),
        ("no_such_module_xyz:reward", None, "cannot import module 'no_such_module_xyz'.*PYTHONPATH"),
        ("missing/rewards.py:reward", None, "no file missing/rewards.py"),
        (f"{MODULE}:", None, "not a 'module:function' spec"),
        (f"{MODULE}.missing", None, r"defines no 'missing'"),
        (f"{MODULE}:one_reward", None, "returned 1 rewards for 4 completions.*one float"),
        (f"{MODULE}:text_reward", None, "returned text.*Return a float"),
        (f"{MODULE}:length", [1.0, 2.0], "2 reward weight.*1 reward source.*one weight per source"),
    ],
)
def test_bad_reward_specs_name_the_fix(rewards_file, spec, weights, match):
    with pytest.raises(ValueError, match=match):
        score_completions(Dataset.from_dict(ROWS), [spec], reward_weights=weights)


def test_the_reward_distribution_and_the_prompts_rpo_cannot_learn_from():
    rows = {
        "prompt": ["a", "a", "b", "b", "b", "c", "d", "d"],
        "reward": [1.0, 0.0, 0.5, 0.5, 0.5, 2.0, 3.0, 3.0],
    }
    text = describe_rewards(Dataset.from_dict(rows))
    # mean 10.5 / 8, sd √(9.969 / 8); quantiles of [0, .5, .5, .5, 1, 2, 3, 3] by linear interpolation: .5, .75, 2.25
    assert "Rewards of 8 rows: mean 1.312, sd 1.116, 5 distinct;" in text
    assert "min 0 | 25% 0.5 | median 0.75 | 75% 2.25 | max 3." in text
    assert "4 prompts: 1 with completions of different rewards, 2 whose completions all have one reward" in text
    assert "1 with a single completion" in text
    conversational = Dataset.from_dict({"prompt": [[{"role": "user", "content": "d"}]] * 2, "reward": [1.0, 1.0]})
    assert "1 prompts: 0 with completions of different rewards, 1 whose" in describe_rewards(conversational)


def test_score_command(rewards_file, reward_model_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    Dataset.from_dict({**ROWS, "response": ROWS["completion"]}).remove_columns("completion").to_json(data)
    out = tmp_path / "scored"
    cli(["score", "--dataset_name", str(data), "--completion_column", "response", "--output_dir", str(out),
         "--reward_funcs", f"{MODULE}:length", f"{rewards_file}:matches_answer",
         "--reward_model_name_or_path", reward_model_dir, "--reward_weights", "0.5", "2", "0.25"])  # fmt: skip
    rows = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    assert [row["completion"] for row in rows] == ROWS["completion"]
    model_column = [
        c for c in rows[0] if c.startswith("reward_") and c not in ("reward_length", "reward_matches_answer")
    ]
    for row in rows:
        expected = 0.5 * row["reward_length"] + 2 * row["reward_matches_answer"] + 0.25 * row[model_column[0]]
        assert row["reward"] == pytest.approx(expected, abs=1e-12)
    rewards = [row["reward"] for row in rows]
    printed = capsys.readouterr().out
    assert f"Rewards of 4 rows: mean {sum(rewards) / 4:.4g}" in printed
    assert "2 prompts:" in printed
    config = json.loads((out / "scoring_config.json").read_text())
    assert config["reward_weights"] == [0.5, 2.0, 0.25]
    assert (config["rows_in"], config["rows_out"]) == (4, 4)


def test_a_failed_rerun_leaves_no_current_looking_output(rewards_file, tmp_path):
    """The earlier `scored.jsonl` is set aside before scoring: after a failed rerun only `scored.jsonl.previous` is
    there; after a successful one, only the new outputs."""
    data = tmp_path / "rows.jsonl"
    Dataset.from_dict(ROWS).to_json(data)
    out = tmp_path / "scored"
    command = ["score", "--dataset_name", str(data), "--output_dir", str(out), "--reward_funcs"]
    cli([*command, f"{MODULE}:length"])
    first = (out / "scored.jsonl").read_text()
    with pytest.raises(ValueError, match="text_reward"):
        cli([*command, f"{MODULE}:text_reward"])  # returns text: refused mid-scoring
    assert sorted(p.name for p in out.iterdir()) == ["scored.jsonl.previous", "scoring_config.json.previous"]
    assert (out / "scored.jsonl.previous").read_text() == first
    cli([*command, f"{MODULE}:matches_answer"])
    assert sorted(p.name for p in out.iterdir()) == ["scored.jsonl", "scoring_config.json"]
    assert [json.loads(line)["reward"] for line in (out / "scored.jsonl").read_text().splitlines()] == [1, 0, 1, 0]


def test_generate_score_train(model_dir, rewards_file, make_args, tmp_path):
    """The path of SPEC §7: sample from the model, score the samples, train RPO on them (Monte-Carlo partition,
    valid since the samples are the reference's own at temperature 1)."""
    prompts = Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 =", "3 + 3 ="], "answer": ["2", "4", "6"]})
    samples = generate_completions(
        prompts, model=model_dir, output_dir=tmp_path / "samples", num_generations=4, max_new_tokens=6
    )
    scored = score_completions(samples, [f"{MODULE}:length", f"{MODULE}:matches_answer"])
    trainer = RPOTrainer(
        model=model_dir,
        args=make_args(max_steps=2, partition_estimator="monte_carlo", logps_aggregation="sum"),
        train_dataset=scored,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(trainer.train_dataset) == 12
