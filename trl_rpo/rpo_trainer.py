import contextlib
import logging
import os
import textwrap
from collections.abc import Callable
from typing import Any, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model
from accelerate.utils.memory import clear_device_cache
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import (
    AutoConfig,
    AutoProcessor,
    BitsAndBytesConfig,
    DataCollator,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
)
from transformers.trainer_utils import EvalPrediction
from trl import KTOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import (
    get_config_model_id,
    global_then_local_main_first,
    selective_log_softmax_and_entropy,
    use_adapter,
)

from . import reference_cache
from .data import (
    ROW_TENSOR_COLUMNS,
    DataCollatorForRewardedCompletions,
    check_rows,
    column_numpy,
    describe_rows,
    list_lengths,
    prepare_rows_batch,
    token_ids_digest,
)
from .lm_head import completion_only_lm_head
from .losses import normalize_rewards, pairwise_ranking_counts, rpo_loss, rpo_targets
from .modeling import disable_dropout, trainable_bnb_layout
from .rpo_config import RPOConfig


logger = get_logger(__name__)

# Beyond this a target's square overflows float32 in the loss: training would produce inf.
_MAX_TARGET = 1e18


class RowMetrics(NamedTuple):
    """Per-row values of one batch that the trainer logs (`target`, `value`, `log_ratio`, `residual_rms`)."""

    targets: torch.Tensor
    values: torch.Tensor
    log_ratios: torch.Tensor
    residuals: torch.Tensor


