"""Reward–KL frontier on a real model: for a given distance from the starting model, which trainer buys the most
held-out reward, with which settings?

Each point is one run: a LoRA adapter trained on SmolLM2-135M-Instruct (offline, CPU) on the demo's rows — the
model's own sampled answers to one-digit additions — then measured on held-out prompts from samples of the trained
policy (temperature 1, no top-k/top-p): the mean task reward, and KL(π‖π_ref) estimated as the mean over those
samples of log π(y|x) − log π_ref(y|x) (summed over tokens; π_ref is the base model, the adapter disabled).

Tasks (same prompts and completions, two rewards):

* `arithmetic`: the demo's reward (1 for the right number, partial credit when close);
* `format`: a style reward, 1 when the answer ends with a period, else 0 (19 % of the shipped rows).

Methods: the starting model (`base`, the frontier's origin), RPO over τ with summed or mean log-probs and the
empirical or Monte-Carlo partition, KTO over β (labels: reward above the split's mean), DRO over τ, SFT on each
prompt's best completion. Same LoRA, steps, batch and learning rate for all. Results are appended run by run to the
JSON (a rerun skips finished runs), then tabulated and plotted.

    python benchmarks/frontier.py                         # the sweep (hours on 2 CPU cores)
    python benchmarks/frontier.py --tasks format --points rpo_sum_mc_t0.5,kto_b1
    python benchmarks/frontier.py --quick                 # a tiny random model, seconds: what CI runs
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace


os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "smollm2_demo"))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from task import reward as arithmetic_reward  # noqa: E402


RESULTS = ROOT / "benchmarks" / "results" / "frontier_cpu.json"
DATA = ROOT / "examples" / "smollm2_demo" / "data"
# name: (method, options). RPO names read rpo_<aggregation>_<estimator>_t<τ>.
POINTS = {
    "base": ("base", {}),  # the starting model itself (a LoRA adapter that has not moved): KL 0
    **{f"rpo_mean_emp_t{t:g}": ("rpo", {"beta": t, "logps_aggregation": "mean", "partition_estimator": "empirical"})
       for t in (5.0, 1.0, 0.5)},
    **{f"rpo_sum_mc_t{t:g}": ("rpo", {"beta": t, "logps_aggregation": "sum", "partition_estimator": "monte_carlo"})
       for t in (2.0, 1.0, 0.5, 0.25, 0.1)},
    **{f"rpo_sum_emp_t{t:g}": ("rpo", {"beta": t, "logps_aggregation": "sum", "partition_estimator": "empirical"})
       for t in (1.0, 0.5, 0.1)},
    **{f"rpo_sum_none_t{t:g}": ("rpo", {"beta": t, "logps_aggregation": "sum", "partition_estimator": "none"})
       for t in (1.0, 0.5, 0.25, 0.1, 0.05)},
    # RPO given KTO's training time (a KTO step costs about 3 RPO steps here)
    "rpo_sum_mc_120steps_t0.5": ("rpo", {"beta": 0.5, "logps_aggregation": "sum", "partition_estimator": "monte_carlo",
                                         "max_steps": 120}),
    **{f"kto_b{b:g}": ("kto", {"beta": b}) for b in (3.0, 1.0, 0.1)},
    **{f"dro_t{t:g}": ("dro", {"beta": t, "logps_aggregation": "sum"}) for t in (1.0, 0.5)},
    "sft_best": ("sft", {}),
}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="arithmetic,format")
    p.add_argument("--points", default=",".join(POINTS), help=f"comma-separated, among {list(POINTS)}")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="a tiny random model and a few rows: a smoke run")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    args = p.parse_args(argv)
    args.tasks, args.points = args.tasks.split(","), args.points.split(",")
    unknown = set(args.points) - set(POINTS)
    if unknown:
        p.error(f"unknown points {sorted(unknown)}")
    if args.quick:
        args.steps, args.batch, args.eval_samples, args.max_new_tokens = 2, 4, 1, 4
    return args


# ------------------------------------------------------------------------------------------------- the tasks
def completion_text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def task_reward(task: str, completion, answer: int) -> float:
    text = completion_text(completion)
    return arithmetic_reward(text, answer) if task == "arithmetic" else float(text.strip().endswith("."))


def load_rows(task: str, quick: bool) -> tuple[list[dict], list[dict]]:
    """The training rows (rescored for `task`) and the held-out prompts."""
    read = lambda name: [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]  # noqa: E731
    train, held_out = read("train.jsonl"), read("eval.jsonl")
    if quick:
        train, held_out = train[:12], held_out[:3]
    for row in train:
        row["reward"] = task_reward(task, row["completion"], row["answer"])
    return train, held_out


def training_columns(method: str, rows: list[dict]) -> dict[str, list]:
    """The columns each trainer reads, from the same rows."""
    if method == "sft":
        best = {}
        for row in rows:
            key = json.dumps(row["prompt"])
            if key not in best or row["reward"] > best[key]["reward"]:
                best[key] = row
        return {"prompt": [r["prompt"] for r in best.values()], "completion": [r["completion"] for r in best.values()]}
    columns = {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}
    if method == "kto":
        mean = statistics.fmean(r["reward"] for r in rows)
        return columns | {"label": [r["reward"] > mean for r in rows]}
    return columns | {"reward": [r["reward"] for r in rows]}


# ------------------------------------------------------------------------------------------------- one run
def train(method: str, options: dict, model_path: str, rows: list[dict], args, seed: int, work: str):
    from peft import LoraConfig
    from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    from trl_rpo import DROConfig, DROTrainer, RPOConfig, RPOTrainer

    common = {
        "output_dir": work, "max_steps": args.steps, "per_device_train_batch_size": args.batch,
        "learning_rate": args.lr, "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": min(5, args.steps // 10),
        "logging_steps": 10, "save_strategy": "no", "report_to": "none", "seed": seed, "bf16": False,
        "use_cpu": True, "disable_tqdm": True, "gradient_checkpointing": False,
    }  # fmt: skip
    classes = {
        "rpo": (RPOConfig, RPOTrainer, {"cache_ref_log_probs": False}),
        "dro": (DROConfig, DROTrainer, {"cache_ref_log_probs": False}),
        "kto": (KTOConfig, KTOTrainer, {}),
        "sft": (SFTConfig, SFTTrainer, {}),
    }
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "base":
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora)
        base = SimpleNamespace(model=model, processing_class=AutoTokenizer.from_pretrained(model_path))
        return base, {"setup_seconds": 0.0, "train_seconds": 0.0}
    config_class, trainer_class, extra = classes[method]
    config = config_class(**(common | extra | options))  # a point may set its own steps or learning rate
    dataset = Dataset.from_dict(training_columns(method, rows))
    start = time.perf_counter()  # from the raw rows: tokenization and RPO's target pass count
    trainer = trainer_class(model_path, args=config, train_dataset=dataset, peft_config=lora)
    setup = time.perf_counter() - start
    trainer.train()
    return trainer, {"setup_seconds": round(setup, 1), "train_seconds": round(time.perf_counter() - start - setup, 1)}


@torch.no_grad()
def measure(trainer, task: str, held_out: list[dict], args, seed: int) -> dict[str, float]:
    """Held-out reward and KL(π‖π_ref) from samples of the trained policy (temperature 1, no truncation)."""
    model, tokenizer = trainer.model, trainer.processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    model.eval()
    torch.manual_seed(seed)
    rewards, kls = [], []
    for row in held_out:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        sequences = model.generate(
            input_ids=prompt_ids.repeat(args.eval_samples, 1), attention_mask=torch.ones_like(prompt_ids).repeat(
                args.eval_samples, 1), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )  # fmt: skip
        completions = sequences[:, prompt_ids.shape[1] :]
        policy = _sequence_logps(model, sequences, completions, tokenizer)
        with model.disable_adapter():
            reference = _sequence_logps(model, sequences, completions, tokenizer)
        kls += (policy - reference).tolist()
        for ids in completions:
            rewards.append(task_reward(task, tokenizer.decode(ids, skip_special_tokens=True), row["answer"]))
    return {"reward": statistics.fmean(rewards), "kl": statistics.fmean(kls), "sample_rewards": rewards}


@torch.no_grad()
def training_fit(trainer, rows: list[dict]) -> dict[str, float]:
    """How training moved the summed log π/π_ref of its own rows, for those above and below the rows' mean reward
    (what KTO labels desirable and undesirable); for RPO also the targets it regressed onto and how well it fits them,
    in its aggregation's units (R² over the rows)."""
    model = trainer.model
    model.eval()
    ratios, lengths = [], []
    for prompt_ids, completion_ids in _training_ids(trainer, rows):
        sequence = torch.tensor([prompt_ids + completion_ids])
        policy = _completion_logps(model, sequence, len(completion_ids))
        with model.disable_adapter():
            reference = _completion_logps(model, sequence, len(completion_ids))
        ratios.append((policy - reference).item())
        lengths.append(len(completion_ids))
    mean_reward = statistics.fmean(r["reward"] for r in rows)
    above = [x for x, r in zip(ratios, rows, strict=True) if r["reward"] > mean_reward]
    below = [x for x, r in zip(ratios, rows, strict=True) if r["reward"] <= mean_reward]
    fit = {"log_ratio_above_mean": statistics.fmean(above), "log_ratio_below_mean": statistics.fmean(below)}
    if "target" in getattr(getattr(trainer, "train_dataset", None), "column_names", ()):
        fit |= _target_fit(trainer, ratios, lengths, [r["reward"] > mean_reward for r in rows])
    return fit


