"""Iterative RPO (`iterate_rpo`, `trl-rpo iterate`): each round samples from the policy the previous round trained,
trains with that policy as the reference and the Monte-Carlo partition (or, anchored, the initial reference and the
empirical one), and records its data, model and held-out reward."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import trl_rpo.iterate as iterate_module
from trl_rpo import RPOTrainer
from trl_rpo.iterate import ROUNDS_FILE, iterate_rpo, rounds_table


def longer_is_better(completions, **kwargs):  # GRPOTrainer's reward-function signature
    return [len(c) / 10 for c in completions]


def shorter_is_better(completions, **kwargs):
    return [-len(c) / 10 for c in completions]


PROMPTS = Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 3 =", "4 + 4 ="]})
HELD_OUT = Dataset.from_dict({"prompt": ["5 + 1 =", "3 + 3 ="]})


@pytest.fixture
def trainer_calls(monkeypatch) -> list[dict]:
    """What each round handed to RPOTrainer: the policy it started from, the reference, the estimator, the rows."""
    calls, real = [], iterate_module.RPOTrainer

    def spy(model, ref_model=None, args=None, train_dataset=None, **kwargs):
        trainer = real(model, ref_model=ref_model, args=args, train_dataset=train_dataset, **kwargs)
        calls.append({"model": model, "ref_model": ref_model, "estimator": args.partition_estimator})
        calls[-1] |= {"rows": train_dataset, "trainer": trainer}
        return trainer

    monkeypatch.setattr(iterate_module, "RPOTrainer", spy)
    return calls


def _run(model_dir, tmp_path, make_args, **kwargs):
    args = make_args(output_dir=str(tmp_path / "iter"), max_steps=2, learning_rate=0.05)
    options = {"rounds": 2, "reward_funcs": [longer_is_better], "num_generations": 3, "eval_prompts": HELD_OUT}
    options["generation_kwargs"] = {"max_new_tokens": 6, "batch_size": 4}
    return iterate_rpo(model_dir, PROMPTS, args, **(options | kwargs))


def test_each_round_samples_from_and_is_regularised_towards_the_previous_policy(
    model_dir, tmp_path, make_args, trainer_calls
):
    results = _run(model_dir, tmp_path, make_args)
    rounds = tmp_path / "iter"
    assert [r.round for r in results] == [0, 1, 2]
    assert results[1].model == str(rounds / "round-1" / "model")
    # round k samples from the policy that round k - 1 trained ...
    for k, expected in ((1, model_dir), (2, results[1].model)):
        config = json.loads((rounds / f"round-{k}" / "samples" / "generation_config.json").read_text())
        assert config["model"] == expected
        # ... and trains from it, with it as the reference (ref_model=None: the initial policy) and the MC partition
        assert trainer_calls[k - 1]["model"] == expected
        assert trainer_calls[k - 1]["ref_model"] is None
        assert trainer_calls[k - 1]["estimator"] == "monte_carlo"
        assert len(trainer_calls[k - 1]["rows"]) == 3 * 3 == results[k].train_rows
    # the round-2 reference log-probs are the round-1 policy's, not the initial model's
    used = torch.tensor(trainer_calls[1]["trainer"].train_dataset["ref_logps"])
    rows = trainer_calls[1]["rows"]
    for policy, same in ((results[1].model, True), (model_dir, False)):
        check = RPOTrainer(policy, args=make_args(output_dir=str(tmp_path / "check")), train_dataset=rows)
        assert torch.allclose(used, torch.tensor(check.train_dataset["ref_logps"]), atol=1e-6) == same
    # the recorded rewards are the mean rewards of the scored files
    for k in (1, 2):
        scored = [json.loads(line) for line in (rounds / f"round-{k}" / "scored.jsonl").read_text().splitlines()]
        assert results[k].train_reward == pytest.approx(sum(r["reward"] for r in scored) / len(scored))
        assert results[k].train_reward == pytest.approx(sum(len(r["completion"]) / 10 for r in scored) / len(scored))
    assert all(math.isfinite(r.eval_reward) for r in results)
    for k in (1, 2):  # the share of samples cut at the limit, read from the samples' `finished`
        finished = [json.loads(line)["finished"] for line in
                    (rounds / f"round-{k}" / "samples" / "completions.jsonl").read_text().splitlines()]  # fmt: skip
        assert results[k].train_cut == pytest.approx(1 - sum(finished) / len(finished))
    assert 0 <= results[0].eval_cut <= 1
    saved = json.loads((rounds / ROUNDS_FILE).read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert [row["round"] for row in saved["rounds"]] == [0, 1, 2]
    assert [row["model"] for row in saved["rounds"]] == [model_dir, "round-1/model", "round-2/model"]  # relative
    assert saved["settings"]["training"]["learning_rate"] == 0.05
    # every round samples with its own seed, and its model has a model card
    seeds = [json.loads((rounds / f"round-{k}" / "samples" / "generation_config.json").read_text())["seed"]
             for k in (1, 2)]  # fmt: skip
    assert seeds[0] != seeds[1]
    for k in (1, 2):
        assert "RPO" in (rounds / f"round-{k}" / "model" / "README.md").read_text()
    assert (rounds / "rounds.png").read_bytes().startswith(b"\x89PNG")  # the plot beside the table
    table = rounds_table(results)
    assert table.count("\n") == 4
    assert "held-out reward" in table


def test_a_rerun_skips_the_rounds_it_has(model_dir, tmp_path, make_args, trainer_calls):
    _run(model_dir, tmp_path, make_args, rounds=1)
    assert len(trainer_calls) == 1
    results = _run(model_dir, tmp_path, make_args, rounds=2)
    assert len(trainer_calls) == 2  # only round 2 trained the second time
    assert trainer_calls[1]["model"] == results[1].model


@pytest.mark.parametrize("damage", [b'[{"round": 0, "mod', b"\x8a\x00\xff" * 40, b'[{"round": 0}]', b"[1, 2]"])
def test_a_damaged_round_record_stops_with_the_file_and_the_fix(model_dir, tmp_path, make_args, damage):
    _run(model_dir, tmp_path, make_args, rounds=1)
    record = tmp_path / "iter" / ROUNDS_FILE
    record.write_bytes(damage)
    with pytest.raises(ValueError, match=f"finished rounds {record} is damaged.*Restore it, or delete it"):
        _run(model_dir, tmp_path, make_args, rounds=1)


def test_a_rerun_from_another_directory_finds_its_rounds(model_dir, tmp_path, make_args, trainer_calls, monkeypatch):
    """`output_dir` given relative to the working directory: a rerun from elsewhere (the same folder, reached by
    another relative path) sees the finished rounds instead of training them all again."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    options = {"rounds": 1, "reward_funcs": [longer_is_better], "num_generations": 2}
    options["generation_kwargs"] = {"max_new_tokens": 4, "batch_size": 4}
    iterate_rpo(model_dir, PROMPTS, make_args(output_dir="iter", max_steps=1), **options)
    monkeypatch.chdir(tmp_path / "a" / "b")
    results = iterate_rpo(model_dir, PROMPTS, make_args(output_dir="../iter", max_steps=1), **options)
    assert len(trainer_calls) == 1  # nothing trained again
    assert Path(results[1].model).resolve() == (tmp_path / "a" / "iter" / "round-1" / "model").resolve()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"args": {"learning_rate": 0.01}}, "training.learning_rate=0.05 there, 0.01 now"),
        ({"num_generations": 2}, "num_generations=3 there, 2 now"),
        ({"reward_funcs": [shorter_is_better]}, "reward_funcs="),
        ({"prompts": HELD_OUT}, "different prompts"),
    ],
)
def test_a_rerun_with_other_settings_is_refused(model_dir, tmp_path, make_args, trainer_calls, change, named):
    _run(model_dir, tmp_path, make_args, rounds=1)
    training = {"learning_rate": 0.05} | change.pop("args", {})
    args = make_args(output_dir=str(tmp_path / "iter"), max_steps=2, **training)
    options = {"rounds": 2, "reward_funcs": [longer_is_better], "num_generations": 3, "eval_prompts": HELD_OUT}
    options |= {"generation_kwargs": {"max_new_tokens": 6, "batch_size": 4}}
    prompts = change.pop("prompts", PROMPTS)
    with pytest.raises(ValueError, match=f"other settings \\(.*{re.escape(named)}.*another `output_dir`"):
        iterate_rpo(model_dir, prompts, args, **(options | change))
    assert len(trainer_calls) == 1