class RPOTrainer(KTOTrainer):
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
            model. Causal language models.
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
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer. Loaded from the model's path if `None`; the EOS token pads when there is no pad token.
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

    def __init__(
        self,
        model: "str | PreTrainedModel | PeftModel",  # noqa: F821
        ref_model: PreTrainedModel | None = None,
        args: RPOConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset
        | IterableDataset
        | DatasetDict
        | IterableDatasetDict
        | dict[str, Dataset | IterableDataset]
        | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: "BitsAndBytesConfig | None" = None,
        peft_config: "PeftConfig | None" = None,  # noqa: F821
    ):
        config_class = self._config_class
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = config_class(f"{model_name.split('/')[-1]}-{self._name}")
        elif not isinstance(args, config_class) or args.loss_type not in config_class._loss_types:
            # A subclass of the config for another objective (DROConfig is an RPOConfig) would train the wrong loss.
            raise TypeError(
                f"`args` must be a `{config_class.__name__}`, got `{type(args).__name__}`: rename `KTOConfig(...)` "
                f"(or another trainer's config) to `{config_class.__name__}(...)` (same arguments; options without "
                "meaning here are reported)."
            )
        _refuse_iterable(train_dataset, "train")
        for name, split in eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]:
            _refuse_iterable(split, name)
        if processing_class is None:
            processing_class = _load_processing_class(model, args)
        self.is_encoder_decoder = _is_encoder_decoder(model, args)
        if data_collator is None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            data_collator = DataCollatorForRewardedCompletions(
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token is not None else tokenizer.eos_token_id,
                max_length=args.max_length,
                pad_to_multiple_of=None if args.pad_to_multiple_of == "auto" else args.pad_to_multiple_of,
                is_encoder_decoder=self.is_encoder_decoder,
            )
        self._reward_stats = None  # set by the training split's target pass, reused by evaluation splits
        self._global_value = None
        self._data_stats: dict[str, float] = {}
        self._data_stats_logged = False
        self._eval_prefix = "eval"
        self._pair_counts = {"train": [0.0, 0.0], "eval": [0.0, 0.0]}
        self._eval_rows: list[torch.Tensor] = []  # (log-ratio, reward, group) of rows evaluated since the last log
        self._ref_weights_digest: str | None = None
        self._ref_model_released = False
        # What each split's target pass did on this rank: cache "hit" / "miss" / "off", and the rows it scored.
        self.target_pass_log: dict[str, dict[str, Any]] = {}
        logging.getLogger("trl_rpo").setLevel(args.get_process_log_level())
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if args.disable_dropout:  # TRL's helper misses functional dropout (T5's attention): switch off every kind
            for module in (self.model, self.ref_model):
                if module is not None:
                    disable_dropout(module)
        if self.is_fsdp_enabled and ref_model is None:
            # TRL loads a reference copy under FSDP for its own precompute; RPO's target pass uses the prepared policy.
            self.ref_model = None
        self._compute_targets_of_every_split()

    # RPO has no KL term: this switches off KTOTrainer's mismatched-completion machinery (KL columns, the
    # sequential-sampler and batch-size > 1 requirements, the extra forwards).
    @property
    def calculate_KL(self) -> bool:
        return False

    @calculate_KL.setter
    def calculate_KL(self, value: bool) -> None:
        pass

    # KTOTrainer's own precompute (and its hash of every weight) is switched off: RPO's target pass replaces it, run
    # by `_compute_targets_of_every_split` once the trainer is built, and by `evaluate` for new datasets.
    @property
    def precompute_ref_logps(self) -> bool:
        return False

    @precompute_ref_logps.setter
    def precompute_ref_logps(self, value: bool) -> None:
        pass

    # ----------------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Validate, expand to RPO rows and tokenise a split; derived columns in the input are recomputed."""
        row_format = check_rows(dataset, dataset_name)
        if row_format.conversational and not getattr(self._tokenizer, "chat_template", None):
            raise ValueError(
                f"The {dataset_name} dataset is conversational (message lists) but the tokenizer has no chat "
                "template to render them. Set `tokenizer.chat_template` (e.g. one of trl/chat_templates/), or "
                "pass plain-string prompts and completions."
            )
        with global_then_local_main_first():
            dataset = dataset.map(
                prepare_rows_batch,
                fn_kwargs={
                    "row_format": row_format,
                    "processing_class": processing_class,
                    "is_encoder_decoder": self.is_encoder_decoder,
                },
                batched=True,
                with_indices=True,
                remove_columns=dataset.column_names,
                num_proc=args.dataset_num_proc,
                desc=f"Tokenizing {dataset_name} dataset",
            )
        if not self.is_encoder_decoder:
            self._refuse_empty_prompts(dataset, dataset_name)
        return dataset

    def _refuse_empty_prompts(self, dataset: Dataset, name: str) -> None:
        # A causal model predicts each completion token from the tokens before it: with no prompt token, the first
        # completion token would never be scored.
        empty = list_lengths(dataset, "prompt_ids") == 0
        if empty.any():
            rows = np.unique(column_numpy(dataset, "source_row")[empty])
            raise ValueError(
                f"Column 'prompt' of the {name} dataset tokenises to no token in {describe_rows(rows, len(rows))}, "
                "so the first token of those completions could not be scored. Give those rows a prompt, or use a "
                "tokenizer that adds a BOS token."
            )

    def _fits_max_length(self, dataset: Dataset, name: str) -> np.ndarray:
        """Rows that keep a completion token after truncation: a causal prompt must be shorter than `max_length`.

        An encoder-decoder model truncates prompt and completion separately (the authors' `max_len` for both), so
        no row loses its whole completion there."""
        max_length = self.args.max_length
        if max_length is None or self.is_encoder_decoder:
            fits = np.ones(len(dataset), dtype=bool)
        else:
            fits = list_lengths(dataset, "prompt_ids") < max_length
        dropped = int((~fits).sum())
        if dropped == len(fits):
            raise ValueError(
                f"Every prompt of the {name} dataset fills `max_length={max_length}` tokens, so no completion token "
                "is left. Increase `max_length` or shorten the prompts."
            )
        if dropped:
            rows = np.unique(column_numpy(dataset, "source_row")[~fits])
            logger.warning(
                f"Dropped {dropped} of {len(fits)} rows of the {name} dataset whose prompt fills "
                f"`max_length={max_length}` ({describe_rows(rows, len(rows))} of your dataset). Increase `max_length` "
                "to keep them."
            )
        self._data_stats[f"data/{name}_rows_dropped_max_length"] = float(dropped)
        return fits

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            columns = ["prompt_ids", "completion_ids", *ROW_TENSOR_COLUMNS, self.args.length_column_name]
            self._signature_columns = columns

    # ------------------------------------------------------------------------------------- target pass
    def _compute_targets_of_every_split(self) -> None:
        """The target pass of the training split (which fixes the reward statistics), then of each eval split."""
        args = self.args
        self.train_dataset = self._precompute_ref_logps(
            self.train_dataset, "train", args.precompute_ref_batch_size or args.per_device_train_batch_size, True
        )
        eval_batch_size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                name: self._precompute_ref_logps(split, name, eval_batch_size)
                for name, split in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, "eval", eval_batch_size)
        self._release_ref_model()

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int, is_train: bool = False) -> Dataset:
        """Attach `ref_logps`, `target`, `value` and `length` to every row: one no-grad reference pass (or the cache),
        then the maths. The training split sets the reward statistics that the eval splits reuse."""
        fits = self._fits_max_length(dataset, name)
        scored = dataset if fits.all() else dataset.select(np.flatnonzero(fits))
        sum_logps, num_tokens = self._reference_logps(scored, name, batch_size)
        ref_logps = self._aggregate(sum_logps, num_tokens)
        group_ids = torch.from_numpy(column_numpy(scored, "group_key"))
        rewards, stats = normalize_rewards(
            torch.from_numpy(column_numpy(scored, "reward")).to(torch.float64),
            group_ids,
            mode=self.args.reward_normalization,
            stats=None if is_train else self._reward_stats,
        )
        if is_train:
            self._reward_stats = stats
            if stats.constant and self.args.reward_normalization == "global":
                logger.warning("The training rewards are constant: they are centred but not scaled.")
        columns, keep = self._row_columns(scored, name, ref_logps, rewards, group_ids, is_train)
        return self._attach_columns(dataset, name, fits, columns, keep)

    def _row_columns(
        self,
        dataset: Dataset,
        name: str,
        ref_logps: torch.Tensor,
        rewards: torch.Tensor,
        group_ids: torch.Tensor,
        is_train: bool,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-row columns the loss reads, and which rows to keep, from the aggregated reference log-probs and
        the normalised rewards of `dataset`'s rows.

        RPO adds `ref_logps`, `target` and `value` (and drops sparse prompts if asked). A subclass with another
        objective on the same rows overrides this hook.
        """
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
        )
        if is_train:
            self._global_value = targets.global_value
        self._record_sparse_counts(name, group_ids, targets)
        self._refuse_extreme_targets(dataset, name, targets.targets, targets.keep)
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

    def _attach_columns(
        self, dataset: Dataset, name: str, fits: np.ndarray, columns: dict[str, torch.Tensor], keep: torch.Tensor
    ) -> Dataset:
        """Add the columns (computed for the rows that fit) to the whole tokenised split, then keep the rows that fit
        and that `keep` retains. Adding before selecting leaves the split's Arrow table as is: `add_column` on a
        selection would first rewrite every column of the selected rows."""
        for column, values in columns.items():
            full = np.full(len(dataset), np.nan)
            full[fits] = values.numpy()
            dataset = dataset.add_column(column, full)
        dataset = dataset.add_column(self.args.length_column_name, self._model_input_lengths(dataset))
        kept = np.flatnonzero(fits)[keep.numpy()]
        if len(kept) == 0:
            raise ValueError(
                f"No row of the {name} dataset is left to train on: `sparse_prompt_strategy='drop'` dropped every "
                f"prompt, each having fewer than {self.args.min_completions_per_prompt} distinct completions. Add "
                "completions per prompt, lower `min_completions_per_prompt`, or use "
                "`sparse_prompt_strategy='global_baseline'`."
            )
        return dataset if len(kept) == len(dataset) else dataset.select(kept)

    def _model_input_lengths(self, dataset: Dataset) -> np.ndarray:
        """Tokens the model reads per row after truncation (what `train_sampling_strategy='group_by_length'` sorts)."""
        prompt, completion = list_lengths(dataset, "prompt_ids"), list_lengths(dataset, "completion_ids")
        max_length = self.args.max_length or np.iinfo(np.int64).max
        if self.is_encoder_decoder:
            return np.minimum(prompt, max_length) + np.minimum(completion, max_length)
        return np.minimum(prompt + completion, max_length)

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

    def _reference_logps(self, dataset: Dataset, name: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs and completion-token counts per row, from the cache or one no-grad pass.

        Both aggregations derive from (sum, count), so the cache holds only what the reference determines; RPO's
        settings are applied afterwards, which takes well under a second.
        """
        model = self._reference_model()
        log = self.target_pass_log[name] = {"cache": "off", "rows_scored_here": 0}  # this pass's, not a previous one's
        cache_file = self._cache_file(dataset, model) if self.args.cache_ref_log_probs else None
        cached = [None]
        if cache_file is not None and self.accelerator.is_main_process:
            cached[0] = reference_cache.load(cache_file)
        broadcast_object_list(cached, from_process=0)  # one decision for all ranks, even without a shared disk
        if cached[0] is not None:
            log["cache"] = "hit"
            logger.info(f"Reference log-probs of the {name} dataset: cache hit, read from {cache_file}.")
            return cached[0]["sum_logps"], cached[0]["num_tokens"]
        sum_logps, num_tokens = self._reference_pass(model, dataset, name, batch_size)
        if cache_file is not None:
            log["cache"] = "miss"
            if self.accelerator.is_main_process:
                reference_cache.save(cache_file, {"sum_logps": sum_logps, "num_tokens": num_tokens})
            logger.info(
                f"Reference log-probs of the {name} dataset: cache miss, computed and written to {cache_file}."
            )
            self.accelerator.wait_for_everyone()
        return sum_logps, num_tokens

    def _reference_model(self) -> torch.nn.Module:
        """The module whose forward gives ℓ_ref: the explicit reference, or the policy before its first update
        (adapter disabled under PEFT), prepared for DeepSpeed or FSDP like the policy will be."""
        if self._ref_model_released:
            raise ValueError(
                "The explicit `ref_model` was released after the target pass (training does not need it). To compute "
                "targets for a dataset passed to `evaluate()` later, build the trainer with `keep_ref_model=True`, or "
                "pass the dataset as `eval_dataset` when building the trainer."
            )
        if self.ref_model is not None:
            return self.ref_model
        if self.is_deepspeed_enabled:
            # The policy is not prepared yet (ZeRO-3 shards it): wrap it once in an inference engine, as KTO does.
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        if self.is_fsdp_enabled and len(self.accelerator._models) == 0:
            self._shard_policy_for_fsdp()
        return self.model

    def _shard_policy_for_fsdp(self) -> None:
        """Shard the policy now, with accelerate's own FSDP preparation, so that the target pass reads real weights
        (with `fsdp_cpu_ram_efficient_loading`, ranks > 0 hold none until then) and runs sharded like training.

        FSDP2: `accelerator.prepare` wants the optimizer too, which does not exist yet, so `fsdp2_prepare_model` (what
        it calls on the model: auto-wrap per layer, mixed precision, rank 0's weights broadcast) shards it in place;
        `train()` then finds an FSDP module, keeps it and maps the optimizer onto its parameters, as after an
        evaluation before training. FSDP1: `accelerator.prepare(model)` wraps it, as `Trainer.evaluation_loop` does.
        """
        accelerator = self.accelerator
        if accelerator.is_fsdp2:
            model = self.model
            if accelerator.state.fsdp_plugin.activation_checkpointing:
                model = fsdp2_apply_ac(accelerator, model)  # before sharding, as accelerate orders them
            model = fsdp2_prepare_model(accelerator, model)
            accelerator._models.append(model)  # prepared: the evaluation loop must not prepare it again
        else:
            model = accelerator.prepare(self.model)
        self.model = self.model_wrapped = model

    def _cache_file(self, dataset: Dataset, model: torch.nn.Module) -> str:
        """`<cache dir>/<key>.pt`, the key digesting all that determines ℓ_ref (see `trl_rpo.reference_cache`)."""
        if self._ref_weights_digest is None:
            # Under PEFT the reference is the frozen part (base, and a frozen "ref" adapter); else every weight.
            unwrapped = self.accelerator.unwrap_model(model)
            peft = self.ref_model is None and is_peft_model(unwrapped)
            frozen = (lambda name, param: not param.requires_grad) if peft else None
            self._ref_weights_digest = reference_cache.weights_digest(unwrapped, frozen)
        config = self.accelerator.unwrap_model(model).config
        key = reference_cache.cache_key(
            weights=self._ref_weights_digest,
            config=reference_cache.config_digest(config),
            attn_implementation=getattr(config, "_attn_implementation", None),
            autocast=self.accelerator.mixed_precision,
            max_length=self.args.max_length,
            encoder_decoder=self.is_encoder_decoder,
            pad_token_id=getattr(self.data_collator, "pad_token_id", None),
            tokens=token_ids_digest(dataset),
        )
        key = [key]
        broadcast_object_list(key, from_process=0)
        return os.path.join(_cache_dir(dataset), f"{key[0]}.pt")

    def _reference_pass(
        self, model: torch.nn.Module, dataset: Dataset, name: str, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One no-grad pass of `model` over `dataset`: each process scores a contiguous shard of the rows, in the same
        number of batches (sharded engines run collectives in every forward), and all shards are gathered on every
        rank in row order."""
        num_rows, world, rank = len(dataset), self.accelerator.num_processes, self.accelerator.process_index
        per_rank = -(-num_rows // world)
        start, stop = min(rank * per_rank, num_rows), min((rank + 1) * per_rank, num_rows)
        rows = dataset.select_columns(["prompt_ids", "completion_ids"]).with_format("arrow")
        # Filled in place: a small tensor kept per batch would pin the heap between the batches' large freed blocks.
        local = torch.zeros(per_rank, 2, dtype=torch.float64)  # (summed log-probs, tokens); zeros past a short shard
        log = self.target_pass_log.setdefault(name, {"cache": "off", "rows_scored_here": 0})
        batches = range(start, start + per_rank, batch_size)
        with self._reference_forward(model):
            for first in tqdm(batches, desc=f"Computing reference log-probs for the {name} dataset"):
                last = min(first + batch_size, stop)
                table = rows[first:last] if last > first else rows[:1]  # an idle rank still joins the collectives
                sum_logps, num_tokens, _, _ = self._completion_logps(model, self._collate_reference_batch(table))
                scored = max(last - first, 0)
                local[first - start : first - start + scored, 0] = sum_logps[:scored].detach().double().cpu()
                local[first - start : first - start + scored, 1] = num_tokens[:scored].double().cpu()
                log["rows_scored_here"] += scored
        gathered = self.accelerator.gather(local.to(self.accelerator.device)).cpu()[:num_rows]
        return gathered[:, 0].contiguous(), gathered[:, 1].contiguous()

    def _collate_reference_batch(self, table: pa.Table) -> dict[str, torch.Tensor]:
        collator = self.data_collator
        if type(collator) is DataCollatorForRewardedCompletions:
            batch = collator.collate_arrow(table.column("prompt_ids"), table.column("completion_ids"))
        else:  # a custom collator gets the rows as the training loader gives them
            batch = collator(table.to_pylist())
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def _release_ref_model(self) -> None:
        """An explicit `ref_model` is only read by the target pass: let it go (off the accelerator, and out of this
        trainer) unless `keep_ref_model=True`. Your own handle to it, if you keep one, still holds it in memory."""
        if self.ref_model is None or self.args.keep_ref_model:
            return
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # sharded engines are freed with the trainer's ref
            self.accelerator.unwrap_model(self.ref_model).to("cpu")
        # `accelerator.prepare_model` keeps every model it prepared: drop that hold too.
        self.accelerator._models = [m for m in self.accelerator._models if m is not self.ref_model]
        self.ref_model = None
        self._ref_model_released = True
        clear_device_cache(garbage_collection=True)

    # ---------------------------------------------------------------------------------------- the loss
    def _completion_logps(self, model, batch: dict[str, torch.Tensor], with_entropy: bool = False):
        """Per row: summed log-prob of the completion tokens, their count, summed token entropy, model outputs."""
        if self.is_encoder_decoder:
            mask = batch["completion_mask"]
            labels = batch["completion_ids"].masked_fill(mask == 0, -100)  # the model shifts them into its decoder
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            token_logps, entropy = selective_log_softmax_and_entropy(
                outputs.logits, batch["completion_ids"], entropy_requires_grad=False, row_mask=mask
            )
            token_logps = token_logps * mask
        else:
            kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            if self.aux_loss_enabled and model is not self.ref_model:
                kwargs["output_router_logits"] = True
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            with completion_only_lm_head(with_entropy):
                outputs = model(**kwargs, labels=labels, fused_lm_head=True)
            # Position i predicts token i + 1; prompt-learning PEFT prepends virtual tokens, so keep the last ones.
            mask = batch["completion_mask"][:, 1:]
            token_logps, entropy = outputs.log_probs[:, -mask.size(1) :], outputs.entropy
        entropy = (entropy[:, -mask.size(1) :].detach() * mask).sum(-1) if with_entropy else None
        return token_logps.sum(-1), mask.sum(-1), entropy, outputs

    def _aggregate(self, sum_logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        return sum_logps if self.args.logps_aggregation == "sum" else sum_logps / num_tokens.clamp(min=1)

    @contextlib.contextmanager
    def _reference_forward(self, model: torch.nn.Module):
        """Run `model` as the reference: eval mode, no grad, no checkpointing, autocast, and under PEFT the adapter
        disabled (or the frozen "ref" copy of the adapter a `PeftModel` passed in was given, as in KTO)."""
        was_training = model.training
        model.eval()  # the reference is evaluated without dropout, whatever `disable_dropout` says
        with contextlib.ExitStack() as stack:
            if self.ref_model is None and is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter = "ref" if "ref" in unwrapped.peft_config else None
                stack.enter_context(use_adapter(unwrapped, adapter_name=adapter))
            stack.enter_context(disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs))
            stack.enter_context(torch.no_grad())
            stack.enter_context(self.accelerator.autocast())
            stack.enter_context(trainable_bnb_layout(model))
            try:
                yield
            finally:
                model.train(was_training)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        with contextlib.nullcontext() if mode == "train" else trainable_bnb_layout(model):
            sum_logps, num_tokens, entropy, outputs = self._completion_logps(model, batch, with_entropy=True)
        policy_logps = self._aggregate(sum_logps, num_tokens)
        loss, row = self._loss_from_logps(batch, policy_logps, outputs)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._record_metrics(mode, batch, policy_logps.detach(), row, entropy, num_tokens)
        if return_outputs and not self.is_encoder_decoder:
            with torch.no_grad():  # `compute_metrics` wants logits, which the fused head never builds
                outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if return_outputs:
            return loss, outputs
        return loss

    def _loss_from_logps(self, batch, policy_logps: torch.Tensor, outputs) -> tuple[torch.Tensor, RowMetrics]:
        """The batch loss from the aggregated policy log-probs, and the per-row values that `_record_metrics` logs.

        `outputs` is the policy's forward output (unused by RPO). Subclasses override this hook to train another
        objective on the same rows, reference log-probs and metrics.
        """
        out = rpo_loss(policy_logps, batch["ref_logps"], batch["target"])
        return out.losses.mean(), RowMetrics(batch["target"], batch["value"], out.log_ratios, out.residuals)

    def _record_metrics(self, mode: str, batch, policy_logps, row: RowMetrics, entropy, completion_tokens) -> None:
        # One gather of a (rows, 10) table and one of the group keys: two syncs per step, whatever the metric count.
        tokens = batch["attention_mask"].sum(-1) + (completion_tokens if self.is_encoder_decoder else 0)
        columns = [policy_logps, batch["ref_logps"], row.targets, row.values, row.log_ratios, row.residuals]
        columns += [batch["reward"], entropy, completion_tokens, tokens]
        table = self.accelerator.gather_for_metrics(torch.stack([c.float() for c in columns], dim=1)).cpu()
        groups = self.accelerator.gather_for_metrics(batch["group_key"]).cpu()
        policy, ref, target, value, log_ratio, residual, reward, entropy, completion_tokens, tokens = table.unbind(1)
        metrics = self._metrics[mode]
        for key, column in [("logps/policy", policy), ("logps/ref", ref), ("log_ratio", log_ratio), ("kl", log_ratio)]:
            metrics[key].append(column.mean().item())
        metrics["target"].append(target.mean().item())
        metrics["value"].append(value.mean().item())
        metrics["rewards/implicit"].append(self.args.beta * log_ratio.mean().item())
        metrics["_residual_sq"].append(residual.pow(2).mean().item())
        metrics["entropy"].append((entropy.sum() / completion_tokens.sum().clamp(min=1)).item())
        if mode == "eval":  # ranked over the whole split at `log`, not only pairs that share a batch
            self._eval_rows.append(torch.stack([log_ratio.double(), reward.double(), groups.double()], dim=1))
        else:
            agree, pairs = pairwise_ranking_counts(log_ratio, reward, groups)  # τ > 0: same order as τ·log-ratio
            self._pair_counts[mode][0] += agree.item()
            self._pair_counts[mode][1] += pairs.item()
        if mode == "train":
            self._total_train_tokens += int(tokens.sum().item()) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(val) / len(val) for key, val in self._metrics[mode].items() if val}
        if "_residual_sq" in metrics:  # the root of the mean square, not a mean of per-batch roots
            metrics["residual_rms"] = metrics.pop("_residual_sq") ** 0.5
        if mode == "eval" and self._eval_rows:
            log_ratio, reward, groups = torch.cat(self._eval_rows).unbind(1)
            agree, pairs = pairwise_ranking_counts(log_ratio, reward, groups)
            self._pair_counts["eval"] = [agree.item(), pairs.item()]
            self._eval_rows = []
        agree, pairs = self._pair_counts[mode]
        if pairs > 0:
            metrics["rewards/accuracies"] = agree / pairs
        if mode == "eval":
            metrics = {f"{self._eval_prefix}_{key}": val for key, val in metrics.items()}
        elif not self._data_stats_logged:
            metrics.update(self._data_stats)
            self._data_stats_logged = True
        logs.update(metrics)
        super(KTOTrainer, self).log(logs, start_time)
        self._metrics[mode].clear()
        self._pair_counts[mode] = [0.0, 0.0]

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        # Remember the split's prefix so that RPO's metrics of `eval_dataset={"a": ...}` are logged as `eval_a_*`.
        self._eval_prefix = metric_key_prefix
        return super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate the eval split(s) given at construction, a name among them, or new dataset(s), whose targets are
        then computed here with the training split's reward statistics."""
        if eval_dataset is None or isinstance(eval_dataset, str):
            return super(KTOTrainer, self).evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        splits = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
        for name, split in splits:
            _refuse_iterable(split, name)
        if self.ref_model is None and not is_peft_model(self.model) and self.state.global_step > 0:
            raise ValueError(
                "Cannot compute RPO targets for a dataset passed to `evaluate()` after training started: with full "
                "fine-tuning and no `ref_model`, the reference is the initial policy, which only exists before the "
                "first update. Pass the dataset as `eval_dataset` when building the trainer, or pass a `ref_model`."
            )
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        metrics = {}
        for name, split in splits:
            split = self._prepare_dataset(split, self.processing_class, self.args, name)
            split = self._precompute_ref_logps(split, name, batch_size)
            prefix = metric_key_prefix if not isinstance(eval_dataset, dict) else f"{metric_key_prefix}_{name}"
            metrics |= super(KTOTrainer, self).evaluate(split, ignore_keys, prefix)
        return metrics


def _is_encoder_decoder(model, args: RPOConfig) -> bool:
    if isinstance(model, str):
        revision = (args.model_init_kwargs or {}).get("revision")
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=args.trust_remote_code)
    else:
        config = model.config
    return bool(getattr(config, "is_encoder_decoder", False))


def _refuse_iterable(dataset, name: str) -> None:
    if isinstance(dataset, IterableDataset | IterableDatasetDict):
        raise ValueError(
            f"The {name} dataset is an `IterableDataset`, but RPO must see every completion of a prompt to estimate "
            "V̂(x) before computing its targets. Use a map-style `Dataset` instead (e.g. "
            "`load_dataset(..., streaming=False)`): `datasets` memory-maps it from disk, so it works at any size."
        )


def _load_processing_class(model, args: RPOConfig):
    model_id = model if isinstance(model, str) else get_config_model_id(model.config)
    revision = (args.model_init_kwargs or {}).get("revision")
    return AutoProcessor.from_pretrained(model_id, revision=revision, trust_remote_code=args.trust_remote_code)


def _cache_dir(dataset: Dataset) -> str:
    """Next to the dataset's own cache files; for in-memory datasets, under the `datasets` cache directory."""
    if dataset.cache_files:
        return os.path.dirname(dataset.cache_files[0]["filename"])
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "trl_rpo")
