"""Reward–KL frontier on a real model, under a fair protocol: for a given distance from the starting model, which
trainer buys the most held-out reward, with which settings?

Each run trains a LoRA adapter (r 16, all linear layers) on SmolLM2-135M-Instruct (offline, CPU) on the same 288
training rows — the model's own answers to 48 one-digit additions, 6 per prompt, sampled by `trl-rpo generate` at
temperature 1 with no top-k/top-p and up to 128 new tokens (`benchmarks/frontier_data/`, made by `--make-data`) —
rescored by each task's reward. It is then measured on the 52 addition prompts that are not training prompts, 8
samples each (416 samples, temperature 1, no truncation, 128 new tokens): the mean task reward with its standard
error over prompts, and KL(π‖π_ref) estimated for every method the same way, as the mean over those samples of
log π(y|x) − log π_ref(y|x) (summed over the sampled tokens and the EOS; π_ref is the base model, the adapter
disabled).

Tasks (same prompts and completions, three rewards):

* `arithmetic`: the demo's reward (1 for the right number, partial credit when close);
* `format` (binary): 1 when the answer is one short sentence: it ends with a period and has at most 12 words;
* `graded` (dense): ½ · arithmetic + ½ · brevity, brevity = max(0, 1 − words/30).

Methods are families swept over τ (RPO) or β (KTO), each at the learning rate picked for it on the format task
(`LEARNING_RATES`, see docs/benchmarks.md); `--lrs` overrides it (the learning-rate grid). Same LoRA, batch (6 =
one prompt's rows) and steps (40) for all. The analysis compares the curves at equal KL: each family's reward
is interpolated along its τ/β sweep (the starting model is every curve's origin), averaged over seeds, and the
difference to KTO's best family gets a paired bootstrap confidence interval (held-out prompts resampled once for
all methods, seeds resampled per family). Results are appended run by run to the JSON (a rerun skips finished
runs), then tabulated, compared and plotted.

    python benchmarks/frontier.py --make-data            # the training rows (`trl-rpo generate`), minutes
    python benchmarks/frontier.py --tasks format --seeds 1 --points kto_b0.3,rpo_mc_t0.25 --lrs 2.5e-4,5e-4,1e-3
    python benchmarks/frontier.py --tasks format,arithmetic,graded --seeds 3   # the sweep: hours on 2 CPU cores
    python benchmarks/frontier.py --report               # tables, comparisons, goals and plot from the JSON
    python benchmarks/frontier.py --quick                # a tiny random model, seconds: what CI runs
"""

import argparse
import itertools
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
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


RESULTS = ROOT / "benchmarks" / "results" / "frontier_fair_cpu.json"
DATA = ROOT / "benchmarks" / "frontier_data"
DEMO_TRAIN = ROOT / "examples" / "smollm2_demo" / "data" / "train.jsonl"
SYSTEM = "Answer in one short sentence."  # without it, a third of the model's answers run past 128 tokens
TASKS = ("arithmetic", "format", "graded")
FORMAT_MAX_WORDS = 12
BREVITY_WORDS = 30
SAMPLING = {"num_generations": 6, "temperature": 1.0, "max_new_tokens": 128, "seed": 0}
KL_WINDOW = (1.0, 6.0)  # the goals' range of KL, nats

