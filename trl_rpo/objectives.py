"""The objectives, as values: what each trainer stores per row before training, how it builds those columns from
the reference log-probs and the normalised rewards of a split, and its loss. The maths is `losses.py`'s; an
objective adds the checks and reports of its columns (counts written to the split's `stats`, warnings with the
fix). The target pass (`target_pass.py`) builds the columns; the trainers compute the loss with them.

- [`RPOObjective`]: ref log-probs, target t = (r − V̂(x))/τ and V̂(x); the regression of the log-ratio onto t.
- [`DROObjective`]: ref log-probs and the normalised reward; V_φ(x) comes from the trainer's value network.
"""

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from accelerate.logging import get_logger

from .data import describe_rows
from .losses import (
    Estimator,
    LogpsAggregation,
    SparsePromptStrategy,
    ValueShrinkage,
    dro_loss,
    rpo_loss,
    rpo_targets,
    target_level_split,
)


logger = get_logger(__name__)

# Beyond this a target's square overflows float32 in the loss: training would produce inf.
_MAX_TARGET = 1e18
# Warn when the targets' per-prompt level (RMS) exceeds their within-prompt contrast by this factor.
_LEVEL_WARNING = 1.0


class SplitRows(NamedTuple):
    """What the target pass knows of a split's rows (those that fit `max_length`), in row order."""

    name: str
    ref_logps: torch.Tensor  # aggregated reference log-probs
    rewards: torch.Tensor  # normalised rewards (float64)
    group_ids: torch.Tensor  # prompt keys
    completion_keys: torch.Tensor  # keys of (prompt, completion): duplicates share one
    source_rows: np.ndarray  # each row's index in the user's dataset, for errors
    stats: dict[str, float]  # counts the trainer logs once (`data/<split>_*`)


class RowValues(NamedTuple):
    """Per-row values of a batch that the trainer logs, in terms every objective has: the log-ratio that would zero
    the row's residual (`aim`: RPO's target t, DRO's (r − V_φ(x))/τ; logged as `target`), the prompt's value
    estimate (`baseline`: V̂(x) or V_φ(x); logged as `value`), the log-ratios and the residuals."""

    aim: torch.Tensor
    baseline: torch.Tensor
    log_ratios: torch.Tensor
    residuals: torch.Tensor


