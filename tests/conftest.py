"""Offline fixtures: a tiny Llama and a byte-level BPE tokenizer built in-process, small datasets, CPU configs."""

import os

import datasets
import pytest
import torch
from datasets import Dataset


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# The models are tiny: a second thread only adds synchronisation (10x slower matmuls when the other core is busy).
torch.set_num_threads(1)

from trl_rpo import RPOConfig  # noqa: E402
from trl_rpo.testing import build_causal_lm, build_tokenizer, save_tiny_causal_lm, save_tiny_seq2seq_lm  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> str:
    """The tiny Llama's architecture and tokenizer with other weights (another seed)."""
    tokenizer = build_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-llama-seed1")
    build_causal_lm(tokenizer, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory) -> str:
    return save_tiny_seq2seq_lm(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    """Each test, and every process it starts, gets its own `datasets` cache, so no test sees another's files."""
    cache = str(tmp_path / "hf_datasets_cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", cache)


@pytest.fixture
def make_args(tmp_path):
    def make(config_class=RPOConfig, **kwargs) -> RPOConfig:
        defaults = {
            "output_dir": str(tmp_path / "out"),
            "report_to": "none",
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4,
            "max_steps": 3,
            "logging_steps": 1,
            "learning_rate": 0.1,
            "save_strategy": "no",
            "disable_tqdm": True,
            "bf16": False,  # the tests check maths to 1e-5; bf16 is checked by benchmarks/gpu_check.py
            # Every target pass runs its reference forward: the cache is tested where its name says so.
            "cache_ref_log_probs": False,
        }
        return config_class(**{**defaults, **kwargs})

    return make


def reward_rows(num_prompts: int = 4, completions_per_prompt: int = 3) -> dict[str, list]:
    """Arithmetic prompts, each with several completions; reward = 1 for the right sum, else −|error|/4."""
    rows = {"prompt": [], "completion": [], "reward": []}
    for p in range(num_prompts):
        answer = p + p + 1
        for c in range(completions_per_prompt):
            guess = answer + c - 1
            rows["prompt"].append(f"{p} + {p + 1} =")
            rows["completion"].append(f" {guess}")
            rows["reward"].append(1.0 if guess == answer else -abs(guess - answer) / 4)
    return rows


@pytest.fixture
def reward_dataset() -> Dataset:
    return Dataset.from_dict(reward_rows())


def conversational(rows: dict[str, list]) -> dict[str, list]:
    return {
        "prompt": [[{"role": "user", "content": p}] for p in rows["prompt"]],
        "completion": [[{"role": "assistant", "content": c.strip()}] for c in rows["completion"]],
        "reward": rows["reward"],
    }


def assert_only_adapter_moved(before: dict, model) -> None:
    """After training: every LoRA parameter changed, every other parameter is bit-identical to `before`."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(before[name], param), f"adapter {name} did not move"
        else:
            torch.testing.assert_close(before[name], param, rtol=0, atol=0)


def capture_target_passes(trainer, monkeypatch) -> dict:
    """Record, by split name, the datasets that come out of the trainer's target pass from now on (e.g. the new
    splits `evaluate()` prepares)."""
    seen, real = {}, type(trainer)._precompute_ref_logps

    def spy(self, dataset, name, batch_size, is_train=False):
        seen[name] = real(self, dataset, name, batch_size, is_train)
        return seen[name]

    monkeypatch.setattr(type(trainer), "_precompute_ref_logps", spy)
    return seen