SUM_MC = {"logps_aggregation": "sum", "partition_estimator": "monte_carlo"}
GROUPED = {"train_sampling_strategy": "group_by_prompt"}
# family: (method, options, the τ or β values it is swept over)
FAMILIES = {
    "base": ("base", {}, ()),  # the starting model (a LoRA adapter that has not moved): KL 0
    "kto": ("kto", {}, (0.1, 0.3, 1.0)),  # labels: reward above the training mean; weights 1/1
    "kto_rec": ("kto", {"desirable_weight": "recommended"}, (0.1, 0.3, 1.0)),  # TRL's recommended weights
    "kto_time": ("kto", {"desirable_weight": "recommended", "max_steps": "one third"}, (0.1, 0.3, 1.0)),
    "rpo_defaults": ("rpo", {}, (5.0,)),  # the authors' settings: mean log-probs, empirical partition, τ 5
    "rpo_mc": ("rpo", SUM_MC, (1.0, 0.25, 0.1, 0.05, 0.025)),  # the Monte-Carlo partition (τ_Z = τ)
    "rpo_mc_eb": ("rpo", SUM_MC | {"value_shrinkage": "empirical_bayes"}, (0.25, 0.1, 0.05)),
    "rpo_mc_tzinf": ("rpo", SUM_MC | {"partition_temperature": math.inf}, (0.5, 0.25, 0.1, 0.05)),
    "rpo_mc_tz1": ("rpo", SUM_MC | {"partition_temperature": 1.0}, (0.25, 0.1, 0.05)),
    "rpo_mc_tzinf_eb": (
        "rpo",
        SUM_MC | {"partition_temperature": math.inf, "value_shrinkage": "empirical_bayes"},
        (0.5, 0.25, 0.1, 0.05, 0.025, 0.0125),
    ),
    "rpo_mc_tzinf_eb_h1": (  # the same, with Huber's loss of the residual (its gradient clipped to ±1 nat)
        "rpo",
        SUM_MC | {"partition_temperature": math.inf, "value_shrinkage": "empirical_bayes", "huber_delta": 1.0},
        (0.05, 0.0125),
    ),
    "rpo_mc_lw0.1": ("rpo", SUM_MC | GROUPED | {"level_weight": 0.1}, (0.25, 0.1, 0.05)),
    "rpo_mc_tzinf_lw0.1": (
        "rpo",
        SUM_MC | GROUPED | {"partition_temperature": math.inf, "level_weight": 0.1},
        (0.25, 0.1, 0.05),
    ),
    "rpo_none": ("rpo", {"logps_aggregation": "sum", "partition_estimator": "none"}, (0.5, 0.25, 0.1, 0.05)),
}
# The learning rate of each method, picked on the format task, seed 0, from a grid of at least 3 rates (the most
# held-out reward at KL ≤ 6 nats; docs/benchmarks.md): KTO's on kto_rec β 0.3 (2.5e-4 … 2e-3), RPO's on
# rpo_mc_tzinf τ 0.25 (5e-4 … 2e-3) and rpo_mc_tzinf_eb τ 0.05. Families without an entry share their parent's.
LEARNING_RATES = {
    "kto": 2.5e-4, "kto_rec": 2.5e-4, "rpo_defaults": 5e-4, "rpo_mc": 5e-4, "rpo_mc_tzinf": 5e-4, "rpo_none": 5e-4,
}  # fmt: skip
PARENT = {"kto_time": "kto_rec", "rpo_mc_tz1": "rpo_mc", "rpo_mc_lw0.1": "rpo_mc"}
KTO_FAMILIES = ("kto", "kto_rec", "kto_time")
PARTITIONED = (
    "rpo_mc", "rpo_mc_eb", "rpo_mc_tzinf", "rpo_mc_tz1", "rpo_mc_tzinf_eb", "rpo_mc_tzinf_eb_h1", "rpo_mc_lw0.1",
    "rpo_mc_tzinf_lw0.1",
)  # fmt: skip


def point_name(family: str, value: float) -> str:
    return f"{family}_{'b' if FAMILIES[family][0] == 'kto' else 't'}{value:g}"


POINTS = {"base": ("base", ())} | {
    point_name(family, value): (family, value) for family, (_, _, values) in FAMILIES.items() for value in values
}


def learning_rate(family: str) -> float:
    family = PARENT.get(family, family)
    if family in LEARNING_RATES:
        return LEARNING_RATES[family]
    return LEARNING_RATES["rpo_mc"] if family.startswith("rpo_mc") else 1e-3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="format")
    p.add_argument("--points", default="base", help=f"comma-separated, among {list(POINTS)}; or family names")
    p.add_argument("--seeds", default="1", help="a count n ≥ 1 (seeds 0..n-1) or a list: `0,` is seed 0 alone")
    p.add_argument("--lrs", default=None, help="learning rates to run (default: each family's LEARNING_RATES)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--eval-samples", type=int, default=8, help="samples per held-out prompt")
    p.add_argument("--max-new-tokens", type=int, default=SAMPLING["max_new_tokens"])
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the equal-KL comparison")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--make-data", action="store_true", help="sample the training rows with `trl-rpo generate`")
    p.add_argument("--report", action="store_true", help="only tabulate, compare and plot the JSON")
    p.add_argument("--quick", action="store_true", help="a tiny random model and a few rows: a smoke run")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    args = p.parse_args(argv)
    args.tasks = args.tasks.split(",")
    args.points = [q for name in args.points.split(",") for q in _expand(name, p)]
    args.seeds = list(range(int(args.seeds))) if args.seeds.isdigit() else [int(s) for s in args.seeds.split(",") if s]
    if not args.seeds:  # `--seeds 0` is a count of none: a sweep that runs nothing must not look finished
        p.error("--seeds 0 runs nothing: give a count ≥ 1 (seeds 0..n-1) or a list (`0,` for seed 0 alone)")
    args.lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else None
    if set(args.tasks) - set(TASKS):
        p.error(f"unknown tasks {sorted(set(args.tasks) - set(TASKS))}; choose among {TASKS}")
    if args.quick:
        args.steps, args.batch, args.eval_samples, args.max_new_tokens, args.bootstrap = 2, 6, 2, 6, 50
    return args


