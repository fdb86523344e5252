"""The benchmarks run end to end (`--quick`) and write consistent JSON; the known-optimum study's measurements are
exact on hand-made distributions. No timing is asserted here: the speed goals are the benchmarks' business."""

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
OPTIMUM = SCRIPT.parent / "optimum.py"
SCALE = SCRIPT.parent / "scale.py"
METHODS = {"floor", "rpo", "kto", "kto_precomputed", "sft"}


def _run_benchmark(script: Path, tmp_path: Path, *args: str, timeout: int = 300) -> str:
    """Run a benchmark script offline in `tmp_path`, with a private datasets cache; fail on a non-zero exit; return
    what it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    command = [sys.executable, str(script), *args]
    options = {"env": env, "cwd": tmp_path, "capture_output": True, "text": True, "timeout": timeout}
    result = subprocess.run(command, check=False, **options)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_throughput_quick(tmp_path):
    output = tmp_path / "throughput.json"
    _run_benchmark(SCRIPT, tmp_path, "--quick", "--threads", "1", "--output", str(output), timeout=120)
    result = json.loads(output.read_text())

    methods = result["methods"]
    assert set(methods) == METHODS
    settings = result["settings"]
    floor, kto = methods["floor"]["s_per_step_median"], methods["kto"]["s_per_step_median"]
    for name, m in methods.items():
        assert m["s_per_step_median"] > 0, name
        assert len(m["s_per_step_all"]) == settings["warmup"] + settings["rounds"] * settings["steps_per_turn"]
        assert math.isclose(m["ratio_to_floor"], m["s_per_step_median"] / floor), name
        assert math.isclose(m["ratio_to_kto"], m["s_per_step_median"] / kto), name

    target_pass = result["target_pass"]
    for key in ("rpo_target_pass", "no_grad_forward_full_logits", "no_grad_forward_completion_head"):
        assert target_pass[key]["s_median"] > 0, key
    assert math.isclose(
        target_pass["ratio_to_no_grad_forward_completion_head"],
        target_pass["rpo_target_pass"]["s_median"] / target_pass["no_grad_forward_completion_head"]["s_median"],
    )
    assert result["partition"]["rpo_targets_s_median"] > 0


def _load_optimum():
    spec = importlib.util.spec_from_file_location("optimum", OPTIMUM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optimum_distances_are_exact_on_known_distributions():
    optimum = _load_optimum()
    ref_logps = torch.log(torch.tensor([[0.5, 0.25, 0.125], [0.2, 0.2, 0.1]], dtype=torch.float64))
    rewards = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    task = {"ref_logps": ref_logps, "rewards": rewards}
    star = optimum.optimum(ref_logps, rewards, tau=0.5)
    # π* itself, with 0.4 of its mass left outside the candidates: distance 0, reward E_π*[r], mass 0.6
    at_optimum = optimum.distances(star.log() + math.log(0.6), task, tau=0.5)
    assert at_optimum["tv_to_optimum"] == pytest.approx(0.0, abs=1e-12)
    assert at_optimum["kl_to_optimum"] == pytest.approx(0.0, abs=1e-12)
    assert at_optimum["candidate_mass"] == pytest.approx(0.6)
    assert at_optimum["expected_reward"] == pytest.approx((star * rewards).sum(-1).mean().item())
    # the reference: KL to itself 0; prompt 0 renormalised is (4, 2, 1)/7, so E[r] = (2 - 1)/7 there
    at_reference = optimum.distances(ref_logps, task, tau=0.5)
    assert at_reference["kl_to_ref"] == pytest.approx(0.0, abs=1e-12)
    assert at_reference["expected_reward"] == pytest.approx((1 / 7 + 2 * 0.4) / 2)
    assert at_reference["candidate_mass"] == pytest.approx((0.875 + 0.5) / 2)
    # hand-computed π* of prompt 1 at τ = 0.5: weights (0.4 e^4, 0.4, 0.2)
    weights = torch.tensor([0.4 * math.exp(4), 0.4, 0.2], dtype=torch.float64)
    torch.testing.assert_close(star[1], weights / weights.sum())


def test_optimum_quick(tmp_path):
    output = tmp_path / "optimum.json"
    _run_benchmark(OPTIMUM, tmp_path, "--quick", "--output", str(output))
    result = json.loads(output.read_text())
    runs = result["runs"]
    assert {(r["task"], r["method"]) for r in runs} == {
        (task, method) for task in ("full", "sparse", "sampled") for method in ("rpo_empirical_sum", "kto")
    }
    prompts, candidates = result["settings"]["prompts"], result["settings"]["candidates"]
    rows = {r["task"]: r["rows"] for r in runs}
    assert rows["full"] == rows["sampled"] == prompts * candidates
    assert prompts <= rows["sparse"] < prompts * candidates
    for run in runs:
        steps = [point["step"] for point in run["curve"]]
        assert steps == [0, 2, 4]  # --quick: 4 steps, measured every 2
        assert len(run["loss"]) == 4
        assert all(map(math.isfinite, run["loss"]))
        # both methods start from the same reference, so step 0 is the same measurement
        assert run["curve"][0] == next(r for r in runs if r["task"] == run["task"])["curve"][0]
        assert run["curve"][0]["kl_to_ref"] == pytest.approx(0.0, abs=1e-9)
    assert {Path(f).name for f in result["figures"]} == {f"optimum_{t}.png" for t in ("full", "sparse", "sampled")}
    for figure in result["figures"]:
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"
        (tmp_path / figure).unlink()
    # `--replot` redraws the same figures from the JSON alone
    _run_benchmark(OPTIMUM, tmp_path, "--replot", str(output))
    assert all((tmp_path / figure).read_bytes()[:4] == b"\x89PNG" for figure in result["figures"])
    assert "| rpo_empirical_sum |" in result["table_markdown"]


def test_scale_quick(tmp_path):
    """benchmarks/scale.py end to end on a few thousand rows: every phase timed, rows and tokens accounted for."""
    output = tmp_path / "scale.json"
    _run_benchmark(SCALE, tmp_path, "--short-prompts", "300", "--completions", "4", "--long-rows", "200",
                   "--batch", "64", "--output", str(output), timeout=300)  # fmt: skip
    workloads = json.loads(output.read_text())["workloads"]
    assert workloads["short"]["rows"] == 1200
    assert workloads["long"]["rows"] == 200
    assert workloads["long"]["mean_tokens_per_row"] > 10 * workloads["short"]["mean_tokens_per_row"]
    for result in workloads.values():
        phases = result["phases_s"]
        assert {"tokenise", "reference_pass", "partition_maths", "column_writing", "first_step", "other"} <= set(
            phases
        )
        assert sum(phases.values()) == pytest.approx(result["time_to_first_step_s"], rel=1e-6)
        assert 0 < result["bare_reference_forward_s"]
        assert math.isfinite(result["peak_rss_above_baseline_mb"] + result["peak_anon_rss_above_baseline_mb"])


FRONTIER = SCRIPT.parent / "frontier.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frontier_quick_runs_resumes_and_reports(tmp_path):
    output = tmp_path / "frontier.json"
    points = "base,rpo_mc_tzinf_t0.25,rpo_mc_lw0.1_t0.1,kto_rec_b0.3"
    args = ("--quick", "--tasks", "format,graded", "--points", points, "--output", str(output), "--no-plot")
    _run_benchmark(FRONTIER, tmp_path, *args)
    runs = json.loads(output.read_text())["runs"]
    assert {(r["task"], r["point"]) for r in runs} == {(t, p) for t in ("format", "graded") for p in points.split(",")}
    for run in runs:
        assert math.isfinite(run["kl"])
        assert 0.0 <= run["reward"] <= 1.0
        assert len(run["prompt_rewards"]) == len(run["prompt_kls"]) == 3  # --quick: 3 held-out prompts
        assert run["reward"] == pytest.approx(sum(run["prompt_rewards"]) / 3)
        assert 0.0 <= run["truncated"] <= 1.0
        assert min(run["setup_seconds"], run["train_seconds"]) >= 0
        assert ("sample_rewards" in run) == (run["point"] == "base")  # the bound's input
        moved = abs(run["fit"]["log_ratio_above_mean"]) + abs(run["fit"]["log_ratio_below_mean"])
        assert (moved == 0) == (run["point"] == "base")  # the fit reads the trained adapter against the base
        assert ("target_r2" in run["fit"]) == run["point"].startswith("rpo")
    level = next(r for r in runs if r["point"] == "rpo_mc_lw0.1_t0.1")
    assert level["options"]["level_weight"] == 0.1
    kto = next(r for r in runs if r["point"] == "kto_rec_b0.3")
    assert kto["options"]["desirable_weight"] > 1  # TRL's recommended weight for the rare desirable rows
    _run_benchmark(FRONTIER, tmp_path, *args)
    assert json.loads(output.read_text())["runs"] == runs  # a rerun skips the finished runs
    report = _run_benchmark(FRONTIER, tmp_path, "--report", "--quick", "--output", str(output), "--no-plot")
    assert "| format | rpo_mc_tzinf_t0.25 |" in report


def test_frontier_samples_and_kl(model_dir):
    """The sampler's log-probs are the policy's (a full forward over each sample, its EOS included), finished
    samples leave the batch without changing the others; the KL reads the policy against the adapter-disabled base:
    0 for a fresh LoRA (B = 0), not 0 once the adapter moved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    frontier = _load(FRONTIER, "frontier")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules="all-linear")
    ).eval()
    prompts = [tokenizer("1 + 1 =")["input_ids"], tokenizer("a longer prompt, 2 + 2 =")["input_ids"]]
    eos = [tokenizer.eos_token_id, *range(40, 80)]  # many end tokens: samples of several lengths
    tokens, ends, logps = frontier.sample(model, prompts, 4, 6, eos, tokenizer.pad_token_id, seed=0)
    finished = [end is not None for end in ends]
    assert 0 < sum(finished) < 8
    for i, (completion, end, logp) in enumerate(zip(tokens, ends, logps, strict=True)):
        prompt = prompts[i // 4]
        assert len(completion) + (end is not None) <= 6
        assert end is None or end in eos
        assert not set(completion) & set(eos)  # the sample stops at its first end token
        full = prompt + completion + ([] if end is None else [end])
        with torch.no_grad():
            token_logps = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
        expected = sum(token_logps[p, full[p + 1]].item() for p in range(len(prompt) - 1, len(full) - 1))
        assert logp == pytest.approx(expected, abs=1e-4)
        assert frontier.sequence_logps(model, prompt, [completion], [end], 0)[0] == pytest.approx(expected, abs=1e-4)
    held_out = [{"prompt": [{"role": "user", "content": "1 + 1"}], "answer": 2}]
    trainer = type("Trainer", (), {"model": model, "processing_class": tokenizer})()
    args = frontier.parse_args(["--quick"])
    assert frontier.measure(trainer, "format", held_out, args, seed=0)["kl"] == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    assert abs(frontier.measure(trainer, "format", held_out, args, seed=0)["kl"]) > 1e-3


def test_frontier_equal_kl_comparison_by_hand():
    """Curves through the starting model (KL 0, reward 0.1): RPO at (2, 0.5), (4, 0.7); KTO at (2, 0.4), (4, 0.5). At
    KL 3 RPO reads 0.6 and KTO 0.45: a difference of 0.15; at KL 5 RPO has no point (no extrapolation). Every prompt
    has the same values, so the bootstrap interval is the estimate itself."""
    frontier = _load(FRONTIER, "frontier")

    def run(family, point, kl, reward, seed=0):
        return {"task": "t", "family": family, "point": point, "seed": seed, "lr": frontier.learning_rate(family),
                "kl": kl, "reward": reward, "prompt_kls": [kl] * 4, "prompt_rewards": [reward] * 4,
                "sample_rewards": [reward] * 8, "reward_se": 0.0, "setup_seconds": 1.0, "train_seconds": 1.0,
                "truncated": 0.0}  # fmt: skip

    runs = [run("base", "base", 0.0, 0.1)]
    runs += [run("rpo_mc_tzinf", f"rpo_mc_tzinf_t{t}", k, r) for t, k, r in ((0.25, 2.0, 0.5), (0.1, 4.0, 0.7))]
    runs += [run("kto_rec", f"kto_rec_b{b}", k, r) for b, k, r in ((1.0, 2.0, 0.4), (0.1, 4.0, 0.5))]
    result = frontier.compare(runs, "t", "rpo_mc_tzinf", [1.0, 3.0, 5.0], resamples=20)
    assert result["difference"][:2] == pytest.approx([0.3 - 0.25, 0.6 - 0.45])
    assert math.isnan(result["difference"][2])
    assert result["ci_low"][:2] == pytest.approx(result["difference"][:2])
    assert result["ci_high"][:2] == pytest.approx(result["difference"][:2])
    assert frontier.recommended_desirable_weight([True, False, False, False, False]) == pytest.approx(4 * 7 / 6, 1e-3)


def test_frontier_upper_bound_is_the_binary_kl_curve():
    """With a 0/1 reward of base rate p, the tilted policy with success rate q sits at KL = kl(q‖p) of two coins: the
    least KL any policy needs for reward q. The curve starts at the base model and rises to the best sample."""
    frontier = _load(FRONTIER, "frontier")
    curve = frontier.best_frontier([1.0] + [0.0] * 9)
    for kl, q in curve:
        p = 0.1
        coins = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)) if q < 1 else math.log(1 / p)
        assert kl == pytest.approx(coins, abs=1e-9)
    assert curve[0] == pytest.approx((0.0, 0.1), abs=1e-3)
    assert curve[-1] == pytest.approx((math.log(10), 1.0), abs=1e-6)
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in itertools.pairwise(curve) if b[1] < 1 - 1e-9)
    graded = frontier.best_frontier([0.0, 0.5, 1.0])  # a graded reward: from the mean to the best sample
    assert graded[0][1] == pytest.approx(0.5, abs=1e-2)
    assert graded[-1] == pytest.approx((math.log(3), 1.0), abs=1e-6)


