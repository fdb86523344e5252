"""Known-optimum study: how close does each trainer get to the KL-regularised optimum π* ∝ π_ref·exp(r/τ)?

Every prompt has a small set of candidate completions, so π* is known exactly: over the candidates of x,
π*(y|x) = softmax_y(log π_ref(y|x) + r(x, y)/τ), where log π_ref is the sequence log-prob of the initial tiny
model. Policies are measured on the same candidates, renormalised (the task's completion space is the candidate
set). Three data sets are drawn from each task:

* `full`: every candidate once, so the empirical partition sees the whole support;
* `sparse`: a random subset of each prompt's candidates (a quarter of the prompts keep a single completion);
* `sampled`: as many draws per prompt as candidates, from π_ref over the candidates, with repeats (the
  Monte-Carlo setting, where `partition_estimator="monte_carlo"` is consistent).

`--binary` runs the same model with a binary reward instead (each candidate a success with probability 1/4; every
prompt has one) at a small τ (`--binary-tau`, 0.1), the form in which the level of RPO's targets matters: π* keeps
almost nothing on failures, and a few samples per prompt make the Monte-Carlo partition push every failure down by
≈ 1/τ. Its data sets: `binary_full` (every candidate once: the consistency check), `binary_sampled` (6 draws per
prompt from π_ref, some prompts without a success: the level problem) and `binary_many` (48 draws per prompt, where
the Monte-Carlo partition is nearly consistent: the cost in TV of a partition temperature τ_Z ≠ τ). The methods add
the level options of `RPOConfig`: τ_Z = ∞ (V̂ = the prompt's mean reward) or 1, empirical-Bayes shrinkage, and the
level-weighted loss (λ = 0.1, prompts batched whole).

Methods (same model, data, optimiser, batch, steps): RPO with the empirical and Monte-Carlo partition and summed
or mean token log-probs, RPO without a partition (V̂ = 0, the paper's ablation), DRO (learned V_φ, sum), KTO
(labels: reward above the data set's mean) and SFT on each prompt's best observed completion. Rewards are used as
drawn (standard normal, `reward_normalization="none"`), so π* is the optimum for exactly those rewards. Logged
every `--eval-every` steps: total variation and KL(π‖π*) (mean over prompts), expected reward, KL(π‖π_ref), and
every step's training loss.

    python benchmarks/optimum.py                    # the study: every task x method x seed, curves and table
    python benchmarks/optimum.py --tau-sweep        # stability: RPO and DRO for τ in 0.1 0.5 1 2 5
    python benchmarks/optimum.py --iterative        # iterative RPO, K = 1, 2, 4 rounds, same sample budget
    python benchmarks/optimum.py --binary           # a binary reward at τ 0.1: the level options against KTO
    python benchmarks/optimum.py --quick            # a smoke run in seconds

Results go to `benchmarks/results/optimum_cpu.json` (or `optimum_tau_sweep_cpu.json`, `optimum_binary_cpu.json`)
and PNG figures next to it; the markdown tables go to stdout. See README.md.
"""