def _expand(name: str, parser) -> list[str]:
    """A point name, or a family name standing for its whole sweep."""
    if name in POINTS:
        return [name]
    if name in FAMILIES:
        return [point for point, (family, _) in POINTS.items() if family == name]
    parser.error(f"unknown point or family {name!r}; points: {list(POINTS)}")


# ------------------------------------------------------------------------------------------------- the tasks
def completion_text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def task_reward(task: str, completion, answer: int) -> float:
    text = completion_text(completion)
    if task == "arithmetic":
        return arithmetic_reward(text, answer)
    brevity = max(0.0, 1.0 - len(text.split()) / BREVITY_WORDS)
    if task == "graded":
        return 0.5 * arithmetic_reward(text, answer) + 0.5 * brevity
    return float(text.strip().endswith(".") and len(text.split()) <= FORMAT_MAX_WORDS)


def prompt_messages(a: int, b: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}]


def train_problems() -> list[tuple[int, int]]:
    """The demo's 48 training additions, in its order (their operands read back from its prompts)."""
    problems = []
    for line in DEMO_TRAIN.read_text().splitlines():
        a, b = map(int, re.findall(r"\d+", json.loads(line)["prompt"][-1]["content"]))
        if (a, b) not in problems:
            problems.append((a, b))
    return problems


def held_out_problems() -> list[tuple[int, int]]:
    """Every one-digit addition that is not a training prompt (52)."""
    train = set(train_problems())
    return [(a, b) for a in range(10) for b in range(10) if (a, b) not in train]


