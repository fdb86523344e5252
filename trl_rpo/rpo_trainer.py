import math
import textwrap

import numpy as np
import torch
from accelerate.logging import get_logger
from datasets import Dataset

from .data import column_numpy, describe_rows
from .losses import rpo_loss, rpo_targets, target_level_split
from .rewarded_trainer import RewardedCompletionsTrainer, RowMetrics
from .rpo_config import RPOConfig


logger = get_logger(__name__)

# Beyond this a target's square overflows float32 in the loss: training would produce inf.
_MAX_TARGET = 1e18
# Warn when the targets' per-prompt level (RMS) exceeds their within-prompt contrast by this factor.
_LEVEL_WARNING = 1.0
_MOVED_WARNING = 0.05  # log-ratio RMS below 5 % of the target RMS at the end of training: the policy did not move


class RPOTrainer(RewardedCompletionsTrainer):
    """
    Trainer for Reward Partitioning Optimization (RPO), from [Value-Free Policy Optimization via Reward
    Partitioning](https://huggingface.co/papers/2506.13702) (Faye, Azzag and Lebbah, 2025). Not TRL's former
    `rpo_alpha`, NVIDIA's Reward-aware PO or Relative PO.

    RPO learns from unpaired `(prompt, completion, reward)` rows. Before training, one no-grad pass of the frozen
    reference gives ℓ_ref = log π_ref(y|x) for every row; with the rewards r (normalised, see
    [`RPOConfig.reward_normalization`]) it gives, per prompt x, V̂(x) = τ·log Σ_j π_ref(y_j|x)·exp(r_j/τ) over all the
    prompt's rows, and a per-row target t = (r − V̂(x))/τ. Training then regresses the log-ratio onto it:
    loss = ½·mean((log π_θ(y|x) − ℓ_ref − t)²), one policy forward per row and no reference forward.

    A drop-in replacement for [`~trl.KTOTrainer`]: the same constructor, the same reference options (explicit
    `ref_model`; with PEFT and no `ref_model`, the base model with the adapter disabled; otherwise the initial
    policy, used for the target pass before any update so that no copy is kept), the same evaluation, logging and
    model-card behaviour.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from trl_rpo import RPOConfig, RPOTrainer

    >>> dataset = Dataset.from_dict({
    ...     "prompt": ["2 + 2 =", "2 + 2 =", "3 + 1 ="],
    ...     "completion": [" 4", " 5", " 4"],
    ...     "reward": [1.0, -1.0, 1.0],
    ... })
    >>> trainer = RPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=RPOConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    ```

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train: a model id or local path (loaded with `args.model_init_kwargs`), a model, or a PEFT
            model: a causal LM, an encoder-decoder (Flan-T5) or a vision-language model (LLaVA-style; the rows
            then carry `image`/`images`).
        ref_model ([`~transformers.PreTrainedModel`], *optional*):
            Frozen reference π_ref. If `None`: the base model with the adapter disabled under PEFT, else the initial
            policy (the targets are computed before the first update).
        args ([`RPOConfig`], *optional*):
            Configuration. Defaults to `RPOConfig("<model name>-RPO")`.
        data_collator (`DataCollator`, *optional*):
            Defaults to [`DataCollatorForRewardedCompletions`]. A custom collator must emit the same keys.
        train_dataset ([`~datasets.Dataset`]):
            Map-style dataset in one of the formats of `trl_rpo.data` (`reward`, KTO `label`, or paired
            `chosen`/`rejected`), standard or conversational. An [`~datasets.IterableDataset`] is refused: V̂(x) needs
            every completion of a prompt before training.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Evaluation split(s), same formats. Their targets use the training split's reward statistics.
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or [`~transformers.ProcessorMixin`], *optional*):
            Tokenizer, or the processor of a vision-language model. Loaded from the model's path if `None`; the EOS
            token pads when there is no pad token.
        compute_metrics (`Callable[[EvalPrediction], dict]`, *optional*):
            As in [`~trl.KTOTrainer`] (logits recomputed with an extra forward).
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Callbacks to add to the defaults.
        optimizers (`tuple`, *optional*, defaults to `(None, None)`):
            Optimizer and scheduler; AdamW with a linear schedule if not given.
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Quantisation for a model loaded from a string; combine with `peft_config` for QLoRA.
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration to wrap the model with.
    """

    _tag_names = ["trl", "rpo", "trl-rpo"]
    _name = "RPO"
    _config_class = RPOConfig  # the configuration class `args` must be (and the default's)
    _loss_columns = ("ref_logps", "target", "value")
    _global_value = None  # V̂_g of the training split, set by its target pass and reused by evaluation splits
    _credibility_k = None  # k of the shrinkage weights n/(n + k), likewise
    _paper = {
        "title": "Value-Free Policy Optimization via Reward Partitioning",
        "id": "2506.13702",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{faye2025rpo,
                title        = {{Value-Free Policy Optimization via Reward Partitioning}},
                author       = {Bilal Faye and Hanane Azzag and Mustapha Lebbah},
                year         = 2025,
                eprint       = {arXiv:2506.13702},
            }"""),
    }

    def _row_columns(
        self,
        dataset: Dataset,
        name: str,
        ref_logps: torch.Tensor,
        rewards: torch.Tensor,
        group_ids: torch.Tensor,
        is_train: bool,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`ref_logps`, and the target t = (r − V̂(x))/τ and value V̂(x) of every row, from the prompt's completions;
        rows of sparse prompts are dropped if `sparse_prompt_strategy='drop'` asks."""
        targets = rpo_targets(
            ref_logps,
            rewards,
            group_ids,
            torch.from_numpy(column_numpy(dataset, "completion_key")),
            beta=self.args.beta,
            estimator=self.args.partition_estimator,
            min_completions_per_prompt=self.args.min_completions_per_prompt,
            sparse_prompt_strategy=self.args.sparse_prompt_strategy,
            global_value=None if is_train else self._global_value,
            partition_temperature=self.args.partition_temperature,
            value_shrinkage=self.args.value_shrinkage,
            credibility_k=None if is_train else self._credibility_k,
        )
        if is_train:
            self._global_value, self._credibility_k = targets.global_value, targets.credibility_k
        self._record_sparse_counts(name, group_ids, targets)
        if self.args.value_shrinkage != "none":
            self._record_credibility(name, group_ids, targets.credibility_k)
        if is_train:
            self._record_target_level(group_ids, targets.targets)
        self._refuse_extreme_targets(dataset, name, targets.targets, targets.keep)
        if not targets.keep.any():
            raise ValueError(
                f"No row of the {name} dataset is left to train on: `sparse_prompt_strategy='drop'` dropped every "
                f"prompt, each having fewer than {self.args.min_completions_per_prompt} distinct completions. Add "
                "completions per prompt, lower `min_completions_per_prompt`, or use "
                "`sparse_prompt_strategy='global_baseline'`."
            )
        return {"ref_logps": ref_logps, "target": targets.targets, "value": targets.values}, targets.keep

    def _refuse_extreme_targets(self, dataset: Dataset, name: str, targets: torch.Tensor, keep: torch.Tensor) -> None:
        bad = keep & ~(torch.isfinite(targets) & (targets.abs() <= _MAX_TARGET))
        if bad.any():
            rows = np.unique(column_numpy(dataset, "source_row")[bad.numpy()])
            largest = targets[keep].abs().max().item()
            raise ValueError(
                f"The RPO targets of {describe_rows(rows, len(rows))} of the {name} dataset are not finite or too "
                f"large for float32 training (largest |target| {largest:.3g}; targets are (r − V̂)/τ, in nats). "
                "Normalise the rewards (`reward_normalization='global'`), rescale the 'reward' column, or raise "
                "`beta`."
            )

    def _record_sparse_counts(self, name: str, group_ids: torch.Tensor, targets) -> None:
        sparse_rows = int(targets.sparse.sum())
        sparse_prompts = int(torch.unique(group_ids[targets.sparse]).numel())
        dropped = int((~targets.keep).sum())
        self._data_stats[f"data/{name}_sparse_prompts"] = float(sparse_prompts)
        self._data_stats[f"data/{name}_sparse_rows"] = float(sparse_rows)
        self._data_stats[f"data/{name}_rows_dropped_sparse"] = float(dropped)
        if sparse_rows:
            logger.warning(
                f"{sparse_prompts} prompt(s) ({sparse_rows} rows) of the {name} dataset have fewer than "
                f"{self.args.min_completions_per_prompt} completions; strategy '{self.args.sparse_prompt_strategy}'"
                + (f" dropped {dropped} rows." if dropped else " gives them the global baseline V̂_g.")
            )

    def _record_credibility(self, name: str, group_ids: torch.Tensor, k: float) -> None:
        """Log k and the mean credibility weight n_x/(n_x + k) over the split's prompts."""
        _, counts = torch.unique(group_ids, return_counts=True)
        weights = torch.ones(len(counts)) if k == 0 else counts / (counts + k)
        mean_weight = float("nan") if math.isnan(k) else weights.mean().item()
        self._data_stats[f"data/{name}_value_credibility"] = mean_weight
        self._data_stats[f"data/{name}_value_credibility_k"] = k
        logger.info(
            f"Empirical-Bayes shrinkage of V̂(x) on the {name} dataset: k = {k:.4g}, mean credibility weight "
            f"{mean_weight:.3f} (1: each prompt keeps its own V̂, 0: every prompt gets the pooled V̂_g)."
        )

    def _record_target_level(self, group_ids: torch.Tensor, targets: torch.Tensor) -> None:
        """Log how much of the training targets moves prompts' completions apart (contrast) or together (level), and
        warn when the level dominates: the model then spends its steps raising or lowering whole prompts."""
        contrast, level = target_level_split(targets, group_ids)
        self._data_stats["data/train_target_contrast"] = contrast
        self._data_stats["data/train_target_level"] = level
        if level > _LEVEL_WARNING * contrast:
            units = "nats per token" if self.args.logps_aggregation == "mean" else "nats"
            logger.warning(
                f"The RPO targets of the train dataset mostly move each prompt's completions together (RMS level "
                f"{level:.3g} against a contrast of {contrast:.3g} {units} between them): training would spend its "
                "steps raising or lowering whole prompts rather than favouring their better completions, and the "
                "reward may barely move. This comes from the partition estimate: the empirical one adds "
                "−log Σ π_ref(y|x) to every row of completions sampled from a model, the Monte-Carlo one with few "
                "samples per prompt and a small `beta` pushes every worse completion down by ≈ 1/beta. For "
                "completions sampled from the model, set `partition_estimator='monte_carlo'` with "
                "`partition_temperature=float('inf')` and `value_shrinkage='empirical_bayes'` (the contrast, and a "
                "level shrunk towards the pooled value), `logps_aggregation='sum'` and a small `beta` (0.05 moved "
                "the most on the frontier benchmark); see docs/loss.md, 'The level of the target'."
            )

    def train(self, *args, **kwargs):
        """[`~transformers.Trainer.train`], then a warning if the policy barely moved towards its targets."""
        output = super().train(*args, **kwargs)
        self._warn_if_barely_moved()
        return output

    def _warn_if_barely_moved(self) -> None:
        """A run that ends with log-ratios a few percent of its targets (in RMS, over the last steps) has not trained:
        typically a learning rate made for another setting (KTO's default 1e-6 on a LoRA adapter)."""
        if not self._recent_moves:
            return
        moved, asked = (sum(values) / len(values) for values in zip(*self._recent_moves, strict=True))
        moved, asked = moved**0.5, asked**0.5
        if asked > 0 and moved < _MOVED_WARNING * asked:
            logger.warning(
                f"Training barely moved the policy: over its last {len(self._recent_moves)} steps the log-ratios "
                f"log π_θ/π_ref have an RMS of {moved:.3g} against targets of {asked:.3g} (RMS), "
                f"{moved / asked:.1%} of the way. Raise `learning_rate` (LoRA adapters want ≈ 1e-4 to 1e-3; KTO's "
                "default 1e-6 is for full fine-tuning), train longer, or lower `beta` for larger targets; if the "
                "data's targets are mostly a level shared by each prompt's rows (see the warning at the start), "
                "change the partition estimate as it says."
            )

    def _loss_from_logps(self, batch, policy_logps: torch.Tensor, outputs) -> tuple[torch.Tensor, RowMetrics]:
        """½·mean((log π_θ − ℓ_ref − t)²), the prompt mean residual weighted by `level_weight` (or Huber's loss of the
        residual, `huber_delta`): no reference forward, the stored ℓ_ref and t are all RPO reads."""
        args = self.args
        out = rpo_loss(
            policy_logps, batch["ref_logps"], batch["target"], batch["group_key"],
            level_weight=args.level_weight, huber_delta=args.huber_delta,
        )  # fmt: skip
        return out.losses.mean(), RowMetrics(batch["target"], batch["value"], out.log_ratios, out.residuals)
