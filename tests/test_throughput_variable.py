"""`benchmarks/throughput.py --workload variable`: the heavy-tailed row generator, and a `--quick` run whose JSON
accounts for the same useful tokens in every method. No speed is asserted here: that is the benchmark's business."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.test_benchmarks import _load
from trl_rpo.testing import build_tokenizer


SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
RPO_VARIANTS = {"rpo", "rpo_grouped", "rpo_padding_free", "rpo_padding_free_grouped"}
PADDING_FREE = {"rpo_padding_free", "rpo_padding_free_grouped"}


def _load_script():
    return _load(SCRIPT, "throughput")


def test_variable_rows_are_heavy_tailed_clipped_and_exact_in_tokens():
    throughput = _load_script()
    rng = np.random.default_rng(0)
    for spec in (throughput.PROMPT_LENGTHS, throughput.COMPLETION_LENGTHS):
        lengths = throughput.draw_lengths(rng, spec, 1.0, 20_000)
        # σ = 0.8 puts ~0.5% of draws beyond each bound: both bounds are reached, none is crossed
        assert lengths.min() == spec["low"]
        assert lengths.max() == spec["high"]
        assert lengths.max() / lengths.min() >= 60
        assert abs(np.median(lengths) / spec["median"] - 1) < 0.05
        assert np.mean(lengths > 4 * spec["median"]) > 0.03  # a heavy tail, not a narrow spread around the median
    assert throughput.length_bounds(throughput.COMPLETION_LENGTHS, 0.5) == (64, 2, 384)

    rows = throughput.make_variable_rows(num_prompts=12, completions=4, seed=3)
    assert rows == throughput.make_variable_rows(num_prompts=12, completions=4, seed=3)  # a fixed seed
    assert len(rows["prompt"]) == 48
    prompt_tokens, completion_tokens = np.array(rows["prompt_tokens"]), np.array(rows["completion_tokens"])
    assert prompt_tokens.min() >= 8
    assert prompt_tokens.max() <= 512
    assert completion_tokens.min() >= 4
    assert completion_tokens.max() <= 768
    row_tokens = prompt_tokens + completion_tokens
    assert row_tokens.max() / row_tokens.min() > 4
    by_prompt, positions = {}, {}
    for i, (prompt, n, completion) in enumerate(zip(rows["prompt"], prompt_tokens, completion_tokens, strict=True)):
        by_prompt.setdefault((prompt, n), []).append(completion)
        positions.setdefault(prompt, []).append(i)
    assert len(by_prompt) == 12
    assert all(len(c) == 4 for c in by_prompt.values())
    assert sum(len(set(c)) > 1 for c in by_prompt.values()) >= 10  # completions of a prompt differ in length
    assert any(max(p) - min(p) > 3 for p in positions.values())  # shuffled: KTO's sequential batches mix prompts
    assert rows["label"] == [r > 0 for r in rows["reward"]]
    assert 0 < sum(rows["label"]) < 48
    # the drawn lengths are the token counts RPO and KTO read: prompt, and prompt + completion + EOS
    tokenizer = build_tokenizer()
    for prompt, completion, n_prompt, n_completion in zip(
        rows["prompt"], rows["completion"], prompt_tokens, completion_tokens, strict=True
    ):
        assert len(tokenizer(prompt)["input_ids"]) == n_prompt
        assert len(tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]) == n_prompt + n_completion


def test_throughput_variable_quick(tmp_path):
    output = tmp_path / "throughput_variable.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    command = [sys.executable, str(SCRIPT), "--quick", "--workload", "variable", "--threads", "1"]
    options = {"env": env, "cwd": tmp_path, "capture_output": True, "text": True, "timeout": 300}
    result = subprocess.run([*command, "--output", str(output)], check=False, **options)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| RPOTrainer, padding_free |" in result.stdout
    assert "not fitted to a data set" in result.stdout
    result = json.loads(output.read_text())

    settings, methods, target_pass = result["settings"], result["methods"], result["target_pass"]
    assert result["workload"] == "variable"
    assert set(methods) == {"floor", "kto"} | RPO_VARIANTS
    assert settings["max_length"] >= settings["lengths"]["row"]["max"]  # nothing truncated
    assert settings["lengths"]["row"]["max"] > 2 * settings["lengths"]["row"]["min"]
    batches, epochs = settings["batches_per_epoch"], settings["epochs"]
    assert batches == math.ceil(settings["rows"] / settings["batch"])
    useful = epochs * settings["useful_tokens_per_epoch"]
    for name, m in methods.items():
        assert math.isfinite(m["tokens_per_s"]), name
        assert m["tokens_per_s"] > 0, name
        # whole epochs: every method fed the decoder the same useful tokens, counted at its input
        assert m["useful_tokens_timed"] == useful, name
        assert len(m["s_per_step_all"]) == batches * (1 + epochs), name
        assert math.isclose(m["tokens_per_s"], useful / sum(m["s_per_step_all"][batches:])), name
        assert math.isclose(m["ratio_to_rpo"], m["tokens_per_s"] / methods["rpo"]["tokens_per_s"]), name
        assert m["computed_tokens_timed"] >= useful, name
    for name in PADDING_FREE:
        assert methods[name]["padding_share"] == 0
        assert methods[name]["computed_tokens_timed"] == useful
    for name in ("rpo", "floor"):
        assert methods[name]["padding_share"] > 0, name

    # target pass: padded vs padding-free over every row, and "target pass + one epoch" for each RPO variant
    assert target_pass["padding_free"]["computed_tokens"] == target_pass["useful_tokens"]
    in_order, longest_first = (
        target_pass["padded_in_order"]["computed_tokens"],
        target_pass["padded"]["computed_tokens"],
    )
    assert in_order > longest_first > target_pass["useful_tokens"]  # sorting the pass cuts padding, packing ends it
    assert target_pass["useful_tokens"] == settings["useful_tokens_per_epoch"]
    for name in RPO_VARIANTS:
        m = methods[name]
        key = "padding_free" if name in PADDING_FREE else "padded"
        assert m["target_pass_s"] == target_pass[key]["s_median"] > 0
        expected = settings["useful_tokens_per_epoch"] / (m["target_pass_s"] + m["epoch_s"])
        assert math.isclose(m["end_to_end_tokens_per_s"], expected), name
        assert m["end_to_end_tokens_per_s"] < m["tokens_per_s"], name
        assert math.isclose(m["ratio_to_kto"], m["tokens_per_s"] / methods["kto"]["tokens_per_s"]), name
    assert methods["kto"]["end_to_end_tokens_per_s"] == methods["kto"]["tokens_per_s"]  # no separate pass
    assert methods["floor"]["end_to_end_tokens_per_s"] is None
    goal = result["goal"]
    best = max(RPO_VARIANTS, key=lambda name: methods[name]["end_to_end_tokens_per_s"])
    assert goal["best_rpo_option"] == best
    before = settings["useful_tokens_per_epoch"] / (
        methods["rpo"]["epoch_s"] + target_pass["padded_in_order"]["s_median"]
    )
    assert math.isclose(goal["end_to_end_ratio_to_padded_in_order"], methods[best]["end_to_end_tokens_per_s"] / before)
    assert goal["met"] == (goal["end_to_end_ratio_to_padded_in_order"] >= 1.3)


GPU_CHECK = SCRIPT.parent / "gpu_check.py"


def test_gpu_check_runs_the_variable_workload_in_bf16(tmp_path):
    """`gpu_check.py` drives the variable workload in bf16 (here its smoke mode on CPU: no GPU needed), and its full
    size is the ~0.5B-parameter Llama the GPU numbers are quoted for."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    command = [sys.executable, str(GPU_CHECK), "--allow_cpu", "--engines", "", "--throughput-quick"]
    subprocess.run([*command, "--output_dir", str(tmp_path)], check=True, env=env, cwd=tmp_path, timeout=600)
    result = json.loads((tmp_path / "throughput_variable_sdpa.json").read_text())
    assert result["settings"]["dtype"] == "bfloat16 autocast"
    assert result["settings"]["attention"] == "sdpa"
    assert set(result["methods"]) == {"floor", "kto"} | RPO_VARIANTS
    assert all(m["tokens_per_s"] > 0 for m in result["methods"].values())

    import torch

    gpu_check = _load(GPU_CHECK, "gpu_check")
    full = gpu_check.throughput_command(tmp_path, "flash_attention_2")
    size = {flag: int(full[full.index(flag) + 1]) for flag in ("--layers", "--hidden", "--vocab")}
    assert full[full.index("--attention") + 1] == "flash_attention_2"
    throughput = _load_script()
    args = throughput.parse_args(["--workload", "variable", *[str(x) for kv in size.items() for x in kv]])
    with torch.device("meta"):  # the script's own model builder, without allocating the weights
        model = throughput.build_model(build_tokenizer(), args)
    assert model.config.model_type == "llama"
    assert 0.4e9 < sum(p.numel() for p in model.parameters()) < 0.6e9