def test_a_crashed_round_resumes_from_its_last_checkpoint(model_dir, tmp_path, make_args, monkeypatch):
    """Round 1 dies after its checkpoint at step 2 of 4: the rerun goes on from step 2, not from step 0."""
    args = make_args(output_dir=str(tmp_path / "iter"), max_steps=4, learning_rate=0.05, save_strategy="steps",
                     save_steps=2)  # fmt: skip
    options = {"rounds": 1, "reward_funcs": [longer_is_better], "num_generations": 2}
    options["generation_kwargs"] = {"max_new_tokens": 4, "batch_size": 4}

    def crash(self, *a, **k):
        raise KeyboardInterrupt("killed after the checkpoint")

    real_step = RPOTrainer.training_step
    steps = []

    def counting_step(self, *a, **k):
        steps.append(self.state.global_step)
        if self.state.global_step == 2 and len(steps) == 3:
            crash(self)
        return real_step(self, *a, **k)

    monkeypatch.setattr(RPOTrainer, "training_step", counting_step)
    with pytest.raises(KeyboardInterrupt):
        iterate_rpo(model_dir, PROMPTS, args, **options)
    assert (tmp_path / "iter" / "round-1" / "train" / "checkpoint-2").is_dir()
    steps.clear()
    results = iterate_rpo(model_dir, PROMPTS, args, **options)
    assert steps == [2, 3]  # resumed at step 2
    assert Path(results[1].model).is_dir()