def test_frontier_rewards():
    frontier = _load(FRONTIER, "frontier")
    assert frontier.task_reward("format", "It is 4.", 4) == 1.0
    assert frontier.task_reward("format", [{"role": "assistant", "content": "4"}], 4) == 0.0
    assert frontier.task_reward("format", "One two three four five six seven eight nine ten eleven twelve.", 4) == 1.0
    assert frontier.task_reward("format", "One two three four five six seven eight nine ten eleven 12 13.", 4) == 0.0
    assert frontier.task_reward("arithmetic", "4", 4) == 1.0
    # graded: ½ arithmetic + ½ (1 − words/30): "It is 4." is right in 3 words
    assert frontier.task_reward("graded", "It is 4.", 4) == pytest.approx(0.5 + 0.5 * (1 - 3 / 30))
    assert frontier.task_reward("graded", "no " * 40, 4) == 0.0
    kto = frontier.training_columns(
        "kto", [{"prompt": "p", "completion": c, "reward": r} for c, r in (("a", 1), ("b", 0))]
    )
    assert kto["label"] == [True, False]
    assert len(frontier.held_out_problems()) == 52
    assert not set(frontier.held_out_problems()) & set(frontier.train_problems())


def test_frontier_seeds_a_count_or_a_list_and_never_none():
    """`--seeds 0` once ran a sweep of no runs that exited 0: a count of none is refused, a list may name seed 0."""
    frontier = _load(FRONTIER, "frontier")
    assert frontier.parse_args(["--seeds", "3"]).seeds == [0, 1, 2]
    assert frontier.parse_args(["--seeds", "0,"]).seeds == [0]
    assert frontier.parse_args(["--seeds", "1,2"]).seeds == [1, 2]
    with pytest.raises(SystemExit):
        frontier.parse_args(["--seeds", "0"])