import argparse
import itertools
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import date


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.utils import logging as hf_logging


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TASKS = ("full", "sparse", "sampled")
BINARY_TASKS = ("binary_full", "binary_sampled", "binary_many")
BINARY_DRAWS = {"binary_sampled": 6, "binary_many": 48}
MC = {"partition_estimator": "monte_carlo", "logps_aggregation": "sum"}
LEVEL = {"level_weight": 0.1, "train_sampling_strategy": "group_by_prompt"}
RPO_VARIANTS = {  # name: RPOConfig options
    "rpo_empirical_sum": {"partition_estimator": "empirical", "logps_aggregation": "sum"},
    "rpo_empirical_mean": {"partition_estimator": "empirical", "logps_aggregation": "mean"},
    "rpo_mc_sum": MC,
    "rpo_mc_mean": {"partition_estimator": "monte_carlo", "logps_aggregation": "mean"},
    "rpo_no_partition": {"partition_estimator": "none", "logps_aggregation": "sum"},
    # the level options (issue #18)
    "rpo_mc_tz_inf": MC | {"partition_temperature": math.inf},
    "rpo_mc_tz_1": MC | {"partition_temperature": 1.0},
    "rpo_mc_tz_inf_eb": MC | {"partition_temperature": math.inf, "value_shrinkage": "empirical_bayes"},
    "rpo_mc_lw0.1": MC | LEVEL,
    "rpo_empirical_lw0.1": {"partition_estimator": "empirical", "logps_aggregation": "sum"} | LEVEL,
}
BINARY_METHODS = (
    "rpo_empirical_sum", "rpo_empirical_lw0.1", "rpo_mc_sum", "rpo_mc_tz_inf", "rpo_mc_tz_1", "rpo_mc_tz_inf_eb",
    "rpo_mc_lw0.1", "rpo_no_partition", "kto",
)  # fmt: skip
# Iterative RPO on the `sampled` task: K rounds, each sampling `--iter-budget / K` completions per prompt from the
# current policy, training the Monte-Carlo partition (summed log-probs) with the sampling policy as reference, τ·K per
# round (K tilts by exp(r/(Kτ)) compose to one by exp(r/τ)) and `--steps / K` steps: the same samples and steps in all.
ITERATIVE = {"rpo_iter_k1": 1, "rpo_iter_k2": 2, "rpo_iter_k4": 4}
METHODS = (*RPO_VARIANTS, "dro", "kto", "sft_best", *ITERATIVE)
STUDY_METHODS = ("rpo_empirical_sum", "rpo_empirical_mean", "rpo_mc_sum", "rpo_mc_mean", "rpo_no_partition", "dro",
                 "kto", "sft_best")  # fmt: skip
