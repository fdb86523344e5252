"""What RPOTrainer and DROTrainer share: the KTOTrainer constructor, data preparation, the policy's completion
log-probs (through the layout), the loss step, metrics, logging and evaluation. Each trainer names its objective
(`_objective_class`, from `objectives.py`); the target pass (`target_pass.py`) builds the objective's columns."""

import contextlib
import gc
import logging
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from torch.nn.parallel import DistributedDataParallel
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
from trl.trainer.utils import get_config_model_id, global_then_local_main_first

from .data import (
    IMAGE_COLUMNS,
    SHARED_ROW_COLUMNS,
    LengthGroupedSampler,
    PromptGroupedSampler,
    RewardSpec,
    check_rows,
    column_numpy,
    describe_rows,
    list_lengths,
    prepare_rows_batch,
)
from .layouts import choose_layout
from .losses import aggregate_logps
from .metrics import BatchMetrics
from .modeling import disable_dropout, trainable_bnb_layout
from .objectives import RowValues
from .rewarded_config import RewardedCompletionsConfig
from .target_pass import TargetPass, shard_policy_for_fsdp


logger = get_logger(__name__)


class RewardedCompletionsTrainer(KTOTrainer):
    """
    Base of [`RPOTrainer`] and [`DROTrainer`], which document the constructor: KTOTrainer's, with a configuration of
    class `_config_class` and an objective of class `_objective_class` (`trainer.objective`). Before training, every
    split is tokenised (in the layout its model and rows need, `trainer.layout`) and goes through the target pass
    (`trainer.target_pass`): reference log-probs, then the objective's columns. Training computes the policy's
    log-probs and the objective's loss (`_loss_from_logps`).
    """

    _name: ClassVar[str]
    _config_class: ClassVar[type[RewardedCompletionsConfig]]
    _objective_class: ClassVar[type]  # from `objectives.py`: its `columns`, `row_columns` and `loss`

    def __init__(
        self,
        model: "str | PreTrainedModel | PeftModel",  # noqa: F821
        ref_model: PreTrainedModel | None = None,
        args: RewardedCompletionsConfig | None = None,
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
        elif not isinstance(args, config_class):
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
        self.objective = self._objective_class.from_config(args)
        self.is_encoder_decoder = _is_encoder_decoder(model, args)
        self.layout = choose_layout(
            is_encoder_decoder=self.is_encoder_decoder,
            padding_free=args.padding_free,
            has_images=train_dataset is not None and bool(set(IMAGE_COLUMNS) & set(train_dataset.column_names)),
            processing_class=processing_class,
            max_length=args.max_length,
            custom_collator=data_collator is not None,
        )
        if data_collator is None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            data_collator = self.layout.collator(
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token is not None else tokenizer.eos_token_id,
                pad_to_multiple_of=None if args.pad_to_multiple_of == "auto" else args.pad_to_multiple_of,
                value_columns={**SHARED_ROW_COLUMNS, **dict.fromkeys(self.objective.columns, torch.float32)},
            )
        self._data_stats: dict[str, float] = {}  # counts of the data and the target pass, logged once
        self._data_stats_logged = False
        self._eval_prefix = "eval"
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
        self.layout.check_model(self.model)
        if self.is_fsdp_enabled and ref_model is None:
            # TRL loads a reference copy under FSDP for its own precompute; the target pass uses the prepared policy.
            self.ref_model = None
        self.batch_metrics = BatchMetrics(self.accelerator, args.beta, self._tp_size)
        self.target_pass = TargetPass(
            accelerator=self.accelerator,
            args=args,
            layout=self.layout,
            objective=self.objective,
            collator=self.data_collator,
            ref_model=self.ref_model,
            completion_logps=self._completion_logps,
            stats=self._data_stats,
        )
        self._compute_targets_of_every_split()

    @property
    def target_pass_log(self) -> dict[str, dict[str, Any]]:
        """What each split's target pass did on this rank: cache "hit" / "miss" / "off", and the rows it scored."""
        return self.target_pass.log

    # KTOTrainer attributes held at False whatever its `__init__` assigns (tests/test_trl_seam.py pins the lines):
    # - neither RPO nor DRO has a KL term: KTOTrainer's mismatched-completion machinery (KL columns, the
    #   sequential-sampler and batch-size > 1 requirements, the extra forwards) stays off;
    # - KTOTrainer's own precompute (and its hash of every weight) stays off: the target pass replaces it, run by
    #   `_compute_targets_of_every_split` once the trainer is built, and by `evaluate` for new datasets;
    # - KTOTrainer leaves image rows raw for its on-the-fly collator; here every split is tokenised once, with its
    #   images, by `_prepare_dataset`, and the layout (`VisionLanguageLayout`) builds their batches.
    calculate_KL = precompute_ref_logps = _is_vision_dataset = property(lambda self: False, lambda self, value: None)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Validate, expand to `(prompt, completion, reward)` rows and tokenise a split; derived columns in the input
        are recomputed."""
        row_format = check_rows(dataset, dataset_name, self.objective.columns, RewardSpec.from_config(args))
        images = set(IMAGE_COLUMNS) & set(dataset.column_names)
        if images and "images" not in self.layout.row_columns:  # never train on image rows without their images
            raise ValueError(
                f"The {dataset_name} dataset has image columns ({', '.join(sorted(images))}) but the training split "
                f"has none, so this trainer was set up for text rows ({self.layout.name} layout) and would drop the "
                "images. Give the training split its images too, or drop the image columns from this split."
            )
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
                    "with_images": "images" in self.layout.row_columns,
                },
                batched=True,
                with_indices=True,
                remove_columns=dataset.column_names,
                num_proc=args.dataset_num_proc,
                desc=f"Tokenizing {dataset_name} dataset",
            )
        if self.layout.needs_prompt_token:
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

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            columns = ["prompt_ids", "completion_ids", *self.layout.row_columns, *SHARED_ROW_COLUMNS]
            columns += self.objective.columns
            columns.append(self.args.length_column_name)
            self._signature_columns = columns

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
        if self.target_pass.release_reference():
            self.ref_model = None

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int, is_train: bool = False) -> Dataset:
        """KTOTrainer's precompute hook, here the target pass of a split (see [`TargetPass.run`])."""
        if self.is_fsdp_enabled and self.ref_model is None and len(self.accelerator._models) == 0:
            # The policy is π_ref: shard it now, so the pass reads real weights and runs sharded like training.
            self.model = self.model_wrapped = shard_policy_for_fsdp(self.accelerator, self.model)
        return self.target_pass.run(dataset, name, batch_size, self.model, is_train)

    def _get_train_sampler(self, train_dataset=None):
        """transformers' `group_by_length` grouping, read from the `length` column without Python work per row; or
        each prompt's rows side by side (`group_by_prompt`)."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        strategy = self.args.train_sampling_strategy
        if strategy not in ("group_by_length", "group_by_prompt") or not isinstance(dataset, Dataset):
            return super()._get_train_sampler(train_dataset)
        if strategy == "group_by_prompt":
            return PromptGroupedSampler(column_numpy(dataset, "group_key"))
        lengths = column_numpy(dataset, self.args.length_column_name)
        return LengthGroupedSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps)

    def _completion_logps(self, model, batch: dict[str, torch.Tensor], with_entropy: bool = False):
        """Per row: summed log-prob of the completion tokens, their count, summed token entropy, model outputs."""
        router_logits = self.aux_loss_enabled and model is not self.ref_model and not self.is_encoder_decoder
        forward_kwargs = {"output_router_logits": True} if router_logits else {}
        return self.layout.completion_logps(model, batch, with_entropy, **forward_kwargs)

    def _aggregate(self, sum_logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        return aggregate_logps(sum_logps, num_tokens, self.args.logps_aggregation)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        with contextlib.nullcontext() if mode == "train" else trainable_bnb_layout(model):
            sum_logps, num_tokens, entropy, outputs = self._completion_logps(model, batch, with_entropy=True)
        policy_logps = self._aggregate(sum_logps, num_tokens)
        loss, row = self._loss_from_logps(batch, policy_logps, outputs)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            aux_loss = self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item()
            self.batch_metrics.values[mode]["aux_loss"].append(aux_loss)
        tokens = self.layout.tokens_per_row(batch, num_tokens)
        self.batch_metrics.record(mode, batch, policy_logps.detach(), row, entropy, num_tokens, tokens)
        if return_outputs and not self.layout.outputs_have_logits:
            with torch.no_grad():  # `compute_metrics` wants logits, which the fused head never builds
                outputs = model(**self.layout.model_inputs(batch))
        if return_outputs:
            return loss, outputs
        return loss

    def _loss_from_logps(self, batch, policy_logps: torch.Tensor, outputs) -> tuple[torch.Tensor, RowValues]:
        """The batch loss from the aggregated policy log-probs (and the policy's forward `outputs`, which DRO's value
        network reads), and the per-row values that `batch_metrics` records."""
        return self.objective.loss(batch, policy_logps)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self.batch_metrics.summary(mode)
        if mode == "eval":
            metrics = {f"{self._eval_prefix}_{key}": val for key, val in metrics.items()}
        elif not self._data_stats_logged:
            metrics.update(self._data_stats)
            self._data_stats_logged = True
        logs.update(metrics)
        super(KTOTrainer, self).log(logs, start_time)

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        # Remember the split's prefix so that the metrics of `eval_dataset={"a": ...}` are logged as `eval_a_*`.
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
                f"Cannot compute {self._name} targets for a dataset passed to `evaluate()` after training started: "
                "with full fine-tuning and no `ref_model`, the reference is the initial policy, which only exists "
                "before the first update. Pass the dataset as `eval_dataset` when building the trainer, or pass a "
                "`ref_model`."
            )
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        metrics = {}
        for name, split in splits:
            split = self._prepare_dataset(split, self.processing_class, self.args, name)
            split = self._precompute_ref_logps(split, name, batch_size)
            prefix = metric_key_prefix if not isinstance(eval_dataset, dict) else f"{metric_key_prefix}_{name}"
            metrics |= super(KTOTrainer, self).evaluate(split, ignore_keys, prefix)
        return metrics

    def end(self) -> None:
        """
        Finish the trackers and destroy the process group, as [`~transformers.Trainer.end`], so that every rank
        exits by itself. Call it once, at the very end of a script, then drop the trainer (`del trainer`): its model
        may still hold the group (ZeRO-3 parameters, FSDP2 meshes), and the group should go before the interpreter
        shuts down.

        A gloo process group joins its worker threads only when its last reference goes; `destroy_process_group`
        drops torch's references only. A group that lives on into interpreter shutdown can hang there (DDP: the
        `Reducer` in the wrapped model waits for a rank that is gone) or abort (SIGABRT, "terminate called without
        an active exception": a worker thread frees a finished all-gather, needs the GIL, and the finalizing
        interpreter ends the thread). So, on every rank: wait for all; drop the wrapped model, the DeepSpeed
        engines, the optimizer and the scheduler (the trainer's and the accelerator's) and DeepSpeed's own hold on
        the models; collect them while every rank is alive; wait again; then finish as `Trainer.end` does.
        """
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        ddp = weakref.ref(self.model_wrapped) if isinstance(self.model_wrapped, DistributedDataParallel) else None
        accelerator.free_memory()  # the accelerator's own references (and its DeepSpeed engine's hooks)
        self.model_wrapped = self.model
        self.deepspeed = self._precompute_engine = None
        self.target_pass.release()
        self.optimizer = self.lr_scheduler = None
        if self.is_deepspeed_enabled:
            _release_from_deepspeed(self.model, self.ref_model)
        gc.collect()
        if ddp is not None and ddp() is not None:
            logger.warning(
                "The DistributedDataParallel model is still referenced when the process group is destroyed: this "
                "process may not exit. Please report it with the script or command you ran."
            )
        accelerator.wait_for_everyone()
        super().end()


def _release_from_deepspeed(*models: torch.nn.Module | None) -> None:
    """Drop DeepSpeed's module-level holds on the models it prepared, which would keep them, and the process group
    their ZeRO-3 parameters hold, alive until interpreter shutdown: the forward-module stack (`FWD_MODULE_STACK`,
    whose root entry is never popped) and the parameter coordinator's release plan (an `lru_cache` on a method,
    keyed by coordinator and submodule). tests/test_distributed.py fails when either moves (the model outlives end)."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    ours = {id(module) for model in models if model is not None for module in model.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in ours]
    release_plan = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
    for cell in release_plan.__closure__ or ():  # under DeepSpeed's `instrument_w_nvtx` wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def _is_encoder_decoder(model, args: RewardedCompletionsConfig) -> bool:
    if isinstance(model, str):
        revision = (args.model_init_kwargs or {}).get("revision")
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=args.trust_remote_code)
    else:
        config = model.config
    return bool(getattr(config, "is_encoder_decoder", False))


def _refuse_iterable(dataset, name: str) -> None:
    if isinstance(dataset, IterableDataset | IterableDatasetDict):
        raise ValueError(
            f"The {name} dataset is an `IterableDataset`, but the target pass reads every row before training (RPO's "
            "V̂(x) needs every completion of a prompt, the reward statistics every row). Use a map-style `Dataset` "
            "instead (e.g. `load_dataset(..., streaming=False)`): `datasets` memory-maps it from disk, so it works at "
            "any size."
        )


def _load_processing_class(model, args: RewardedCompletionsConfig):
    model_id = model if isinstance(model, str) else get_config_model_id(model.config)
    revision = (args.model_init_kwargs or {}).get("revision")
    return AutoProcessor.from_pretrained(model_id, revision=revision, trust_remote_code=args.trust_remote_code)
