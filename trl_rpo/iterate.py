"""Iterative RPO: each round samples completions from the current policy, scores them, and trains RPO on them with
that policy as the reference and the Monte-Carlo partition, which is consistent because the samples are the
reference's own. K rounds at τ aim at the one-shot optimum at τ/K (docs/iterative.md)."""

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate.logging import get_logger
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from .generation import generate_completions
from .rpo_config import RPOConfig
from .rpo_trainer import RPOTrainer
from .scoring import score_completions


logger = get_logger(__name__)

ROUNDS_FILE = "rounds.json"


@dataclass
class RoundResult:
    """One row of the per-round table. Round 0 is the initial policy (evaluated, not trained)."""

    round: int
    model: str  # the policy after this round: a full model folder (a LoRA adapter is merged into its base)
    train_rows: int  # scored samples of the policy that started the round (0 for round 0)
    train_reward: float  # their mean reward: the reward of the round's starting policy, on the training prompts
    eval_reward: float  # mean reward of samples of `model` on the held-out prompts (NaN without them)


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
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    done = _completed_rounds(output)
    for result in done[1:]:
        logger.info(f"Round {result.round}: finished in {output / ROUNDS_FILE}, skipped.")
    scoring = {"reward_funcs": reward_funcs, "reward_model": reward_model, "reward_weights": reward_weights}
    sampling = dict(generation_kwargs or {})
    if not done:
        initial_eval = _eval_reward(model, eval_prompts, eval_num_generations, output / "round-0", scoring, sampling)
        done = [RoundResult(0, model, 0, math.nan, initial_eval)]
        _write_rounds(output, done)
    reference = _load_model(model) if anchor_to_initial_reference else None
    for k in range(len(done), rounds + 1):
        policy, round_dir = done[-1].model, output / f"round-{k}"
        samples = generate_completions(
            prompts, model=policy, output_dir=round_dir / "samples", num_generations=num_generations, **sampling
        )
        scored = score_completions(samples, **scoring)
        scored.to_json(round_dir / "scored.jsonl", lines=True, force_ascii=False)
        round_args = copy.copy(args)
        round_args.output_dir = str(round_dir / "train")
        round_args.partition_estimator = "empirical" if anchor_to_initial_reference else "monte_carlo"
        trainer = RPOTrainer(
            policy, ref_model=reference, args=round_args, train_dataset=scored, peft_config=peft_config
        )
        trainer.train()
        model_dir = _save_policy(trainer, round_dir / "model")
        eval_reward = _eval_reward(model_dir, eval_prompts, eval_num_generations, round_dir, scoring, sampling)
        train_reward = sum(scored["reward"]) / len(scored)
        done.append(RoundResult(k, model_dir, len(scored), train_reward, eval_reward))
        _write_rounds(output, done)
        logger.info(f"Round {k}/{rounds}: train reward {train_reward:.4f}, held-out reward {eval_reward:.4f}.")
    return done


def rounds_table(results: list[RoundResult]) -> str:
    """The per-round table, in Markdown."""
    lines = ["| round | samples | mean reward of the samples | held-out reward | policy |", "|---|---|---|---|---|"]
    for r in results:
        train = "—" if r.round == 0 else f"{r.train_reward:.4f}"
        lines.append(f"| {r.round} | {r.train_rows} | {train} | {r.eval_reward:.4f} | `{r.model}` |")
    return "\n".join(lines)


def _eval_reward(model: str, prompts, num_generations: int, round_dir: Path, scoring: dict, sampling: dict) -> float:
    if prompts is None:
        return math.nan
    samples = generate_completions(
        prompts, model=model, output_dir=round_dir / "eval", num_generations=num_generations, **sampling
    )
    scored = score_completions(samples, **scoring)
    return sum(scored["reward"]) / max(len(scored), 1)


def _save_policy(trainer: RPOTrainer, model_dir: Path) -> str:
    """The trained policy as a full model folder (a PEFT adapter merged into its base), with the tokenizer."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(model_dir)
    trainer.processing_class.save_pretrained(model_dir)
    return str(model_dir)


def _load_model(path: str):
    encoder_decoder = getattr(AutoConfig.from_pretrained(path), "is_encoder_decoder", False)
    return (AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM).from_pretrained(path)


def _completed_rounds(output: Path) -> list[RoundResult]:
    path = output / ROUNDS_FILE
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        results = [RoundResult(**{k: math.nan if v is None else v for k, v in row.items()}) for row in rows]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError) as error:
        raise ValueError(
            f"The record of finished rounds {path} is damaged ({type(error).__name__}: {error}), so which rounds are "
            f"done is unknown. Restore it, or delete it to train every round again in {output}."
        ) from error
    return [r for r in results if r.round == 0 or Path(r.model).is_dir()]


def _write_rounds(output: Path, results: list[RoundResult]) -> None:
    tmp = output / (ROUNDS_FILE + ".tmp")
    rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()} for r in results]
    tmp.write_text(json.dumps(rows, indent=2) + "\n")  # NaN (no value) as null: strict JSON
    tmp.replace(output / ROUNDS_FILE)
