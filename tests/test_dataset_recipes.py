"""The public-dataset recipes on hand-written rows that copy each dataset's published schema (nothing is downloaded):
the recipe's own loading path (transform, dropped columns, renames, reward columns) gives the rows and rewards
computed here by hand, and `trl-rpo` trains on them for two steps with a tiny model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trl_rpo.cli import load_rpo_dataset, main, make_parser
from trl_rpo.data import RewardSpec, to_reward_rows


ROOT = Path(__file__).resolve().parents[1]
QWEN = ROOT / "recipes/qwen2.5-0.5b-instruct/rpo"


def _annotations(help_, honesty, follow, truth):
    def aspect(rating, typed=False):
        return {"Rating": rating, "Rationale": "..."} | (
            {"Type": ["1"], "Rationale For Rating": "..."} if typed else {}
        )

    return {
        "helpfulness": aspect(help_, True),
        "honesty": aspect(honesty),
        "instruction_following": aspect(follow),
        "truthfulness": aspect(truth, True),
    }


def _ultrafeedback_completion(response, ratings, fine_grained, overall=7.0):
    return {
        "model": "gpt-4", "principle": "helpfulness", "custom_system_prompt": "Be helpful.", "response": response,
        "annotations": _annotations(*ratings), "fine-grained_score": fine_grained, "overall_score": overall,
        "critique": "...",
    }  # fmt: skip


ULTRAFEEDBACK = [
    {
        "source": "evol_instruct", "instruction": "Name a prime.", "models": ["gpt-4", "starchat", "falcon", "llama"],
        "correct_answers": ["None"], "incorrect_answers": ["None"],
        "completions": [
            _ultrafeedback_completion("2", ("5", "5", "5", "5"), 5.0),
            _ultrafeedback_completion("4", ("1", "N/A", "2", "1"), 4 / 3),  # honesty not applicable
            _ultrafeedback_completion("9", ("2", "3", "3", "2"), None),  # no score: dropped and counted
            _ultrafeedback_completion("7", ("4", "4", "5", "4"), 4.25),
        ],
    },
    {
        "source": "sharegpt", "instruction": "Say hi.", "models": ["gpt-4", "starchat", "falcon", "wizardlm"],
        "correct_answers": ["None"], "incorrect_answers": ["None"],
        "completions": [
            _ultrafeedback_completion("hi", ("5", "5", "5", "4"), 4.75),
            _ultrafeedback_completion("", ("1", "1", "1", "1"), 1.0),  # no response: dropped and counted
            _ultrafeedback_completion("hello", ("4", "5", "4", "4"), 4.25),
            _ultrafeedback_completion("bye", ("1", "2", "1", "2"), 1.5),
        ],
    },
]  # fmt: skip

ARMORM = [
    {
        "prompt_id": "a1", "prompt": "Name a prime.",
        "all_generated_responses": ["2", "3", "4", "5", "2"], "all_rm_scores": [0.1, 0.08, -0.05, 0.07, 0.1],
        "chosen": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "2"}],
        "rejected": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "4"}],
    },
    {
        "prompt_id": "b2", "prompt": "Say hi.",
        "all_generated_responses": ["hi", "hello", "bye", "hey", "no"], "all_rm_scores": [0.05, 0.06, -0.1, 0.0, -0.2],
        "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "no"}],
    },
]  # fmt: skip

HELPSTEER2 = [  # two responses per prompt, consecutive rows; attributes 0-4
    {"prompt": "Name a prime.", "response": "2", "helpfulness": 4, "correctness": 4, "coherence": 4,
     "complexity": 1, "verbosity": 0},
    {"prompt": "Name a prime.", "response": "4 is prime, as everyone knows.", "helpfulness": 0, "correctness": 0,
     "coherence": 3, "complexity": 1, "verbosity": 2},
    {"prompt": "Say hi.", "response": "hi", "helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 0,
     "verbosity": 1},
    {"prompt": "Say hi.", "response": "bye", "helpfulness": 1, "correctness": 1, "coherence": 3, "complexity": 0,
     "verbosity": 1},
]  # fmt: skip
HELPSTEER2_WEIGHTS = (0.3, 0.74, 0.46, 0.47, -0.33)  # Nemotron-4-340B-Reward model card
ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def _shp(post, history, a, b, score_a, score_b):
    return {
        "post_id": post, "domain": "askculinary_train", "upvote_ratio": 0.95, "history": history,
        "c_root_id_A": f"{post}a", "c_root_id_B": f"{post}b", "created_at_utc_A": 1, "created_at_utc_B": 2,
        "score_A": score_a, "score_B": score_b, "human_ref_A": a, "human_ref_B": b, "labels": int(score_a > score_b),
        "seconds_difference": 1.0, "score_ratio": max(score_a, score_b) / min(score_a, score_b),
    }  # fmt: skip


SHP = [
    _shp("p1", "How long to boil an egg?", "Nine minutes.", "Forever.", 40, 2),
    _shp("p1", "How long to boil an egg?", "Nine minutes.", "Ten, then ice.", 40, 30),  # ratio 1.33: left out
    _shp("p2", "Best knife?", "A chef's knife.", "A spoon.", 12, 3),
]


RECIPES = {
    "ultrafeedback": (QWEN / "config_ultrafeedback.yaml", ULTRAFEEDBACK),
    "armorm": (ROOT / "recipes/llama-3-8b-instruct/rpo/config_armorm_lora.yaml", ARMORM),
    "helpsteer2": (QWEN / "config_helpsteer2.yaml", HELPSTEER2),
    "shp": (QWEN / "config_shp.yaml", SHP),
}


def _rows_of(name):
    """(prompt, completion, reward before normalisation) as the recipe should read its fixture."""
    if name == "ultrafeedback":
        kept = [(r["instruction"], c) for r in ULTRAFEEDBACK for c in r["completions"]]
        kept = [(p, c) for p, c in kept if c["response"] and c["fine-grained_score"] is not None]
        return [(p, c["response"], c["fine-grained_score"]) for p, c in kept]
    if name == "armorm":
        pairs = [(r["prompt"], zip(r["all_generated_responses"], r["all_rm_scores"], strict=True)) for r in ARMORM]
        return [(prompt, c, s) for prompt, scored in pairs for c, s in scored]
    if name == "helpsteer2":
        return [
            (r["prompt"], r["response"], sum(w * r[a] for w, a in zip(HELPSTEER2_WEIGHTS, ATTRIBUTES, strict=True)))
            for r in HELPSTEER2
        ]
    log1p = lambda v: math.copysign(math.log1p(abs(v)), v)  # noqa: E731
    pairs = [r for r in SHP if r["score_ratio"] >= 2]
    return [(r["history"], r[f"human_ref_{s}"], log1p(r[f"score_{s}"])) for r in pairs for s in "AB"]


def _recipe_args(recipe: Path, data_file: Path, output_dir: Path, model_dir: str, *extra: str):
    overrides = ["--dataset_name", str(data_file), "--output_dir", str(output_dir), "--model_name_or_path", model_dir]
    overrides += ["--eval_strategy", "no", "--max_steps", "2", "--bf16", "false", "--dtype", "float32"]
    overrides += ["--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--max_length", "64"]
    return make_parser().parse_args_and_config(args=["--config", str(recipe), *overrides, *extra])


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name their transforms relative to the repository root, like their launch


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_reads_its_dataset(name, tmp_path, model_dir, at_root, caplog):
    recipe, fixture = RECIPES[name]
    data_file = tmp_path / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in fixture))
    script_args, training_args, _, dataset_args = _recipe_args(recipe, data_file, tmp_path / "out", model_dir)
    split = load_rpo_dataset(script_args, dataset_args)["train"]
    rows = to_reward_rows(split, "train", reward_spec=RewardSpec.from_config(training_args))
    expected = _rows_of(name)
    assert list(zip(rows["prompt"], rows["completion"], strict=True)) == [(p, c) for p, c, _ in expected]
    np.testing.assert_allclose(rows["reward"], [r for *_, r in expected], rtol=1e-12)
    if name == "ultrafeedback":
        assert "dropped 2 of 8 completions" in caplog.text
        assert split["honesty"][0] == [5.0, 4 / 3, 4.0]  # "N/A" takes the completion's fine-grained score
    if name == "shp":
        assert "kept 2 of 3 pairs" in caplog.text


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains(name, tmp_path, model_dir, at_root):
    recipe, fixture = RECIPES[name]
    data_file = tmp_path / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in fixture))
    main(*_recipe_args(recipe, data_file, tmp_path / "out", model_dir))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "trl-rpo" in card
