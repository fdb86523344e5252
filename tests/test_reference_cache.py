"""The reference-log-prob cache (SPEC §5): keyed by what determines ℓ_ref, so it never answers for another reference,
dtype, attention implementation, truncation or tokenisation; written atomically; logged; switchable off."""

import logging
import os

import pytest
import torch
from conftest import conversational, reward_rows
from datasets import Dataset
from transformers import AutoModelForCausalLM

from trl_rpo import RPOTrainer, reference_cache
from trl_rpo.target_pass import TargetPass
from trl_rpo.testing import build_tokenizer


def _cached(make_args, **kwargs):
    return make_args(cache_ref_log_probs=True, **kwargs)


def _cache_files(tmp_path) -> list[str]:
    """The cache files in this test's own `datasets` cache (conftest points it at `tmp_path`)."""
    folder = tmp_path / "hf_datasets_cache" / "trl_rpo"
    return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors")) if folder.exists() else []


def _ref_logps(trainer) -> list[float]:
    return list(trainer.train_dataset["ref_logps"])


def test_hit_reuses_the_logps_and_recomputes_the_targets(model_dir, make_args, reward_dataset, monkeypatch, tmp_path):
    first = RPOTrainer(model_dir, args=_cached(make_args), train_dataset=reward_dataset)
    assert first.target_pass_log["train"] == {"cache": "miss", "rows_scored_here": 12}

    def fail(*args, **kwargs):
        raise AssertionError("the reference pass ran again instead of reusing the cache")

    monkeypatch.setattr(TargetPass, "_reference_pass", fail)
    second = RPOTrainer(model_dir, args=_cached(make_args, beta=2.0), train_dataset=reward_dataset)
    assert second.target_pass_log["train"]["cache"] == "hit"
    assert _ref_logps(second) == _ref_logps(first)
    # The cache holds reference log-probs only: new RPO settings give new targets from them.
    assert list(second.train_dataset["target"]) != list(first.train_dataset["target"])
    assert len(_cache_files(tmp_path)) == 1


def test_two_models_of_one_architecture_get_their_own_values(model_dir, other_model_dir, make_args, reward_dataset):
    """Same data, same cache folder, different weights: each reference gets its own log-probs."""
    a = RPOTrainer(model_dir, args=_cached(make_args), train_dataset=reward_dataset)
    b = RPOTrainer(other_model_dir, args=_cached(make_args), train_dataset=reward_dataset)
    assert b.target_pass_log["train"]["cache"] == "miss"
    uncached = RPOTrainer(other_model_dir, args=make_args(), train_dataset=reward_dataset)
    assert uncached.target_pass_log["train"]["cache"] == "off"
    assert _ref_logps(b) == _ref_logps(uncached)
    assert _ref_logps(b) != _ref_logps(a)
    again = RPOTrainer(model_dir, args=_cached(make_args), train_dataset=reward_dataset)
    assert again.target_pass_log["train"]["cache"] == "hit"
    assert _ref_logps(again) == _ref_logps(a)


def test_an_explicit_ref_model_that_moved_is_a_new_key(model_dir, make_args, reward_dataset):
    def reference(scale: float):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(scale)  # one matrix of one layer
        return model

    plain = RPOTrainer(model_dir, ref_model=reference(1.0), args=_cached(make_args), train_dataset=reward_dataset)
    moved = RPOTrainer(model_dir, ref_model=reference(3.0), args=_cached(make_args), train_dataset=reward_dataset)
    assert moved.target_pass_log["train"]["cache"] == "miss"
    assert _ref_logps(moved) != _ref_logps(plain)


EAGER = {"attn_implementation": "eager"}


@pytest.mark.parametrize("change", ["max_length", "dtype", "attn_implementation", "autocast", "chat_template"])
def test_what_changes_the_reference_logps_changes_the_key(model_dir, make_args, change, tmp_path):
    """One trainer, then another that differs in exactly one thing ℓ_ref depends on: a miss, not the first's values."""
    dataset = Dataset.from_dict(conversational(reward_rows()))
    first = RPOTrainer(model_dir, args=_cached(make_args, model_init_kwargs=EAGER), train_dataset=dataset)
    options, processing_class = {"model_init_kwargs": EAGER}, None
    if change == "max_length":  # truncates the longest rows' completions, keeps every prompt
        options["max_length"] = max(first.train_dataset["length"]) - 1
    elif change == "dtype":
        options["model_init_kwargs"] = {**EAGER, "dtype": torch.bfloat16}
    elif change == "attn_implementation":
        options["model_init_kwargs"] = {"attn_implementation": "sdpa"}
    elif change == "autocast":
        options |= {"bf16": True, "use_cpu": True}
    else:
        processing_class = build_tokenizer()
        processing_class.chat_template = "{{ 'Chat: ' }}" + processing_class.chat_template
    second = RPOTrainer(
        model_dir, args=_cached(make_args, **options), train_dataset=dataset, processing_class=processing_class
    )
    assert second.target_pass_log["train"]["cache"] == "miss"
    assert len(_cache_files(tmp_path)) == 2


