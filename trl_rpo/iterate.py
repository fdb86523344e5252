"""Iterative RPO: each round samples completions from the current policy, scores them, and trains RPO on them with
that policy as the reference and the Monte-Carlo partition, which is consistent because the samples are the
reference's own. K rounds at τ aim at the one-shot optimum at τ/K (docs/iterative.md)."""

import copy
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate.logging import get_logger
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.trainer_utils import get_last_checkpoint

from .data import prompt_rows, prompts_digest
from .files import write_json
from .generation import generate_completions
from .rpo_config import RPOConfig
from .rpo_trainer import RPOTrainer
from .scoring import score_completions


logger = get_logger(__name__)

ROUNDS_FILE = "rounds.json"
ROUNDS_PLOT = "rounds.png"
QUANTIZED_ROUNDS = (
    "Iterative RPO merges each round's adapter into the next round's policy, which a quantized base cannot take "
    "exactly: drop the quantization options (`--load_in_4bit`, `--load_in_8bit`) for `iterate`."
)


@dataclass
class RoundResult:
    """One row of the per-round table. Round 0 is the initial policy (evaluated, not trained)."""

    round: int
    model: str  # the policy after this round: a full model folder (a LoRA adapter is merged into its base)
    train_rows: int  # scored samples of the policy that started the round (0 for round 0)
    train_reward: float  # their mean reward: the reward of the round's starting policy, on the training prompts
    eval_reward: float  # mean reward of samples of `model` on the held-out prompts (NaN without them)
    train_cut: float = math.nan  # share of the round's samples that reached `max_new_tokens` before ending
    eval_cut: float = math.nan  # the same, held-out: a reward read from a cut answer is not the answer's


def iterate_rpo(
    model: str,
    prompts: Dataset,
    args: RPOConfig,
    *,
    rounds: int = 2,
    reward_funcs=None,
    reward_model: str | None = None,
    reward_weights: list[float] | None = None,
    num_generations: int = 4,
    eval_prompts: Dataset | None = None,
    eval_num_generations: int = 1,
    peft_config=None,
    anchor_to_initial_reference: bool = False,
    generation_kwargs: dict | None = None,
) -> list[RoundResult]:
    r"""
    Run `rounds` rounds of sample → score → train from `model` (a folder or Hub id), in `args.output_dir`:
    `round-<k>/samples/` (the samples, resumable, and their `generation_config.json`), `round-<k>/scored.jsonl`,
    `round-<k>/model/` (the trained policy; LoRA adapters merged into the base so that the next round samples from
    and is regularised towards the whole policy), `round-<k>/eval/` (held-out samples) and `rounds.json` (the
    table, rewritten after every round; a rerun skips the rounds it lists).

    Each round trains with `args` (`partition_estimator="monte_carlo"`, the reference being the round's starting
    policy). With `anchor_to_initial_reference=True` the reference stays the initial model and the estimator is
    `"empirical"` (the samples are then not the reference's). Rewards come from `reward_funcs` (GRPOTrainer's
    signature, `module:function` strings or callables) and/or `reward_model`, weighted by `reward_weights`, as in
    [`score_completions`]. `generation_kwargs` go to [`generate_completions`] (`max_new_tokens`, `batch_size`,
    `temperature`, …; keep temperature 1 and no top-p/top-k for the Monte-Carlo estimator). One process.
    """
    if rounds < 1:
        raise ValueError(f"`rounds` must be ≥ 1, got {rounds}.")
    if (args.model_init_kwargs or {}).get("quantization_config") is not None:
        raise ValueError(QUANTIZED_ROUNDS)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    scoring = {"reward_funcs": reward_funcs, "reward_model": reward_model, "reward_weights": reward_weights}
    sampling = dict(generation_kwargs or {})
    sampling.setdefault("dtype", _dtype_name((args.model_init_kwargs or {}).get("dtype", "auto")))
    settings = _settings(model, prompts, args, scoring, sampling, num_generations, eval_num_generations,
                         peft_config, anchor_to_initial_reference)  # fmt: skip
    done = _completed_rounds(output, settings)
    for result in done[1:]:
        logger.info(f"Round {result.round}: finished in {output / ROUNDS_FILE}, skipped.")
    base_seed = sampling.pop("seed", args.seed)
    revision = (args.model_init_kwargs or {}).get("revision")  # the initial model's; round models are local folders
    if not done:
        initial = sampling | {"seed": base_seed, "revision": revision}
        reward, cut = _eval_reward(model, eval_prompts, eval_num_generations, output / "round-0", scoring, initial)
        done = [RoundResult(0, model, 0, math.nan, reward, eval_cut=cut)]
        _write_rounds(output, done, settings)
    reference = _load_model(model, args) if anchor_to_initial_reference else None
    for k in range(len(done), rounds + 1):
        policy, round_dir = done[-1].model, output / f"round-{k}"
        round_sampling = sampling | {"seed": _round_seed(base_seed, k)}
        samples = generate_completions(
            prompts, model=policy, output_dir=round_dir / "samples", num_generations=num_generations,
            revision=revision if k == 1 else None, **round_sampling,
        )  # fmt: skip
        scored = score_completions(samples, **scoring)
        scored.to_json(round_dir / "scored.jsonl", lines=True, force_ascii=False)
        round_args = _round_args(args, round_dir, anchor_to_initial_reference, initial_policy=k == 1)
        trainer = RPOTrainer(policy, reference, round_args, train_dataset=scored, peft_config=peft_config)
        trainer.train(resume_from_checkpoint=_last_checkpoint(round_args.output_dir))  # a crashed round resumes
        model_dir = _save_policy(trainer, round_dir / "model", name=f"{output.name}-round-{k}")
        eval_reward, eval_cut = _eval_reward(model_dir, eval_prompts, eval_num_generations, round_dir, scoring,
                                             round_sampling)  # fmt: skip
        train_reward = sum(scored["reward"]) / len(scored)
        done.append(RoundResult(k, model_dir, len(scored), train_reward, eval_reward, _cut(samples), eval_cut))
        _write_rounds(output, done, settings)
        plot_rounds(done, output / ROUNDS_PLOT)
        logger.info(f"Round {k}/{rounds}: train reward {train_reward:.4f}, held-out reward {eval_reward:.4f}.")
    return done