def make_data(model: str) -> None:
    """The training rows: `trl-rpo generate` on the training prompts, at the settings of `SAMPLING`."""
    DATA.mkdir(parents=True, exist_ok=True)
    prompts = [{"prompt": prompt_messages(a, b), "answer": a + b} for a, b in train_problems()]
    (DATA / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
    command = ["trl-rpo", "generate", "--model_name_or_path", model, "--dataset_name", str(DATA / "prompts.jsonl")]
    command += ["--output_dir", str(DATA / "samples"), "--dtype", "float32", "--batch_size", "16"]
    command += [f"--{key}={value}" for key, value in SAMPLING.items()]
    print(shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def load_rows(task: str, quick: bool) -> tuple[list[dict], list[dict]]:
    """The training rows (rescored for `task`) and the held-out prompts."""
    rows = [json.loads(line) for line in (DATA / "samples" / "completions.jsonl").read_text().splitlines()]
    held_out = [{"prompt": prompt_messages(a, b), "answer": a + b} for a, b in held_out_problems()]
    if quick:
        rows, held_out = rows[:12], held_out[:3]
    for row in rows:
        row["reward"] = task_reward(task, row["completion"], row["answer"])
    return rows, held_out


def training_columns(method: str, rows: list[dict]) -> dict[str, list]:
    """The columns each trainer reads, from the same rows (KTO: desirable = reward above the rows' mean)."""
    columns = {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}
    if method == "kto":
        mean = statistics.fmean(r["reward"] for r in rows)
        return columns | {"label": [r["reward"] > mean for r in rows]}
    return columns | {"reward": [r["reward"] for r in rows]}


def recommended_desirable_weight(labels: list[bool]) -> float:
    """The middle of TRL's KTOTrainer's recommended range: desirable_weight · #desirable / #undesirable in [1, 4/3]."""
    desirable = sum(labels)
    return round((len(labels) - desirable) / max(desirable, 1) * 7 / 6, 3)


# ------------------------------------------------------------------------------------------------- one run
def train(family: str, value: float, model_path: str, rows: list[dict], args, seed: int, lr: float, work: str):
    from peft import LoraConfig
    from trl import KTOConfig, KTOTrainer

    from trl_rpo import RPOConfig, RPOTrainer

    method, options, _ = FAMILIES[family]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "base":
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora)
        base = SimpleNamespace(model=model, processing_class=AutoTokenizer.from_pretrained(model_path))
        return base, {"setup_seconds": 0.0, "train_seconds": 0.0, "steps": 0}
    columns = training_columns(method, rows)
    options = dict(options)
    if options.get("desirable_weight") == "recommended":
        options["desirable_weight"] = recommended_desirable_weight(columns["label"])
    steps = args.steps // 3 if options.pop("max_steps", None) == "one third" else args.steps
    common = {
        "output_dir": work, "max_steps": steps, "per_device_train_batch_size": args.batch, "learning_rate": lr,
        "lr_scheduler_type": "constant_with_warmup", "warmup_steps": min(4, steps // 10), "logging_steps": 10,
        "save_strategy": "no", "report_to": "none", "seed": seed, "bf16": False, "use_cpu": True,
        "disable_tqdm": True, "gradient_checkpointing": False, "beta": value,
    }  # fmt: skip
    if method == "rpo":
        config, trainer_class = RPOConfig(**common, cache_ref_log_probs=False, **options), RPOTrainer
    else:
        # KTO's reference log-probs precomputed once, as RPO's are: the same objective, KTO's fastest setting
        config, trainer_class = KTOConfig(**common, precompute_ref_log_probs=True, **options), KTOTrainer
    start = time.perf_counter()  # from the raw rows: tokenization and RPO's target pass count
    trainer = trainer_class(model_path, args=config, train_dataset=Dataset.from_dict(columns), peft_config=lora)
    setup = time.perf_counter() - start
    trainer.train()
    seconds = {"setup_seconds": round(setup, 1), "train_seconds": round(time.perf_counter() - start - setup, 1)}
    return trainer, seconds | {"steps": steps, "options": _json_options(options)}


def _json_options(options: dict) -> dict:
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in options.items()}


@torch.no_grad()
def sample(model, prompts: list[list[int]], n: int, max_new_tokens: int, eos_ids: list[int], pad_id: int, seed: int):
    """`n` samples of each prompt at temperature 1 with no truncation, all prompts in one left-padded batch from
    which finished samples leave as they end (so the cost follows the samples' lengths, not the longest one).

    Returns, per sample in prompt order: the new tokens before its end, the end token it sampled (None when it
    reached `max_new_tokens` first), and its log-prob under `model` (summed over the new tokens and the end token)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = [p for p in prompts for _ in range(n)]
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in rows], device=device)
    pads = torch.tensor([width - len(p) for p in rows], device=device)
    mask = (torch.arange(width, device=device)[None] >= pads[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits, position = out.past_key_values, out.logits[:, -1], positions[:, -1] + 1
    alive, eos = torch.arange(len(rows), device=device), torch.tensor(eos_ids, device=device)
    tokens, ends, logps = [[] for _ in rows], [None] * len(rows), [0.0] * len(rows)
    for step in range(max_new_tokens):
        log_probs = torch.log_softmax(logits.float(), -1)
        chosen = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
        chosen_logps = log_probs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
        ended = torch.isin(chosen, eos)
        for row, token, logp, end in zip(alive.tolist(), chosen.tolist(), chosen_logps, ended.tolist(), strict=True):
            logps[row] += logp
            if end:
                ends[row] = token
            else:
                tokens[row].append(token)
        if step == max_new_tokens - 1 or ended.all():
            break
        if ended.any():  # finished samples leave the batch, and their cache rows with them
            keep = (~ended).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, chosen, mask, position = alive[keep], chosen[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], -1)
        out = model(
            input_ids=chosen[:, None], attention_mask=mask, position_ids=position[:, None], past_key_values=cache,
            use_cache=True,
        )  # fmt: skip
        logits, position = out.logits[:, -1], position + 1
    return tokens, ends, logps


@torch.no_grad()
def sequence_logps(model, prompt: list[int], completions: list[list[int]], ends: list, pad: int) -> list[float]:
    """Summed log-prob under `model` of each completion of one prompt, its end token included when it has one."""
    sequences = [prompt + c + ([] if end is None else [end]) for c, end in zip(completions, ends, strict=True)]
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, len(prompt) - 1 : -1].float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, len(prompt) :, None]).squeeze(-1)
    return (token_logps * mask[:, len(prompt) :]).sum(-1).tolist()


def measure(trainer, task: str, held_out: list[dict], args, seed: int) -> dict:
    """Held-out reward and KL(π‖π_ref) from `eval_samples` samples of the trained policy per held-out prompt: the
    means, their standard errors over prompts, the per-prompt means (the bootstrap's input) and the share of samples
    that reached `max_new_tokens`."""
    model, tokenizer = trainer.model, trainer.processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    model.eval()
    prompts = [_prompt_ids(tokenizer, row["prompt"]) for row in held_out]
    eos, n = tokenizer.eos_token_id, args.eval_samples
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    tokens, ends, policy = sample(model, prompts, n, args.max_new_tokens, [eos], pad, seed)
    rewards, kls = [], []
    for i, (row, prompt) in enumerate(zip(held_out, prompts, strict=True)):
        part = slice(i * n, (i + 1) * n)
        with model.disable_adapter():
            reference = sequence_logps(model, prompt, tokens[part], ends[part], pad)
        kls.append(statistics.fmean(p - r for p, r in zip(policy[part], reference, strict=True)))
        texts = tokenizer.batch_decode(tokens[part], skip_special_tokens=True)
        rewards.append([task_reward(task, text, row["answer"]) for text in texts])
    prompt_rewards = [statistics.fmean(r) for r in rewards]
    return {
        "reward": statistics.fmean(prompt_rewards), "reward_se": _se(prompt_rewards),
        "kl": statistics.fmean(kls), "kl_se": _se(kls), "truncated": statistics.fmean(end is None for end in ends),
        "prompt_rewards": prompt_rewards, "prompt_kls": kls, "sample_rewards": [x for r in rewards for x in r],
    }  # fmt: skip


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def _prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_REFERENCE_LOGPS: dict[tuple, float] = {}  # (prompt ids, completion ids) -> log π_ref, filled by `training_fit`


@torch.no_grad()
def training_fit(trainer, rows: list[dict]) -> dict[str, float]:
    """How training moved the summed log π/π_ref of its own rows, for those above and below the rows' mean reward
    (what KTO labels desirable and undesirable); for RPO also the targets it regressed onto and how well it fits them,
    in its aggregation's units (R² over the rows)."""
    model, eos = trainer.model, _eos(trainer)
    model.eval()
    pairs = _training_ids(trainer, rows)
    by_prompt: dict[tuple, list[int]] = {}  # a prompt's rows share one forward
    for i, (prompt, _) in enumerate(pairs):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    ratios = [0.0] * len(pairs)
    for prompt, members in by_prompt.items():
        completions, ends = [pairs[i][1] for i in members], [None] * len(members)  # the rows' own ids, end included
        policy = sequence_logps(model, list(prompt), completions, ends, eos)
        keys = [(prompt, tuple(c)) for c in completions]
        if not all(key in _REFERENCE_LOGPS for key in keys):  # the base model's: the same in every run of a process
            with model.disable_adapter():
                reference = sequence_logps(model, list(prompt), completions, ends, eos)
            _REFERENCE_LOGPS.update(zip(keys, reference, strict=True))
        for i, p, key in zip(members, policy, keys, strict=True):
            ratios[i] = p - _REFERENCE_LOGPS[key]
    lengths = [len(c) for _, c in pairs]
    mean_reward = statistics.fmean(r["reward"] for r in rows)
    above = [r["reward"] > mean_reward for r in rows]
    fit = {
        "log_ratio_above_mean": statistics.fmean(x for x, a in zip(ratios, above, strict=True) if a),
        "log_ratio_below_mean": statistics.fmean(x for x, a in zip(ratios, above, strict=True) if not a),
    }
    if "target" in getattr(getattr(trainer, "train_dataset", None), "column_names", ()):
        fit |= _target_fit(trainer, ratios, lengths, above)
    return fit


def _eos(trainer) -> int:
    return getattr(trainer.processing_class, "tokenizer", trainer.processing_class).eos_token_id


def _training_ids(trainer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each training row: the trainer's own where it keeps them (RPO), else the chat template's."""
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
    path = model_path(args.quick)
    for task in args.tasks:
        rows, held_out = load_rows(task, args.quick)
        for seed in args.seeds:
            for point in args.points:
                family = POINTS[point][0]
                for lr in [0.0] if family == "base" else args.lrs or [learning_rate(family)]:
                    if (task, point, seed, lr) in _finished(output):  # read again: another worker may have run it
                        continue
                    run = one_run(task, point, seed, lr, path, rows, held_out, args)
                    _print_run(run)
                    _append(output, run, _settings(args))
    return _read(output)


def _read(output: Path) -> dict:
    return json.loads(output.read_text()) if output.is_file() else {"runs": []}


def _finished(output: Path) -> set[tuple]:
    return {(r["task"], r["point"], r["seed"], r["lr"]) for r in _read(output)["runs"]}


def _append(output: Path, run: dict, settings: dict) -> None:
    """Add one run to the JSON under a lock and atomically, after every run: the sweep resumes where it stopped,
    and several workers (one per core: `--threads 1`) can fill one file."""
    import fcntl

    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = _read(output)
        saved["runs"].append(run)
        saved |= {"machine": platform.platform(), "settings": settings}
        temporary = output.with_suffix(".tmp")
        temporary.write_text(json.dumps(saved) + "\n")
        temporary.replace(output)


def one_run(task, point, seed, lr, path, rows, held_out, args) -> dict:
    family, value = POINTS[point]
    random.seed(seed)
    with tempfile.TemporaryDirectory() as work:  # the trainer's output_dir: nothing kept
        trainer, seconds = train(family, value, path, rows, args, seed, lr, work)
    start = time.perf_counter()
    measured = measure(trainer, task, held_out, args, seed)
    measured["measure_seconds"] = round(time.perf_counter() - start, 1)
    run = {"task": task, "point": point, "family": family, "value": value, "seed": seed, "lr": lr, "date":
           date.today().isoformat(), **seconds, **measured, "fit": training_fit(trainer, rows)}  # fmt: skip
    if family != "base":  # the starting model's samples draw the best possible frontier; others' are kept per prompt
        del run["sample_rewards"]
    return run


def _print_run(run: dict) -> None:
    seconds = f"{run['setup_seconds'] + run['train_seconds']:.0f} + {run['measure_seconds']:.0f} s"
    print(f"{run['task']:>10} {run['point']:>22} seed {run['seed']} lr {run['lr']:g}: reward {run['reward']:.3f} ± "
          f"{run['reward_se']:.3f} KL {run['kl']:6.2f} ({seconds})", flush=True)  # fmt: skip


def _settings(args) -> dict:
    keep = ("steps", "batch", "eval_samples", "max_new_tokens", "quick")
    return {k: getattr(args, k) for k in keep} | {"training_rows": SAMPLING, "system_prompt": SYSTEM}


# ------------------------------------------------------------------------------------------------- analysis
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


def bound_at(curve: list[tuple[float, float]], kl: float) -> float:
    """The bound's reward at `kl` (flat past its last point; the starting model's reward at KL ≤ 0)."""
    kls, rewards = zip(*curve, strict=True)
    return _interpolate(list(kls), list(rewards), max(kl, min(kls)), extrapolate_right=True)


def _interpolate(xs: list[float], ys: list[float], x: float, extrapolate_right: bool = False) -> float:
    """Linear interpolation along the points sorted by x; NaN outside their range (or flat past the last point)."""
    points = sorted(zip(xs, ys, strict=True))
    if x > points[-1][0]:
        return points[-1][1] if extrapolate_right else math.nan
    if x < points[0][0]:
        return math.nan
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def family_curves(runs: list[dict], task: str) -> dict[str, dict[int, list[dict]]]:
    """Per family (at its learning rate), per seed: its sweep's runs plus the starting model of that seed."""
    base = {r["seed"]: r for r in runs if r["task"] == task and r["family"] == "base"}
    curves: dict[str, dict[int, list[dict]]] = {}
    for r in runs:
        if r["task"] != task or r["family"] == "base" or r["lr"] != learning_rate(r["family"]):
            continue
        if r["seed"] in base:
            curves.setdefault(r["family"], {}).setdefault(r["seed"], [base[r["seed"]]]).append(r)
    return curves


def curve_at(seeds: dict[int, list[dict]], grid: list[float], prompts=None, seed_pick=None) -> list[float]:
    """The family's reward at each KL of `grid`: per seed, interpolated along its sweep (rewards and KLs averaged
    over `prompts`, all by default), then averaged over the seeds (`seed_pick`, all by default)."""
    per_seed = []
    for seed in seed_pick if seed_pick is not None else sorted(seeds):
        points = seeds[seed]
        kls = [_mean_over(p["prompt_kls"], prompts) for p in points]
        rewards = [_mean_over(p["prompt_rewards"], prompts) for p in points]
        per_seed.append([_interpolate(kls, rewards, x) for x in grid])
    return [statistics.fmean(values) for values in zip(*per_seed, strict=True)]  # NaN where a seed lacks the KL


def _mean_over(values: list[float], indices) -> float:
    return statistics.fmean(values) if indices is None else statistics.fmean(values[i] for i in indices)


def compare(runs: list[dict], task: str, family: str, grid: list[float], resamples: int, seed: int = 0) -> dict:
    """`family` minus KTO's best family at each KL of `grid`: the estimate and a 95 % paired bootstrap interval
    (held-out prompts resampled, the same draw for every method; seeds resampled per family)."""
    curves = family_curves(runs, task)
    kto = [f for f in KTO_FAMILIES if f in curves]
    if family not in curves or not kto:
        return {}

    def difference(prompts=None, rng=None) -> list[float]:
        pick = lambda seeds: None if rng is None else [rng.choice(sorted(seeds)) for _ in seeds]  # noqa: E731
        ours = curve_at(curves[family], grid, prompts, pick(curves[family]))
        best = [max((v for v in values if not math.isnan(v)), default=math.nan) for values in zip(
            *(curve_at(curves[f], grid, prompts, pick(curves[f])) for f in kto), strict=True)]  # fmt: skip
        return [a - b for a, b in zip(ours, best, strict=True)]

    num_prompts = len(next(iter(curves[family].values()))[0]["prompt_rewards"])
    rng = random.Random(seed)
    draws = [difference([rng.randrange(num_prompts) for _ in range(num_prompts)], rng) for _ in range(resamples)]
    low, high = [], []
    for values in zip(*draws, strict=True):
        finite = sorted(v for v in values if not math.isnan(v))
        enough = len(finite) >= 0.9 * len(values)
        low.append(finite[int(0.025 * len(finite))] if enough else math.nan)
        high.append(finite[int(0.975 * len(finite)) - 1] if enough else math.nan)
    return {"kl": grid, "difference": difference(), "ci_low": low, "ci_high": high, "kto_families": kto}


def summary_rows(runs: list[dict]) -> list[dict]:
    """One row per task, point and learning rate: means over seeds and the seed-to-seed spread."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["point"], run["lr"]), []).append(run)
    rows = []
    for (task, point, lr), group in groups.items():
        mean = lambda key, group=group: statistics.fmean(r[key] for r in group)  # noqa: E731
        rows.append({
            "task": task, "point": point, "family": group[0]["family"], "lr": lr, "seeds": len(group),
            "reward": mean("reward"), "reward_se": math.sqrt(sum(r["reward_se"] ** 2 for r in group)) / len(group),
            "reward_seed_sd": statistics.stdev([r["reward"] for r in group]) if len(group) > 1 else math.nan,
            "kl": mean("kl"), "seconds": mean("setup_seconds") + mean("train_seconds"), "truncated": mean("truncated"),
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["task"], r["kl"]))


def table(runs: list[dict]) -> str:
    lines = [
        "| task | point | lr | seeds | held-out reward ± SE (seed sd) | KL(π‖π_ref) | setup + train s | cut |",
        "|---" * 8 + "|",
    ]
    for r in summary_rows(runs):
        sd = "" if math.isnan(r["reward_seed_sd"]) else f" ({r['reward_seed_sd']:.3f})"
        lines.append(
            f"| {r['task']} | {r['point']} | {r['lr']:g} | {r['seeds']} | {r['reward']:.3f} ± {r['reward_se']:.3f}{sd}"
            f" | {r['kl']:.2f} | {r['seconds']:.0f} | {r['truncated']:.0%} |"
        )
    return "\n".join(lines)


def learning_rate_table(runs: list[dict]) -> str:
    """The learning-rate grid: per family and learning rate, the most reward at KL ≤ 6 nats and where."""
    lines = ["| task | family | lr | runs | best reward at KL ≤ 6 (point, KL) |", "|---" * 5 + "|"]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if run["family"] != "base":
            groups.setdefault((run["task"], run["family"], run["lr"]), []).append(run)
    for (task, family, lr), group in sorted(groups.items()):
        inside = [r for r in group if r["kl"] <= KL_WINDOW[1]]
        best = max(inside, key=lambda r: r["reward"], default=None)
        text = "none" if best is None else f"{best['reward']:.3f} ({best['point']}, {best['kl']:.2f})"
        chosen = " ←" if lr == learning_rate(family) else ""
        lines.append(f"| {task} | {family} | {lr:g}{chosen} | {len(group)} | {text} |")
    return "\n".join(lines)


def goals(runs: list[dict], resamples: int) -> dict:
    """Issue #18's goals per task, each met or not, with the numbers that decide it."""
    grid = [1.0 + 0.5 * i for i in range(11)]  # 1 … 6 nats
    report = {}
    for task in sorted({r["task"] for r in runs}):
        curves = family_curves(runs, task)
        base = [x for r in runs if r["task"] == task and r["family"] == "base" for x in r["sample_rewards"]]
        comparisons = {f: compare(runs, task, f, grid, resamples) for f in PARTITIONED if f in curves}
        comparisons = {f: c for f, c in comparisons.items() if c}
        entry = {"comparisons": comparisons}
        for family, c in comparisons.items():
            lows = [x for x in c["ci_low"] if not math.isnan(x)]
            covered = [k for k, x in zip(c["kl"], c["ci_low"], strict=True) if not math.isnan(x)]
            entry.setdefault("equal_kl", {})[family] = {
                "met": bool(lows) and min(lows) > -0.05 and covered == grid,
                "worst_ci_low": min(lows, default=math.nan),
                "kl_covered": [min(covered), max(covered)] if covered else [],
            }
        entry["time"] = _time_goal(runs, task, curves)
        if base:
            entry["bound"] = _bound_goal(runs, task, curves, base)
        if task == "format":
            entry["format_0.75"] = {
                f: max((r["reward"] for r in summary_rows(runs) if r["task"] == task and r["family"] == f
                        and r["kl"] <= 5.6 and r["lr"] == learning_rate(f)), default=math.nan)
                for f in curves if f in PARTITIONED
            }  # fmt: skip
        report[task] = entry
    return report


def _time_goal(runs: list[dict], task: str, curves: dict) -> dict:
    """Mean setup + training seconds per run of each family, as a share of the KTO families'."""
    seconds = {f: statistics.fmean(r["setup_seconds"] + r["train_seconds"] for s in seeds.values() for r in s[1:])
               for f, seeds in curves.items()}  # fmt: skip
    kto = [seconds[f] for f in ("kto", "kto_rec") if f in seconds]
    if not kto:
        return {}
    return {f: round(s / statistics.fmean(kto), 3) for f, s in seconds.items()}


def _bound_goal(runs: list[dict], task: str, curves: dict, base_rewards: list[float]) -> dict:
    """At the KL of KTO's best point (the most held-out reward, mean over seeds): the bound, and each family's reward
    there (interpolated along its sweep)."""
    kto = [r for r in summary_rows(runs) if r["task"] == task and r["family"] in KTO_FAMILIES
           and r["lr"] == learning_rate(r["family"])]  # fmt: skip
    if not kto:
        return {}
    best = max(kto, key=lambda r: r["reward"])
    at = {f: curve_at(seeds, [best["kl"]])[0] for f, seeds in curves.items()}
    return {"kto_best": best["point"], "kl": best["kl"], "kto_reward": best["reward"],
            "bound": bound_at(best_frontier(base_rewards), best["kl"])} | at  # fmt: skip


def goals_markdown(result: dict) -> str:
    """The goals of issue #18 per task, each met or not, with the numbers that decide it."""
    lines = []
    for task, entry in result.items():
        lines.append(f"\n**{task}**\n")
        lines.append("| partitioned family | ≥ KTO's best at equal KL, 1–6 nats (worst 95 % CI low) | KL covered | "
                     "setup + train vs KTO |")  # fmt: skip
        lines.append("|---|---|---|---|")
        for family, goal in entry.get("equal_kl", {}).items():
            covered = "–".join(f"{k:g}" for k in goal["kl_covered"]) or "none"
            share = entry.get("time", {}).get(family, math.nan)
            lines.append(f"| {family} | {'met' if goal['met'] else 'not met'} ({goal['worst_ci_low']:+.3f}) | "
                         f"{covered} | {share:.2f} |")  # fmt: skip
        bound = entry.get("bound")
        if bound:
            lines.append(f"\nAt KTO's best point ({bound['kto_best']}, {bound['kl']:.2f} nats, reward "
                         f"{bound['kto_reward']:.3f}) the bound is {bound['bound']:.3f}; "
                         + ", ".join(f"{f} {v:.3f}" for f, v in bound.items() if f in PARTITIONED and not
                                     math.isnan(v)))  # fmt: skip
        if "format_0.75" in entry:
            reached = {f: v for f, v in entry["format_0.75"].items() if not math.isnan(v)}
            verdicts = [f"{f} {'met' if v >= 0.75 else 'not met'} ({v:.3f})" for f, v in reached.items()]
            lines.append("Format, ≥ 0.75 at ≤ 5.6 nats: " + ", ".join(verdicts))
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [r for r in summary_rows(runs) if r["task"] == task and (r["family"] == "base" or
                r["lr"] == learning_rate(r["family"]))]  # fmt: skip
        base = [r for r in rows if r["family"] == "base"]
        for family in sorted({r["family"] for r in rows} - {"base"}):
            curve = sorted(
                (r["kl"], r["reward"], r["reward_se"]) for r in base + [r for r in rows if r["family"] == family]
            )
            kls, rewards, ses = zip(*curve, strict=True)
            style = "-" if family in PARTITIONED else "--" if family in KTO_FAMILIES else ":"
            ax.errorbar(kls, rewards, yerr=ses, marker="o", markersize=4, linestyle=style, capsize=2, label=family)
        samples = [x for r in runs if r["task"] == task and r["family"] == "base" for x in r["sample_rewards"]]
        if samples:
            curve = best_frontier(samples)
            curve.append((max(r["kl"] for r in rows), curve[-1][1]))
            ax.plot(*zip(*curve, strict=True), "k--", linewidth=1, label="best possible: π_ref·exp(r/τ)")
        ax.set(title=f"{task}: held-out reward vs KL(π‖π_ref)", xlabel="KL(π‖π_ref), nats", ylabel="held-out reward")
        ax.set_xscale("symlog", linthresh=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(saved: dict, args) -> dict:
    runs = saved["runs"]
    print(table(runs))
    print("\nLearning-rate grid (← the rate used):\n" + learning_rate_table(runs))
    result = goals(runs, args.bootstrap)
    print("\nGoals (issue #18):" + goals_markdown(result))
    if args.plot and runs:
        plot(runs, Path(args.output).with_suffix(".png"))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.make_data:
        make_data(model_path(args.quick))
        return {}
    saved = json.loads(Path(args.output).read_text()) if args.report else run_sweep(args)
    saved["goals"] = report(saved, args)
    return saved


if __name__ == "__main__":
    main()