@dataclass
class RPOObjective:
    """RPO: per row, t = (r − V̂(x))/τ with V̂(x) estimated from the prompt's rows ([`~trl_rpo.losses.rpo_targets`]),
    and loss ½·mean((log π_θ − ℓ_ref − t)²) ([`~trl_rpo.losses.rpo_loss`]). The options are [`RPOConfig`]'s; the
    training split fixes the pooled V̂_g and the shrinkage constant k that evaluation splits reuse."""

    beta: float = 5.0
    partition_estimator: Estimator = "empirical"
    min_completions_per_prompt: int = 2
    sparse_prompt_strategy: SparsePromptStrategy = "global_baseline"
    partition_temperature: float | None = None
    value_shrinkage: ValueShrinkage = "none"
    level_weight: float = 1.0
    huber_delta: float | None = None
    logps_aggregation: LogpsAggregation = "mean"
    global_value: float | None = field(default=None, init=False)  # fitted on the training split
    credibility_k: float | None = field(default=None, init=False)

    name: ClassVar[str] = "RPO"
    columns: ClassVar[tuple[str, ...]] = ("ref_logps", "target", "value")

    @classmethod
    def from_config(cls, args: Any) -> "RPOObjective":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.init})

    def row_columns(self, rows: SplitRows, is_train: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`ref_logps`, the target and value of every row, and the rows to keep (`sparse_prompt_strategy='drop'`)."""
        targets = rpo_targets(
            rows.ref_logps,
            rows.rewards,
            rows.group_ids,
            rows.completion_keys,
            beta=self.beta,
            estimator=self.partition_estimator,
            min_completions_per_prompt=self.min_completions_per_prompt,
            sparse_prompt_strategy=self.sparse_prompt_strategy,
            global_value=None if is_train else self.global_value,
            partition_temperature=self.partition_temperature,
            value_shrinkage=self.value_shrinkage,
            credibility_k=None if is_train else self.credibility_k,
        )
        if is_train:
            self.global_value, self.credibility_k = targets.global_value, targets.credibility_k
        self._report_sparse(rows, targets)
        if self.value_shrinkage != "none":
            _report_credibility(rows, targets.credibility_k)
        if is_train:
            self._report_level(rows, targets.targets)
        _refuse_extreme_targets(rows, targets.targets, targets.keep)
        if not targets.keep.any():
            raise ValueError(
                f"No row of the {rows.name} dataset is left to train on: `sparse_prompt_strategy='drop'` dropped "
                f"every prompt, each having fewer than {self.min_completions_per_prompt} distinct completions. Add "
                "completions per prompt, lower `min_completions_per_prompt`, or use "
                "`sparse_prompt_strategy='global_baseline'`."
            )
        return {"ref_logps": rows.ref_logps, "target": targets.targets, "value": targets.values}, targets.keep

    def loss(self, batch: dict[str, torch.Tensor], policy_logps: torch.Tensor) -> tuple[torch.Tensor, RowValues]:
        """½·mean((log π_θ − ℓ_ref − t)²), the prompt mean residual weighted by `level_weight` (or Huber's loss of the
        residual, `huber_delta`): no reference forward, the stored ℓ_ref and t are all RPO reads."""
        out = rpo_loss(
            policy_logps, batch["ref_logps"], batch["target"], batch["group_key"],
            level_weight=self.level_weight, huber_delta=self.huber_delta,
        )  # fmt: skip
        return out.losses.mean(), RowValues(batch["target"], batch["value"], out.log_ratios, out.residuals)

    def _report_sparse(self, rows: SplitRows, targets) -> None:
        sparse_rows = int(targets.sparse.sum())
        sparse_prompts = int(torch.unique(rows.group_ids[targets.sparse]).numel())
        dropped = int((~targets.keep).sum())
        rows.stats[f"data/{rows.name}_sparse_prompts"] = float(sparse_prompts)
        rows.stats[f"data/{rows.name}_sparse_rows"] = float(sparse_rows)
        rows.stats[f"data/{rows.name}_rows_dropped_sparse"] = float(dropped)
        if sparse_rows:
            logger.warning(
                f"{sparse_prompts} prompt(s) ({sparse_rows} rows) of the {rows.name} dataset have fewer than "
                f"{self.min_completions_per_prompt} completions; strategy '{self.sparse_prompt_strategy}'"
                + (f" dropped {dropped} rows." if dropped else " gives them the global baseline V̂_g.")
            )

    def _report_level(self, rows: SplitRows, targets: torch.Tensor) -> None:
        """Log how much of the training targets moves prompts' completions apart (contrast) or together (level), and
        warn when the level dominates: the model then spends its steps raising or lowering whole prompts."""
        contrast, level = target_level_split(targets, rows.group_ids)
        rows.stats["data/train_target_contrast"] = contrast
        rows.stats["data/train_target_level"] = level
        if level > _LEVEL_WARNING * contrast:
            units = "nats per token" if self.logps_aggregation == "mean" else "nats"
            logger.warning(
                f"The RPO targets of the train dataset mostly move each prompt's completions together (RMS level "
                f"{level:.3g} against a contrast of {contrast:.3g} {units} between them): training would spend its "
                "steps raising or lowering whole prompts rather than favouring their better completions, and the "
                "reward may barely move. This comes from the partition estimate: the empirical one adds "
                "−log Σ π_ref(y|x) to every row of completions sampled from a model, the Monte-Carlo one with few "
                "samples per prompt and a small `beta` pushes every worse completion down by ≈ 1/beta. For "
                "completions sampled from the model, set `partition_estimator='monte_carlo'` with "
                "`partition_temperature=float('inf')` and `value_shrinkage='empirical_bayes'` (the contrast, and a "
                "level shrunk towards the pooled value), `logps_aggregation='sum'` and a small `beta` (what the "
                "frontier benchmark measured: docs/benchmarks.md, 'What to use'); see docs/loss.md, 'The level of the "
                "target'."
            )


@dataclass
class DROObjective:
    """DRO (Richemond et al., 2024): no per-prompt estimate is stored, only ℓ_ref and the normalised reward; the loss
    ½·mean((r − V_φ(x) − τ·(log π_θ − ℓ_ref))²) ([`~trl_rpo.losses.dro_loss`]) takes V_φ(x) from the trainer."""

    beta: float = 0.1

    name: ClassVar[str] = "DRO"
    columns: ClassVar[tuple[str, ...]] = ("ref_logps", "reward_z")

    @classmethod
    def from_config(cls, args: Any) -> "DROObjective":
        return cls(beta=args.beta)

    def row_columns(self, rows: SplitRows, is_train: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"ref_logps": rows.ref_logps, "reward_z": rows.rewards}, torch.ones_like(rows.rewards, dtype=torch.bool)

    def loss(self, batch, policy_logps: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, RowValues]:
        out = dro_loss(policy_logps, batch["ref_logps"], batch["reward_z"], values, beta=self.beta)
        values = values.detach()
        aims = (batch["reward_z"] - values) / self.beta  # the log-ratio that would zero the residual
        return out.losses.mean(), RowValues(aims, values, out.log_ratios, out.residuals)


def _report_credibility(rows: SplitRows, k: float) -> None:
    """Log k and the mean credibility weight n_x/(n_x + k) over the split's prompts."""
    _, counts = torch.unique(rows.group_ids, return_counts=True)
    weights = torch.ones(len(counts)) if k == 0 else counts / (counts + k)
    mean_weight = float("nan") if math.isnan(k) else weights.mean().item()
    rows.stats[f"data/{rows.name}_value_credibility"] = mean_weight
    rows.stats[f"data/{rows.name}_value_credibility_k"] = k
    logger.info(
        f"Empirical-Bayes shrinkage of V̂(x) on the {rows.name} dataset: k = {k:.4g}, mean credibility weight "
        f"{mean_weight:.3f} (1: each prompt keeps its own V̂, 0: every prompt gets the pooled V̂_g)."
    )


def _refuse_extreme_targets(rows: SplitRows, targets: torch.Tensor, keep: torch.Tensor) -> None:
    bad = keep & ~(torch.isfinite(targets) & (targets.abs() <= _MAX_TARGET))
    if bad.any():
        source = np.unique(rows.source_rows[bad.numpy()])
        largest = targets[keep].abs().max().item()
        raise ValueError(
            f"The RPO targets of {describe_rows(source, len(source))} of the {rows.name} dataset are not finite or "
            f"too large for float32 training (largest |target| {largest:.3g}; targets are (r − V̂)/τ, in nats). "
            "Normalise the rewards (`reward_normalization='global'`), rescale the 'reward' column, or raise `beta`."
        )