def test_cache_off_writes_nothing(model_dir, make_args, reward_dataset, tmp_path):
    trainer = RPOTrainer(model_dir, args=make_args(cache_ref_log_probs=False), train_dataset=reward_dataset)
    assert trainer.target_pass_log["train"] == {"cache": "off", "rows_scored_here": 12}
    assert _cache_files(tmp_path) == []


def test_log_line_says_hit_or_miss_and_where(model_dir, make_args, reward_dataset, caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="trl_rpo"):
        RPOTrainer(model_dir, args=_cached(make_args, log_level="info"), train_dataset=reward_dataset)
        RPOTrainer(model_dir, args=_cached(make_args, log_level="info"), train_dataset=reward_dataset)
    (name,) = _cache_files(tmp_path)
    assert f"train dataset: cache miss, computed and written to {tmp_path}" in caplog.text
    assert f"train dataset: cache hit, read from {tmp_path}" in caplog.text
    assert caplog.text.count(name) == 2


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "cache" / "key.safetensors")
    rows = {"sum_logps": -torch.ones(3), "num_tokens": torch.tensor([1, 2, 3])}
    reference_cache.save(path, rows)
    assert os.listdir(tmp_path / "cache") == ["key.safetensors"]  # no temporary file left behind

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(reference_cache, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        reference_cache.save(str(tmp_path / "cache" / "other.safetensors"), rows)
    assert os.listdir(tmp_path / "cache") == ["key.safetensors"]  # the interrupted write left neither file nor temp
    torch.testing.assert_close(reference_cache.load(path, 3)["sum_logps"], -torch.ones(3))


def _damage(path: str, how: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))


@pytest.mark.parametrize("how", ["truncated", "random bytes"])
def test_a_damaged_file_is_named_and_recomputed(model_dir, make_args, reward_dataset, tmp_path, caplog, how):
    """A cache file cut short or overwritten is never used and never a library's exception: the trainer says which
    file is damaged, runs the reference pass again, gets the values a fresh pass gets and rewrites the file."""
    first = RPOTrainer(model_dir, args=_cached(make_args), train_dataset=reward_dataset)
    (name,) = _cache_files(tmp_path)
    path = str(tmp_path / "hf_datasets_cache" / "trl_rpo" / name)
    _damage(path, how)
    with caplog.at_level(logging.WARNING, logger="trl_rpo"):
        second = RPOTrainer(model_dir, args=_cached(make_args), train_dataset=reward_dataset)
    assert f"cache file {path} is damaged" in caplog.text
    assert second.target_pass_log["train"] == {"cache": "miss", "rows_scored_here": 12}
    assert _ref_logps(second) == pytest.approx(_ref_logps(first), abs=1e-6)
    assert reference_cache.load(path, 12) is not None  # rewritten whole


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({"sum_logps": -torch.ones(4), "num_tokens": torch.ones(4, dtype=torch.long)}, "shape"),  # another split's
        ({"sum_logps": -torch.ones(3)}, "tensors"),
        ({"sum_logps": torch.tensor([-1.0, 0.5, -2.0]), "num_tokens": torch.ones(3, dtype=torch.long)}, "above 0"),
        (
            {"sum_logps": torch.tensor([-1.0, float("nan"), -2.0]), "num_tokens": torch.ones(3, dtype=torch.long)},
            "not finite",
        ),
        ({"sum_logps": -torch.ones(3), "num_tokens": torch.tensor([1.0, 2.5, 3.0])}, "whole non-negative"),
        ({"sum_logps": -torch.ones(3), "num_tokens": torch.tensor([1.0, -2.0, 3.0])}, "whole non-negative"),
    ],
)
def test_content_that_cannot_be_these_rows_logps_is_refused(tmp_path, caplog, tensors, reason):
    path = str(tmp_path / "key.safetensors")
    reference_cache.save(path, tensors)
    with caplog.at_level(logging.WARNING, logger="trl_rpo"):
        assert reference_cache.load(path, 3) is None
    assert reason in caplog.text
    assert path in caplog.text


def test_another_version_is_not_read(tmp_path, caplog):
    from safetensors.torch import save_file

    path = str(tmp_path / "key.safetensors")
    save_file({"sum_logps": -torch.ones(3), "num_tokens": torch.ones(3, dtype=torch.long)}, path)  # no version
    with caplog.at_level(logging.WARNING, logger="trl_rpo"):
        assert reference_cache.load(path, 3) is None
    assert "version None" in caplog.text


def test_weights_digest_sees_one_changed_weight(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = reference_cache.weights_digest(model)
    assert reference_cache.weights_digest(AutoModelForCausalLM.from_pretrained(model_dir)) == before
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 5] += 1e-3  # flat index 101 of 10,240: off the 1,024 sampled values
    assert reference_cache.weights_digest(model) != before
    frozen_only = reference_cache.weights_digest(model, include=lambda name, param: "o_proj" not in name)
    assert frozen_only != reference_cache.weights_digest(model)