SWEEP_METHODS = ("rpo_empirical_sum", "dro")
SWEEP_TAUS = (0.1, 0.5, 1.0, 2.0, 5.0)
# Completions of different token lengths (so that sum and mean aggregation disagree); all start with a space,
# so that prompt + completion tokenises on a clean boundary with the tiny byte-level BPE.
CANDIDATE_POOL = [
    " 3", " 12", " 7 7", " yes", " no", " maybe", " the answer", " good", " bad question", " 19 plus 1",
    " what", " sum of the two",
]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=None, help=f"comma-separated, among {list(METHODS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--tau-sweep", action="store_true", help="RPO and DRO on `full` for τ in 0.1 0.5 1 2 5")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--candidates", type=int, default=6, help="candidate completions per prompt")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--scheduler", default="cosine", help="lr_scheduler_type of every method")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--reference-fit-steps", type=int, default=60, help="Adam steps fitting the reference (see below)")
    p.add_argument("--iter-budget", type=int, default=12, help="samples per prompt over all rounds (iterative RPO)")
    p.add_argument("--iterative", action="store_true", help="iterative RPO, K = 1, 2, 4, on `sampled`")
    p.add_argument("--binary", action="store_true", help="a binary reward at --binary-tau: the level options")
    p.add_argument("--binary-tau", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 methods, a few steps")
    p.add_argument("--output", default=None, help="JSON path (default: results/optimum[_tau_sweep]_<device>.json)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw the figures of a results file")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.prompts, args.candidates = 1, 4, 2, 3, 3
        args.reference_fit_steps, args.warmup_steps = 2, 0
    default_methods = ("rpo_empirical_sum", "kto") if args.quick else STUDY_METHODS
    default_methods = SWEEP_METHODS if args.tau_sweep else ITERATIVE if args.iterative else default_methods
    default_methods = BINARY_METHODS if args.binary and not args.quick else default_methods
    args.methods = args.methods.split(",") if args.methods else list(default_methods)
    args.tasks = ["full"] if args.tau_sweep else ["sampled"] if args.iterative else args.tasks.split(",")
    if args.binary:  # batches of 12: two prompts' rows of `binary_sampled`, whole for the level-weighted loss
        args.tasks, args.tau, args.batch = list(BINARY_TASKS), args.binary_tau, 12
    if args.iterative and args.quick:
        args.iter_budget, args.steps = 4, 8
    for name, chosen, allowed in (("--methods", args.methods, METHODS), ("--tasks", args.tasks, TASKS + BINARY_TASKS)):
        if set(chosen) - set(allowed):
            p.error(f"{name}: choose among {list(allowed)}, got {chosen}")
    if not 1 <= args.candidates <= len(CANDIDATE_POOL):
        p.error(f"--candidates must be between 1 and {len(CANDIDATE_POOL)}")
    return args


# ------------------------------------------------------------------------------------------------ the task
class Candidates:
    """Every (prompt, candidate) pair of a task, tokenised once; `logps(model)` gives [prompts, candidates]."""

    def __init__(self, tokenizer, prompts: list[str], completions: list[list[str]]):
        self.prompts, self.completions = prompts, completions
        sequences, starts = [], []
        for prompt, options in zip(prompts, completions, strict=True):
            prompt_ids = tokenizer(prompt)["input_ids"]
            for completion in options:
                ids = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
                if ids[: len(prompt_ids)] != prompt_ids:
                    raise ValueError(f"{prompt!r} + {completion!r} does not tokenise on the prompt boundary")
                sequences.append(ids)
                starts.append(len(prompt_ids))
        width = max(map(len, sequences))
        self.input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
        positions = torch.arange(width)
        lengths, starts = torch.tensor(list(map(len, sequences))), torch.tensor(starts)
        self.attention_mask = (positions < lengths[:, None]).long()
        # position i predicts token i + 1: the completion tokens (and EOS) are predicted from start - 1 on
        self.scored = (positions[None, 1:] >= starts[:, None]) & (positions[None, 1:] < lengths[:, None])
        self.shape = (len(prompts), len(completions[0]))

    def sequence_logps(self, model) -> torch.Tensor:
        """Summed log-prob of completion + EOS for every candidate, shape [prompts, candidates], with gradients."""
        device = next(model.parameters()).device
        logits = model(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device)).logits
        token_logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, self.input_ids[:, 1:, None].to(device))
        return (token_logps.squeeze(-1) * self.scored.to(device)).sum(-1).view(self.shape)

    @torch.no_grad()
    def logps(self, model) -> torch.Tensor:
        """`sequence_logps` in eval mode, float64 on CPU: what every measurement uses."""
        was_training = model.training
        model.eval()
        logps = self.sequence_logps(model).double().cpu()
        model.train(was_training)
        return logps


def build_task(work_dir: str, args, seed: int) -> dict:
    """A tiny model fitted into the reference, its prompts and candidates, rewards r ~ N(0, 1) and π_ref.

    A random model spreads its mass over the vocabulary, so over the candidates it favours the shortest ones by
    e^5.8 per token and π* would be π_ref. The reference is made a model that "knows the task" instead: the random
    tiny model is fitted (Adam, weighted likelihood) to a random distribution w ~ Dirichlet(1) over each prompt's
    candidates. Whatever the fit reaches, π_ref is then *measured* from the saved model.
    """
    from transformers import AutoTokenizer

    from trl_rpo.testing import save_tiny_causal_lm

    rng = random.Random(seed)
    model_dir = save_tiny_causal_lm(os.path.join(work_dir, f"reference-{seed}"), hidden_size=args.hidden, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pairs = rng.sample([(a, b) for a in range(10) for b in range(10)], args.prompts)
    prompts = [f"{a} + {b} =" for a, b in pairs]
    candidates = Candidates(tokenizer, prompts, [rng.sample(CANDIDATE_POOL, args.candidates) for _ in prompts])
    generator = torch.Generator().manual_seed(seed)
    weights = torch.distributions.Dirichlet(torch.ones(candidates.shape)).sample()  # seeded by set_seed above
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.reference_fit_steps):
        loss = -(weights * candidates.sequence_logps(model)).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)
    rewards = torch.randn(candidates.shape, generator=generator, dtype=torch.float64)
    # The binary reward: each candidate a success with probability 1/4, and one success per prompt at least.
    binary = torch.rand(candidates.shape, generator=generator) < 0.25
    binary[torch.arange(len(prompts)), torch.randint(candidates.shape[1], (len(prompts),), generator=generator)] = True
    return {"model_dir": model_dir, "candidates": candidates, "rewards": rewards, "ref_logps": candidates.logps(model),
            "binary_rewards": binary.double()}  # fmt: skip