def rounds_table(results: list[RoundResult]) -> str:
    """The per-round table, in Markdown."""
    lines = [
        "| round | samples | mean reward of the samples | cut | held-out reward | cut | policy |",
        "|---|---|---|---|---|---|---|",
    ]
    share = lambda value: "—" if math.isnan(value) else f"{value:.0%}"  # noqa: E731
    for r in results:
        train = "—" if r.round == 0 else f"{r.train_reward:.4f}"
        lines.append(f"| {r.round} | {r.train_rows} | {train} | {share(r.train_cut)} | {r.eval_reward:.4f} | "
                     f"{share(r.eval_cut)} | `{r.model}` |")  # fmt: skip
    return "\n".join(lines)


def _cut(samples: Dataset) -> float:
    """The share of samples that reached the token limit before their end (`finished` is False)."""
    return 1.0 - sum(samples["finished"]) / max(len(samples), 1)


def _eval_reward(model: str, prompts, num_generations: int, round_dir: Path, scoring: dict, sampling: dict):
    """The mean reward of the samples of `model` on the held-out prompts, and the share of them cut at the limit."""
    if prompts is None:
        return math.nan, math.nan
    samples = generate_completions(
        prompts, model=model, output_dir=round_dir / "eval", num_generations=num_generations, **sampling
    )
    scored = score_completions(samples, **scoring)
    return sum(scored["reward"]) / max(len(scored), 1), _cut(samples)