def test_the_model_dtype_is_honoured_by_every_round(model_dir, tmp_path, make_args):
    args = make_args(output_dir=str(tmp_path / "iter"), max_steps=1, model_init_kwargs={"dtype": "bfloat16"})
    options = {"rounds": 2, "reward_funcs": [longer_is_better], "num_generations": 2}
    options["generation_kwargs"] = {"max_new_tokens": 4, "batch_size": 4}
    results = iterate_rpo(model_dir, PROMPTS, args, **options)
    for k in (1, 2):
        assert json.loads((Path(results[k].model) / "config.json").read_text())["dtype"] == "bfloat16"
        record = json.loads((tmp_path / "iter" / f"round-{k}" / "samples" / "generation_config.json").read_text())
        assert record["dtype"] == "bfloat16"


def test_anchored_rounds_keep_the_initial_reference(model_dir, tmp_path, make_args, trainer_calls):
    _run(model_dir, tmp_path, make_args, anchor_to_initial_reference=True, eval_prompts=None)
    references = [call["ref_model"] for call in trainer_calls]
    assert references[0] is references[1] is not None
    assert [call["estimator"] for call in trainer_calls] == ["empirical", "empirical"]
    assert trainer_calls[1]["model"].endswith("round-1/model")  # samples and policy still move
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for name, value in references[0].state_dict().items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)


def test_lora_rounds_merge_the_adapter_into_the_next_policy(model_dir, tmp_path, make_args):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    results = _run(model_dir, tmp_path, make_args, rounds=1, peft_config=peft_config, eval_prompts=None)
    folder = Path(results[1].model)
    assert (folder / "model.safetensors").is_file()
    assert not (folder / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert set(merged) == set(initial)
    assert any(not torch.equal(merged[name], initial[name]) for name in initial)


def test_cli_prints_the_table(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS["prompt"]))
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def longer(completions, **kwargs):\n    return [len(c) / 10 for c in completions]\n")
    command = [sys.executable, "-m", "trl_rpo", "iterate", "--model_name_or_path", model_dir]
    command += [
        "--dataset_name",
        str(prompts),
        "--eval_dataset_name",
        str(prompts),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    command += ["--reward_funcs", f"{rewards}:longer", "--rounds", "2", "--num_generations", "2"]
    command += ["--max_new_tokens", "4", "--max_steps", "1", "--report_to", "none", "--bf16", "false"]
    command += ["--save_strategy", "no", "--cache_ref_log_probs", "false"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| round | samples |" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith("| ") and "`" in line]) == 3
    assert (tmp_path / "o" / "round-2" / "model" / "model.safetensors").is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    for k in (1, 2):  # said at the default log level, with nothing trained again
        assert f"Round {k}: finished in {tmp_path / 'o' / 'rounds.json'}, skipped." in again.stderr
