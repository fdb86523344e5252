"""The options every trainer of rewarded completions shares (RPO, DRO): data, log-prob aggregation, the target pass.

[`RPOConfig`] and [`DROConfig`] are siblings built on [`RewardedCompletionsConfig`]: each declares and validates only
its own options, so neither carries a field that means nothing for it.
"""

import math
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import KTOConfig

from .data.formats import REWARD_TRANSFORMS
from .losses import LogpsAggregation, RewardNormalization


SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length", "group_by_prompt")
# KTO options with no meaning for a trainer that regresses onto stored rewards, and the defaults they must keep.
_KTO_ONLY = {
    "desirable_weight": 1.0,
    "undesirable_weight": 1.0,
    "sync_ref_model": False,
    "ref_model_mixup_alpha": 0.6,
    "ref_model_sync_steps": 512,
}


@dataclass
class RewardedCompletionsConfig(KTOConfig):
    r"""
    Options shared by [`RPOConfig`] and [`DROConfig`] (documented there). Not meant to be used on its own.

    It subclasses [`~trl.KTOConfig`], so every KTO option that makes sense keeps its name, meaning and command-line
    flag; KTO options with no meaning here are rejected. On a machine without a bf16-capable accelerator, `bf16`
    defaults to `False` instead of raising; under DeepSpeed without an accelerator, `ddp_backend` defaults to `"gloo"`.
    """

    logps_aggregation: LogpsAggregation = field(
        default="mean",
        metadata={
            "help": "Aggregation of token log-probs into log π(y|x), used for the policy, the reference and the "
            "partition: 'mean' (the authors' code) or 'sum' (sequence log-prob, the paper's derivation).",
        },
    )
    reward_normalization: RewardNormalization = field(
        default="global",
        metadata={
            "help": "'global': z-score with the train split's mean and population std (the authors'); 'none'; "
            "'per_prompt': z-score inside each prompt (a different method).",
        },
    )
    reward_columns: list[str] | None = field(
        default=None,
        metadata={
            "help": "Build the reward from these columns (e.g. HelpSteer2's attributes) instead of `reward` / "
            "`rewards`: r = Σ weight·transform(column), then `reward_normalization`. With grouped rows "
            "(`completions`), each column holds one list per prompt."
        },
    )
    reward_column_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each of `reward_columns` (default: 1 each)."}
    )
    reward_column_transforms: list[str] | None = field(
        default=None,
        metadata={
            "help": "Transform of each of `reward_columns` before weighting: 'identity' (default) or 'log1p' "
            "(sign(x)·log(1+|x|), for counts such as votes). One value applies to every column."
        },
    )
    cache_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Cache each split's reference log-probs on disk, keyed by a digest of the reference weights, "
            "config, dtype, autocast, attention implementation, token ids and `max_length`."
        },
    )
    keep_ref_model: bool = field(
        default=False,
        metadata={
            "help": "Keep an explicit `ref_model` after the target pass (needed to `evaluate()` new datasets later); "
            "by default it is moved off the accelerator and released."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Always True: reference log-probs (and RPO's targets) are computed once per split before training."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Lay the rows of each micro-batch end to end in one sequence, with per-row position ids and no "
            "pad token, in training and in the target pass (causal models; attention 'sdpa', 'eager', "
            "'flex_attention' or flash-attention). Per-row results equal the padded path's.",
        },
    )
    train_sampling_strategy: str = field(
        default="random",
        metadata={
            "help": "Sampler for the training set. Targets are stored per row, so batches may mix prompts; "
            "'group_by_prompt' keeps each prompt's rows together (shuffled prompts, then rows), so that a batch size "
            "that is a multiple of the completions per prompt holds whole prompts.",
            "choices": list(SAMPLING_STRATEGIES),
        },
    )

    def __post_init__(self):
        self._check_shared_options()
        self._check_options()
        if self.bf16 is None and not self.fp16:
            # TRL defaults bf16 to True and then fails on CPU; fall back to fp32 where bf16 is not available.
            self.bf16 = self.use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()
        if self.use_cpu and _deepspeed(self):
            # transformers then builds the model inside DeepSpeed's `zero.Init` while accelerate, told to use the
            # CPU, never prepares DeepSpeed: the first forward met an empty weight ("'weight' must be 2-D").
            raise ValueError(
                "`use_cpu=True` cannot run under DeepSpeed (an accelerate DeepSpeed config or `deepspeed`): set "
                "`use_cpu` to false; on a machine without an accelerator, DeepSpeed runs on the CPU with "
                "DS_ACCELERATOR=cpu."
            )
        if self.ddp_backend is None and _deepspeed_without_accelerator(self):
            # accelerate leaves the backend unset on a CPU-only machine, so it counts one process while DeepSpeed
            # counts all of them and rejects the batch size; gloo is the CPU backend both agree on.
            self.ddp_backend = "gloo"
        super().__post_init__()

    def _check_options(self) -> None:
        """Validate the options the subclass declares (called once, after the shared ones)."""

    def _check_shared_options(self) -> None:
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"`beta` (the temperature τ) must be a finite number > 0, got {self.beta!r}.")
        for name, allowed in self.literal_choices().items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        self._check_reward_columns()
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(
                f"`train_sampling_strategy` must be one of {list(SAMPLING_STRATEGIES)}, got "
                f"{self.train_sampling_strategy!r}."
            )
        if not self.precompute_ref_log_probs:
            raise ValueError(
                "`precompute_ref_log_probs=False` is not supported: reference log-probs (and RPO's V̂(x), which needs "
                "every completion of a prompt) are always computed before training. Remove the option."
            )
        for name, default in _KTO_ONLY.items():
            if getattr(self, name) != default:
                why = (
                    "The reference is read once, before training, so it cannot be synchronised with the policy."
                    if "sync" in name or "mixup" in name
                    else "Rows are weighted by their reward, not by a desirable/undesirable label."
                )
                raise ValueError(
                    f"`{name}` is a KTO option with no meaning for {type(self).__name__}, got "
                    f"{getattr(self, name)!r}. {why} Remove `{name}` from your configuration."
                )

    def _check_reward_columns(self) -> None:
        columns, weights, transforms = self.reward_columns, self.reward_column_weights, self.reward_column_transforms
        if columns is None:
            if weights is not None or transforms is not None:
                raise ValueError(
                    "`reward_column_weights` / `reward_column_transforms` apply to `reward_columns`, which is not "
                    "set. Set `reward_columns` to the columns to combine, or remove them."
                )
            return
        if not columns or len(set(columns)) != len(columns):
            raise ValueError(f"`reward_columns` must name one or more distinct columns, got {columns!r}.")
        if weights is not None and (
            len(weights) != len(columns) or not all(isinstance(w, int | float) and math.isfinite(w) for w in weights)
        ):
            raise ValueError(
                "`reward_column_weights` must give one finite number per column of `reward_columns` "
                f"({len(columns)}), got {weights!r}."
            )
        if transforms is not None and (
            len(transforms) not in (1, len(columns)) or any(t not in REWARD_TRANSFORMS for t in transforms)
        ):
            raise ValueError(
                f"`reward_column_transforms` must give one of {list(REWARD_TRANSFORMS)} for every column of "
                f"`reward_columns` (or one for all), got {transforms!r}."
            )

    @classmethod
    def literal_choices(cls) -> dict[str, tuple]:
        """The allowed values of each option typed `Literal[...]` beyond KTOConfig's: one source for the check, the
        command line's `choices` and the docs."""
        hints = typing.get_type_hints(cls)
        inherited = {f.name for f in fields(KTOConfig)} - {"loss_type"}
        return {
            f.name: typing.get_args(hints[f.name])
            for f in fields(cls)
            if f.name not in inherited and typing.get_origin(hints[f.name]) is Literal
        }


def _deepspeed(args: KTOConfig) -> bool:
    return args.deepspeed is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _deepspeed_without_accelerator(args: KTOConfig) -> bool:
    return _deepspeed(args) and not torch.accelerator.is_available()