def plot_rounds(results: list[RoundResult], path: Path) -> None:
    """The held-out reward and the mean reward of each round's samples against the round, beside `rounds.json`
    (needs matplotlib: `pip install trl-rpo[plots]`; without it, a log line says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info(f"No plot of the rounds ({path.name}): it needs matplotlib (`pip install trl-rpo[plots]`).")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    rounds = [r.round for r in results]
    ax.plot(rounds, [r.eval_reward for r in results], "o-", label="held-out reward (the round's policy)")
    trained = [r for r in results if r.round > 0]
    ax.plot([r.round for r in trained], [r.train_reward for r in trained], "s--", label="the round's samples")
    ax.set(xlabel="round", ylabel="mean reward", xticks=rounds)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _round_seed(base: int, k: int) -> int:
    """Each round samples with its own seed (round 0's held-out samples with `base` itself)."""
    return base + 1_000 * k


def _round_args(args: RPOConfig, round_dir: Path, anchored: bool, initial_policy: bool) -> RPOConfig:
    round_args = copy.copy(args)
    round_args.output_dir = str(round_dir / "train")
    round_args.partition_estimator = "empirical" if anchored else "monte_carlo"
    if not initial_policy and round_args.model_init_kwargs:  # a round model is a local folder: no revision
        round_args.model_init_kwargs = {k: v for k, v in round_args.model_init_kwargs.items() if k != "revision"}
    return round_args


def _last_checkpoint(folder: str) -> str | None:
    return get_last_checkpoint(folder) if Path(folder).is_dir() else None


def _save_policy(trainer: RPOTrainer, model_dir: Path, name: str) -> str:
    """The trained policy as a full model folder (a PEFT adapter merged into its base) in the dtype it trained in,
    with the tokenizer and the model card a trained model gets."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(model_dir)
    trainer.processing_class.save_pretrained(model_dir)
    trainer.create_model_card(model_name=name)
    shutil.copyfile(Path(trainer.args.output_dir) / "README.md", model_dir / "README.md")
    return str(model_dir)


def _load_model(path: str, args: RPOConfig):
    kwargs = {k: v for k, v in (args.model_init_kwargs or {}).items() if v is not None and k != "trust_remote_code"}
    kwargs["trust_remote_code"] = args.trust_remote_code
    encoder_decoder = getattr(AutoConfig.from_pretrained(path), "is_encoder_decoder", False)
    return (AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM).from_pretrained(path, **kwargs)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


# Training options that change what a round produces: a rerun that differs in one of them is refused.
_RESULT_OPTIONS = (
    "beta", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "max_steps",
    "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "max_length",
    "logps_aggregation", "partition_temperature", "value_shrinkage", "level_weight", "huber_delta",
    "sparse_prompt_strategy", "reward_normalization", "bf16", "fp16", "model_init_kwargs",
)  # fmt: skip


def _settings(model, prompts, args, scoring, sampling, num_generations, eval_num_generations, peft_config,
              anchored) -> dict:  # fmt: skip
    """What determines the rounds' results, as JSON: the record keeps it, and a rerun must match it."""
    funcs = scoring["reward_funcs"] or []
    funcs = [f if isinstance(f, str) else f"{f.__module__}.{f.__qualname__}" for f in funcs]
    options = {name: getattr(args, name) for name in _RESULT_OPTIONS if hasattr(args, name)}
    values = {
        "model": model, "prompts_digest": prompts_digest(prompt_rows(prompts)), "reward_funcs": funcs,
        "reward_model": scoring["reward_model"], "reward_weights": scoring["reward_weights"],
        "num_generations": num_generations, "eval_num_generations": eval_num_generations, "sampling": sampling,
        "peft_config": peft_config.to_dict() if peft_config is not None else None,
        "anchor_to_initial_reference": anchored, "training": options,
    }  # fmt: skip
    return json.loads(json.dumps(values, default=str))  # the form it has once read back


def _completed_rounds(output: Path, settings: dict) -> list[RoundResult]:
    path = output / ROUNDS_FILE
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        rows = record["rounds"]
        results = [RoundResult(**{k: math.nan if v is None else v for k, v in row.items()}) for row in rows]
        recorded = record["settings"]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(
            f"The record of finished rounds {path} is damaged or from an older trl_rpo ({type(error).__name__}: "
            f"{error}), so which rounds are done, and how, is unknown. Restore it, or delete it to train every round "
            f"again in {output}."
        ) from error
    differing = _differences(recorded, settings)
    if differing:
        raise ValueError(
            f"{output} holds rounds made with other settings ({'; '.join(differing)}). Rerun with the same settings "
            "(more `rounds` may be added), or pass another `output_dir` to start again."
        )
    for result in results:  # round models are stored relative to the output folder: it may have moved
        if result.round > 0:
            result.model = str(output / result.model)
    return [r for r in results if r.round == 0 or Path(r.model).is_dir()]


def _differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    differing = []
    for key in sorted(set(recorded) | set(current)):
        there, now = recorded.get(key), current.get(key)
        if isinstance(there, dict) and isinstance(now, dict):
            differing += _differences(there, now, f"{prefix}{key}.")
        elif there != now:
            differing.append("different prompts" if key == "prompts_digest" else f"{prefix}{key}={there!r} there, "
                             f"{now!r} now")  # fmt: skip
    return differing


def _write_rounds(output: Path, results: list[RoundResult], settings: dict) -> None:
    rows = []
    for result in results:
        row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(result).items()}
        if result.round > 0:  # relative to the output folder, so a rerun from anywhere finds it
            row["model"] = str(Path(result.model).resolve().relative_to(output.resolve()))
        rows.append(row)
    write_json(output / ROUNDS_FILE, {"settings": settings, "rounds": rows})