def _training_ids(trainer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each training row: the trainer's own where it keeps them (RPO, DRO), else the chat template's."""
    dataset = getattr(trainer, "train_dataset", None)
    if {"source_row", "completion_ids"} <= set(getattr(dataset, "column_names", ())):
        columns = (dataset["source_row"], dataset["prompt_ids"], dataset["completion_ids"])
        ids = {i: (p, c) for i, p, c in zip(*columns, strict=True)}
        return [ids[i] for i in range(len(rows))]
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    pairs = []
    for row in rows:
        completion = row["completion"]
        messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + messages, tokenize=False)
        tokens = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        pairs.append((tokens(prompt), tokens(full[len(prompt) :])))
    return pairs


def _completion_logps(model, sequence: torch.Tensor, completion_length: int) -> torch.Tensor:
    logits = model(input_ids=sequence).logits[:, -completion_length - 1 : -1].float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, sequence[:, -completion_length:, None])
    return token_logps.sum()


def _target_fit(trainer, ratios: list[float], lengths: list[int], above: list[bool]) -> dict[str, float]:
    dataset, per_token = trainer.train_dataset, trainer.args.logps_aggregation == "mean"
    fitted = [ratio / length if per_token else ratio for ratio, length in zip(ratios, lengths, strict=True)]
    targets = dict(zip(dataset["source_row"], dataset["target"], strict=True))
    rows = sorted(targets)
    residual = sum((fitted[i] - targets[i]) ** 2 for i in rows)
    mean_target = statistics.fmean(targets.values())
    spread = sum((targets[i] - mean_target) ** 2 for i in rows)
    return {
        "target_above_mean": statistics.fmean(targets[i] for i in rows if above[i]),
        "target_below_mean": statistics.fmean(targets[i] for i in rows if not above[i]),
        "target_r2": 1 - residual / spread if spread else float("nan"),
    }


def _sequence_logps(model, sequences, completions, tokenizer) -> torch.Tensor:
    """Summed log-prob of each sampled completion (up to and including its first EOS)."""
    logits = model(input_ids=sequences).logits[:, -completions.shape[1] - 1 : -1].float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, completions[..., None]).squeeze(-1)
    eos = completions == tokenizer.eos_token_id
    after_eos = (eos.cumsum(-1) - eos.long()) > 0  # tokens generated after the sequence ended are padding
    return (token_logps * ~after_eos).sum(-1)


# ------------------------------------------------------------------------------------------------- the sweep
def model_path(quick: bool) -> str:
    if quick:
        from trl_rpo.testing import build_tokenizer, save_tiny_causal_lm

        path = save_tiny_causal_lm(Path(os.environ.get("TMPDIR", "/tmp")) / "frontier-tiny")
        tokenizer = build_tokenizer()
        if tokenizer.chat_template is None:  # the tiny tokenizer has none: a minimal one, as the tests use
            tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            tokenizer.save_pretrained(path)
        return path
    from trl_rpo.testing import smollm2_folder

    return smollm2_folder()


def run_sweep(args) -> dict:
    output = Path(args.output)
    saved = json.loads(output.read_text()) if output.is_file() else {"runs": []}
    done = {(r["task"], r["point"], r["seed"]) for r in saved["runs"]}
    path = model_path(args.quick)
    for task in args.tasks:
        rows, held_out = load_rows(task, args.quick)
        for seed in range(args.seeds):
            for point in args.points:
                if (task, point, seed) in done:
                    continue
                method, options = POINTS[point]
                with tempfile.TemporaryDirectory() as work:  # the trainer's output_dir: nothing kept
                    trainer, seconds = train(method, options, path, rows, args, seed, work)
                run = {"task": task, "point": point, "method": method, "options": options, "seed": seed, **seconds,
                       **measure(trainer, task, held_out, args, seed), "fit": training_fit(trainer, rows)}  # fmt: skip
                if method != "base":  # the starting model's rewards draw the best possible frontier; others' are noise
                    del run["sample_rewards"]
                saved["runs"].append(run)
                print(f"{task:>10} {point:>18} seed {seed}: reward {run['reward']:+.3f} KL {run['kl']:6.2f} "
                      f"({run['setup_seconds'] + run['train_seconds']:.0f} s)", flush=True)  # fmt: skip
                saved |= {
                    "date": date.today().isoformat(),
                    "machine": platform.platform(),
                    "settings": _settings(args),
                }
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(json.dumps(saved, indent=1) + "\n")  # after every run: resumable
    return saved


def _settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("output", "plot", "points", "tasks")}


def best_frontier(base_rewards: list[float], num: int = 81) -> list[tuple[float, float]]:
    """(KL, reward) of π_ref·exp(r/τ)/Z for τ from 100 down to 0.01: the policy that maximises E_π[r] − τ·KL(π‖π_ref),
    hence the most reward any policy can reach at its KL: the frontier's upper bound. π_ref's rewards are read from
    the starting model's held-out samples (each sample weighted 1/n), so the bound ends at their best reward."""
    rewards = torch.tensor(base_rewards, dtype=torch.float64)
    curve = []
    for inverse_tau in torch.logspace(-2, 2, num, dtype=torch.float64):
        weights = torch.softmax(rewards * inverse_tau, 0)  # the tilted distribution over the samples
        kl = (weights * torch.log(weights * len(rewards))).sum()
        curve.append((kl.item(), (weights * rewards).sum().item()))
    return curve


def table(runs: list[dict]) -> str:
    """One line per task and point: the mean over seeds (± half the range when there are several)."""
    lines = ["| task | point | seeds | held-out reward | KL(π‖π_ref) | setup + train s |", "|---" * 6 + "|"]
    points = {}
    for run in runs:
        points.setdefault((run["task"], run["point"]), []).append(run)
    for (task, point), group in sorted(points.items(), key=lambda item: (item[0][0], _mean(item[1], "kl"))):
        seconds = statistics.fmean(r.get("setup_seconds", 0.0) + r["train_seconds"] for r in group)
        lines.append(
            f"| {task} | {point} | {len(group)} | {_spread(group, 'reward', '.3f')} | {_spread(group, 'kl', '.2f')} | "
            f"{seconds:.0f}{'' if all('setup_seconds' in r for r in group) else ' (train only)'} |"
        )
    return "\n".join(lines)


def _mean(group: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in group)


def _spread(group: list[dict], key: str, spec: str) -> str:
    values = [r[key] for r in group]
    half_range = (max(values) - min(values)) / 2
    return format(statistics.fmean(values), spec) + (f" ± {half_range:{spec}}" if len(values) > 1 else "")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    points = {}  # (task, point) -> (mean KL, mean reward) over seeds
    for run in runs:
        points.setdefault((run["task"], run["point"]), []).append(run)
    points = {key: (_mean(group, "kl"), _mean(group, "reward")) for key, group in points.items()}
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for family in sorted({_family(point) for _, point in points}):
            curve = sorted(xy for (t, point), xy in points.items() if t == task and _family(point) == family)
            if curve:
                ax.plot(*zip(*curve, strict=True), marker="o", label=family)
        base = [reward for r in runs if r["task"] == task for reward in r.get("sample_rewards", [])]
        if base:  # every seed's samples of the starting model
            curve = best_frontier(base)
            curve.append((max(r["kl"] for r in runs if r["task"] == task), curve[-1][1]))  # flat past the best sample
            ax.plot(*zip(*curve, strict=True), "k--", linewidth=1, label="best possible: π_ref·exp(r/τ)")
        ax.set(title=f"{task}: held-out reward vs KL(π‖π_ref)", xlabel="KL(π‖π_ref), nats", ylabel="held-out reward")
        ax.set_xscale("symlog", linthresh=0.5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _family(point: str) -> str:
    """The sweep a point belongs to: the name without its τ/β."""
    return point.rsplit("_", 1)[0] if point[-1].isdigit() else point


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    saved = run_sweep(args)
    print(table(saved["runs"]))
    if args.plot:
        plot(saved["runs"], Path(args.output).with_suffix(".png"))
    return saved


if __name__ == "__main__":
    main()