def task_for(task: dict, kind: str) -> dict:
    """The task with the rewards of the data set `kind` (binary for the `binary_*` ones)."""
    return task | {"rewards": task["binary_rewards"]} if kind in BINARY_TASKS else task


def optimum(ref_logps: torch.Tensor, rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """π*(y|x) over the candidates: the renormalised π_ref tilted by exp(r/τ)."""
    return torch.softmax(ref_logps + rewards / tau, dim=-1)


def draw_rows(task: dict, kind: str, seed: int) -> list[tuple[int, int]]:
    """(prompt index, candidate index) of every training row of the `kind` data set."""
    rng = random.Random(seed + 1)
    num_prompts, num_candidates = task["candidates"].shape
    if kind in ("full", "binary_full"):
        return [(p, c) for p in range(num_prompts) for c in range(num_candidates)]
    if kind == "sparse":
        rows = []
        for p in range(num_prompts):
            keep = 1 if p % 4 == 0 else rng.randint(2, num_candidates)
            rows += [(p, c) for c in sorted(rng.sample(range(num_candidates), keep))]
        return rows
    ref = torch.softmax(task["ref_logps"], -1)
    generator = torch.Generator().manual_seed(seed + 1)
    draws = torch.multinomial(
        ref.float(), BINARY_DRAWS.get(kind, num_candidates), replacement=True, generator=generator
    )
    return [(p, int(c)) for p in range(num_prompts) for c in draws[p]]


def rows_for(method: str, task: dict, rows: list[tuple[int, int]]) -> dict[str, list]:
    """The training columns each trainer expects, built from the same rows."""
    candidates, rewards = task["candidates"], task["rewards"]
    prompts = [candidates.prompts[p] for p, _ in rows]
    completions = [candidates.completions[p][c] for p, c in rows]
    row_rewards = [float(rewards[p, c]) for p, c in rows]
    if method == "kto":
        mean = statistics.fmean(row_rewards)
        return {"prompt": prompts, "completion": completions, "label": [r > mean for r in row_rewards]}
    if method == "sft_best":
        best = {}
        for (p, c), r in zip(rows, row_rewards, strict=True):
            if p not in best or r > best[p][1]:
                best[p] = (c, r)
        ordered = sorted(best)
        return {
            "prompt": [candidates.prompts[p] for p in ordered],
            "completion": [candidates.completions[p][best[p][0]] for p in ordered],
        }
    return {"prompt": prompts, "completion": completions, "reward": row_rewards}


# ---------------------------------------------------------------------------------------------- measuring
def distances(policy_logps: torch.Tensor, task: dict, tau: float) -> dict[str, float]:
    """Mean over prompts of TV(π, π*), KL(π‖π*), E_π[r] and KL(π‖π_ref), π renormalised over the candidates;
    and the probability mass Σ_y π(y|x) the policy itself puts on the candidates (1 for π*)."""
    log_pi = torch.log_softmax(policy_logps, -1)
    log_ref = torch.log_softmax(task["ref_logps"], -1)
    log_star = torch.log_softmax(task["ref_logps"] + task["rewards"] / tau, -1)
    pi = log_pi.exp()
    return {
        "tv_to_optimum": 0.5 * (pi - log_star.exp()).abs().sum(-1).mean().item(),
        "kl_to_optimum": (pi * (log_pi - log_star)).sum(-1).mean().item(),
        "expected_reward": (pi * task["rewards"]).sum(-1).mean().item(),
        "kl_to_ref": (pi * (log_pi - log_ref)).sum(-1).mean().item(),
        "candidate_mass": policy_logps.exp().sum(-1).mean().item(),  # what the renormalisation above hides
    }


class Probe(TrainerCallback):
    """Measures the policy against π* before training and every `every` optimizer steps."""

    def __init__(self, task: dict, tau: float, every: int):
        self.task, self.tau, self.every, self.curve = task, tau, every, []

    def _measure(self, step: int, model) -> None:
        self.curve.append({"step": step, **distances(self.task["candidates"].logps(model), self.task, self.tau)})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._measure(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._measure(state.global_step, model)


# --------------------------------------------------------------------------------------------- the methods
def trainer_for(method: str, model_dir: str, data: dict, tau: float, args, out_dir: str, seed: int):
    from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    from trl_rpo import DROConfig, DROTrainer, RPOConfig, RPOTrainer

    common = {
        "output_dir": out_dir,
        "per_device_train_batch_size": args.batch,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": args.scheduler,
        "warmup_steps": args.warmup_steps,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": False,
        "bf16": False,
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": seed,
    }
    dataset = Dataset.from_dict(data)
    if method == "kto":
        config, trainer_class = KTOConfig(beta=tau, **common), KTOTrainer
    elif method == "sft_best":
        config, trainer_class = SFTConfig(**common), SFTTrainer
    elif method == "dro":
        config = DROConfig(beta=tau, logps_aggregation="sum", reward_normalization="none", **common)
        trainer_class = DROTrainer
    else:
        options = RPO_VARIANTS[method]
        config = RPOConfig(beta=tau, reward_normalization="none", min_completions_per_prompt=2, **common, **options)
        trainer_class = RPOTrainer
    return trainer_class(model_dir, args=config, train_dataset=dataset)


def run_one(method: str, kind: str, task: dict, seed: int, tau: float, args, work_dir: str) -> dict:
    from transformers.trainer_callback import PrinterCallback

    if method in ITERATIVE:
        return run_iterative(ITERATIVE[method], task, seed, tau, args, work_dir)
    task = task_for(task, kind)
    rows = draw_rows(task, kind, seed)
    probe = Probe(task, tau, args.eval_every)
    data = rows_for(method, task, rows)
    trainer = trainer_for(method, task["model_dir"], data, tau, args, os.path.join(work_dir, "out"), seed)
    trainer.remove_callback(PrinterCallback)  # `disable_tqdm` makes Trainer print every log line
    trainer.add_callback(probe)
    start = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # DRO's loss is in reward units, τ² times RPO's (log-ratio units): compare variances in log-ratio units.
    scale = tau**2 if method == "dro" else 1.0
    tail = [loss / scale for loss in losses[-max(2, len(losses) // 5) :]]
    final = probe.curve[-1]
    star = optimum(task["ref_logps"], task["rewards"], tau)
    star_kl = (star * (star.log() - torch.log_softmax(task["ref_logps"], -1))).sum(-1).mean().item()
    final = final | {"reward_at_half_optimum_kl": reward_at_kl(probe.curve, star_kl / 2)}
    return {
        "method": method,
        "task": kind,
        "seed": seed,
        "tau": tau,
        "rows": len(rows),
        "optimum_kl_to_ref": star_kl,
        "seconds": time.perf_counter() - start,
        "curve": probe.curve,
        "loss": losses,
        "final": final,
        "optimal_expected_reward": (optimum(task["ref_logps"], task["rewards"], tau) * task["rewards"])
        .sum(-1)
        .mean()
        .item(),
        "loss_variance_last_20pct": statistics.pvariance(tail) if all(map(math.isfinite, tail)) else math.nan,
        "non_finite_losses": sum(not math.isfinite(x) for x in losses),
        "diverged": not math.isfinite(final["tv_to_optimum"])
        or final["tv_to_optimum"] > probe.curve[0]["tv_to_optimum"],
    }


def reward_at_kl(curve: list[dict], kl: float) -> float:
    """E_π[r] when training first reached KL(π‖π_ref) = `kl` (interpolated between probes; NaN if it never did):
    how much reward a method buys along its path for a given distance from the reference."""
    for before, after in itertools.pairwise(curve):
        if before["kl_to_ref"] <= kl <= after["kl_to_ref"]:
            span = after["kl_to_ref"] - before["kl_to_ref"]
            share = (kl - before["kl_to_ref"]) / span if span else 0.0
            return before["expected_reward"] + share * (after["expected_reward"] - before["expected_reward"])
    return math.nan


class _OffsetProbe(Probe):
    """A `Probe` whose steps continue those of the previous rounds."""

    def __init__(self, task: dict, tau: float, every: int, offset: int, curve: list):
        super().__init__(task, tau, every)
        self.offset, self.curve = offset, curve

    def _measure(self, step: int, model) -> None:
        if step or not self.curve:
            super()._measure(self.offset + step, model)


def run_iterative(rounds: int, task: dict, seed: int, tau: float, args, work_dir: str) -> dict:
    """Iterative RPO (see `ITERATIVE`): each round's reference is the policy that sampled its data."""
    from transformers.trainer_callback import PrinterCallback

    from trl_rpo import RPOConfig, RPOTrainer

    start, curve, losses, rows_seen = time.perf_counter(), [], [], 0
    policy_dir, policy_logps = task["model_dir"], task["ref_logps"]
    steps = args.steps // rounds
    for k in range(rounds):
        generator = torch.Generator().manual_seed(1000 * seed + k)
        probs = torch.softmax(policy_logps, -1).float()
        draws = torch.multinomial(probs, args.iter_budget // rounds, replacement=True, generator=generator)
        rows = [(p, int(c)) for p in range(draws.shape[0]) for c in draws[p]]
        rows_seen += len(rows)
        config = RPOConfig(
            output_dir=os.path.join(work_dir, f"round-{k}"), beta=tau * rounds, partition_estimator="monte_carlo",
            logps_aggregation="sum", reward_normalization="none", per_device_train_batch_size=args.batch,
            max_steps=steps, learning_rate=args.lr, lr_scheduler_type=args.scheduler,
            warmup_steps=min(args.warmup_steps, steps // 4), weight_decay=0.0, max_grad_norm=1.0,
            gradient_checkpointing=False, bf16=False, use_cpu=True, logging_steps=1, save_strategy="no",
            report_to="none", disable_tqdm=True, seed=seed + k, cache_ref_log_probs=False,
        )  # fmt: skip
        trainer = RPOTrainer(policy_dir, args=config, train_dataset=Dataset.from_dict(rows_for("rpo", task, rows)))
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_OffsetProbe(task, tau, args.eval_every, k * steps, curve))
        trainer.train()
        losses += [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        policy_dir = os.path.join(work_dir, f"policy-{k}")
        trainer.save_model(policy_dir)
        policy_logps = task["candidates"].logps(trainer.model)
    final = curve[-1]
    return {
        "method": f"rpo_iter_k{rounds}", "task": "sampled", "seed": seed, "tau": tau, "rows": rows_seen,
        "seconds": time.perf_counter() - start, "curve": curve, "loss": losses, "final": final,
        "optimal_expected_reward": (optimum(task["ref_logps"], task["rewards"], tau) * task["rewards"])
        .sum(-1).mean().item(),
        "loss_variance_last_20pct": math.nan, "non_finite_losses": sum(not math.isfinite(x) for x in losses),
        "diverged": not math.isfinite(final["tv_to_optimum"]) or final["tv_to_optimum"] > curve[0]["tv_to_optimum"],
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- reporting
def summarise(runs: list[dict], key: str) -> dict:
    """Mean and (population) std over seeds of the final value of `key` for each (task, method, tau)."""
    grouped = {}
    for run in runs:
        grouped.setdefault((run["task"], run["method"], run["tau"]), []).append(run["final"][key])
    return {k: _mean_std([x for x in v if math.isfinite(x)]) for k, v in grouped.items()}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std of the finite values (a run that never reached a KL has NaN there)."""
    return (statistics.fmean(values), statistics.pstdev(values)) if values else (math.nan, math.nan)


def study_table(runs: list[dict], tasks: list[str], methods: list[str]) -> str:
    tv, kl = summarise(runs, "tv_to_optimum"), summarise(runs, "kl_to_optimum")
    reward, kl_ref = summarise(runs, "expected_reward"), summarise(runs, "kl_to_ref")
    mass = summarise(runs, "candidate_mass")
    binary = all(r["task"] in BINARY_TASKS for r in runs)
    at_half = summarise(runs, "reward_at_half_optimum_kl") if binary else {}
    start = {(r["task"], r["seed"]): r["curve"][0] for r in runs}
    lines = []
    for task in tasks:
        initial = [v for (t, _), v in start.items() if t == task]
        tau = runs[0]["tau"]
        initial_tv = statistics.fmean(c["tv_to_optimum"] for c in initial)
        initial_reward = statistics.fmean(c["expected_reward"] for c in initial)
        best_reward = statistics.fmean(r["optimal_expected_reward"] for r in runs if r["task"] == task)
        star_kl = statistics.fmean(
            r["optimum_kl_to_ref"] for r in runs if r["task"] == task and "optimum_kl_to_ref" in r
        )
        extra = f", KL(π*‖π_ref) {star_kl:.3f}" if binary else ""
        lines += [
            f"\n**{task}** (π_ref: TV {initial_tv:.3f}, E[r] {initial_reward:+.3f}; π*: E[r] {best_reward:+.3f}"
            + f"{extra})\n",
            "| method | TV(π, π*) | KL(π‖π*) | E_π[r] | KL(π‖π_ref) | mass on candidates |"
            + (" E_π[r] on the way, at ½ KL(π*‖π_ref) |" if binary else ""),
            "|---|---|---|---|---|---|" + ("---|" if binary else ""),
        ]
        for method in methods:
            k = (task, method, tau)
            if k in tv:
                half = f" {at_half[k][0]:+.3f} ± {at_half[k][1]:.3f} |" if binary else ""
                lines.append(
                    f"| {method} | {tv[k][0]:.3f} ± {tv[k][1]:.3f} | {kl[k][0]:.3f} ± {kl[k][1]:.3f} | "
                    f"{reward[k][0]:+.3f} ± {reward[k][1]:.3f} | {kl_ref[k][0]:.3f} ± {kl_ref[k][1]:.3f} | "
                    f"{mass[k][0]:.3f} ± {mass[k][1]:.3f} |{half}"
                )
    return "\n".join(lines)


def sweep_table(runs: list[dict], methods: list[str]) -> str:
    lines = [
        "| method | τ | TV(π, π*_τ) | loss variance, last 20% of steps (log-ratio²) | non-finite losses | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        for tau in sorted({r["tau"] for r in runs}):
            group = [r for r in runs if r["method"] == method and r["tau"] == tau]
            if not group:
                continue
            tvs = [r["final"]["tv_to_optimum"] for r in group]
            variances = [r["loss_variance_last_20pct"] for r in group]
            lines.append(
                f"| {method} | {tau:g} | {statistics.fmean(tvs):.3f} ± {statistics.pstdev(tvs):.3f} | "
                f"{statistics.fmean(variances):.2e} | {sum(r['non_finite_losses'] for r in group)} | "
                f"{sum(r['diverged'] for r in group)}/{len(group)} |"
            )
    return "\n".join(lines)


def plot(runs: list[dict], tasks: list[str], methods: list[str], path_prefix: str) -> list[str]:
    """One PNG per task: TV to π*, expected reward, KL to π_ref (mean over seeds, min-max band), loss, and the
    expected reward against KL to π_ref along training (the path's reward–KL frontier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    panels = [("tv_to_optimum", "TV(π, π*)"), ("expected_reward", "E_π[r]"), ("kl_to_ref", "KL(π ‖ π_ref)")]
    for task in tasks:
        fig, axes = plt.subplots(1, 5, figsize=(25, 4.2))
        for method in methods:
            group = [r for r in runs if r["task"] == task and r["method"] == method]
            if not group:
                continue
            steps = [point["step"] for point in group[0]["curve"]]
            for ax, (key, title) in zip(axes, panels, strict=False):
                values = torch.tensor([[point[key] for point in r["curve"]] for r in group])
                (line,) = ax.plot(steps, values.mean(0), label=method)
                ax.fill_between(steps, values.min(0).values, values.max(0).values, alpha=0.15, color=line.get_color())
                ax.set_title(title)
            losses = torch.tensor([r["loss"] for r in group]).mean(0)
            axes[3].plot(range(1, len(losses) + 1), losses, label=method)
            kls = torch.tensor([[point["kl_to_ref"] for point in r["curve"]] for r in group]).mean(0)
            rewards = torch.tensor([[point["expected_reward"] for point in r["curve"]] for r in group]).mean(0)
            axes[4].plot(kls, rewards, label=method)
        optimum_reward = statistics.fmean(r["optimal_expected_reward"] for r in runs if r["task"] == task)
        axes[1].axhline(optimum_reward, color="black", linestyle="--", linewidth=1, label="π*")
        axes[3].set_yscale("symlog", linthresh=1e-3)
        axes[3].set_title("training loss (each method's own)")
        for ax in axes[:4]:
            ax.set_xlabel("optimizer step")
        axes[4].set(title="E_π[r] against KL(π ‖ π_ref) along training", xlabel="KL(π ‖ π_ref)")
        axes[4].axhline(optimum_reward, color="black", linestyle="--", linewidth=1)
        handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
        fig.suptitle(
            f"Known-optimum task `{task}` (τ = {runs[0]['tau']:g}, mean over {len({r['seed'] for r in runs})} seeds)"
        )
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        path = f"{path_prefix}_{task}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _rounded(value, digits: int = 5):
    """Floats to `digits` significant digits, so that the JSON of 100 runs' curves stays small."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        settings = saved["settings"]
        for figure in plot(saved["runs"], settings["tasks"], settings["methods"], os.path.splitext(args.replot)[0]):
            print(f"written: {figure}")
        return
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = "optimum_tau_sweep" if args.tau_sweep else "optimum_iterative" if args.iterative else "optimum"
    name = "optimum_binary" if args.binary else name
    output = args.output or os.path.join(RESULTS_DIR, f"{name}_{device}.json")
    taus = SWEEP_TAUS if args.tau_sweep else (args.tau,)
    runs = []
    with tempfile.TemporaryDirectory() as work_dir:
        for seed in range(args.seeds):
            task = build_task(work_dir, args, seed)
            for kind in args.tasks:
                for method in args.methods:
                    for tau in taus:
                        run = run_one(method, kind, task, seed, tau, args, work_dir)
                        runs.append(run)
                        final = run["final"]
                        print(
                            f"seed {seed} {kind:>7} {method:>18} τ={tau:<4g} TV {final['tv_to_optimum']:.3f} "
                            f"E[r] {final['expected_reward']:+.3f} ({run['seconds']:.1f} s)",
                            flush=True,
                        )
    table = sweep_table(runs, args.methods) if args.tau_sweep else study_table(runs, args.tasks, args.methods)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figures = []
    if args.plots and not args.tau_sweep:
        figures = plot(runs, args.tasks, args.methods, os.path.splitext(output)[0])
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "plots")}
    result = {
        "date": date.today().isoformat(),
        "machine": {"device": device, "platform": platform.platform(), "torch": torch.__version__},
        "settings": settings,
        "table_markdown": table,
        "figures": [os.path.basename(f) for f in figures],
        "runs": runs,
    }
    with open(output, "w") as f:
        json.dump(_rounded(result), f, indent=1)
    print(f"\nwritten: {output}" + "".join(f"\nwritten: {f}" for f in figures))


if __name__ == "__main__":
    main()
