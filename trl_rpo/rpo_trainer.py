import contextlib
import hashlib
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
import trl.trainer.utils as trl_utils
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
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
from transformers.data.data_collator import DataCollatorMixin
from transformers.trainer_utils import EvalPrediction
from trl import KTOTrainer
from trl.data_utils import _tokenize, common_prefix_length, is_conversational
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import (
    get_config_model_id,
    global_then_local_main_first,
    pad,
    selective_log_softmax_and_entropy,
    use_adapter,
)

from .data import to_reward_rows
from .losses import normalize_rewards, pairwise_ranking_counts, rpo_loss, rpo_targets
from .rpo_config import RPOConfig


logger = get_logger(__name__)

# Columns the collator turns into per-row tensors; everything else the dataset holds is dropped by the Trainer.
ROW_TENSOR_COLUMNS = {"ref_logps": torch.float32, "target": torch.float32, "value": torch.float32}
ROW_TENSOR_COLUMNS |= {"reward": torch.float32, "group_key": torch.int64}
ROW_TENSOR_COLUMNS |= {"reward_z": torch.float32}  # the normalised reward, stored by DROTrainer
_CACHE_VERSION = "trl_rpo-reference-logps-v1"


def _ids_key(*id_lists: list[int]) -> int:
    """A stable signed 64-bit key for token-id sequences (groups rows by tokenised prompt, or completions)."""
    h = hashlib.blake2b(digest_size=8)
    for ids in id_lists:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little", signed=True)


@dataclass
class DataCollatorForRewardedCompletions(DataCollatorMixin):
    """
    Pads tokenised `(prompt, completion)` rows on the right and carries RPO's per-row values as tensors.

    Each example holds `prompt_ids` and `completion_ids` and, once targets exist, `ref_logps`, `target`, `value`,
    `reward` and `group_key`. For a causal model the output has `input_ids` (prompt + completion),
    `attention_mask` and `completion_mask` (1 on completion tokens), truncated to `max_length` before padding
    (keeping the start). For an encoder-decoder model (`is_encoder_decoder=True`) the prompt alone feeds the encoder
    (`input_ids`, `attention_mask`) and the completion is the decoder's target (`completion_ids`, padded with the
    pad token, and `completion_mask`), each truncated to `max_length`. Per-row values become one tensor each.

    Example:

    ```python
    >>> collator = DataCollatorForRewardedCompletions(pad_token_id=0)
    >>> collator([{"prompt_ids": [1, 2], "completion_ids": [3], "target": 0.5},
    ...           {"prompt_ids": [4], "completion_ids": [5, 6], "target": -0.5}])
    {'input_ids': tensor([[1, 2, 3], [4, 5, 6]]), 'attention_mask': tensor([[1, 1, 1], [1, 1, 1]]),
     'completion_mask': tensor([[0, 0, 1], [0, 1, 1]]), 'target': tensor([ 0.5000, -0.5000])}
    ```
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    is_encoder_decoder: bool = False
    return_tensors: str = "pt"

    def _pad(self, sequences: list[list[int]], value: int) -> torch.Tensor:
        tensors = [torch.tensor(s[: self.max_length], dtype=torch.int64) for s in sequences]
        return pad(tensors, padding_value=value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_ids"] for e in examples]
        completions = [e["completion_ids"] for e in examples]
        if self.is_encoder_decoder:
            output = {
                "input_ids": self._pad(prompts, self.pad_token_id),
                "attention_mask": self._pad([[1] * len(p) for p in prompts], 0),
                "completion_ids": self._pad(completions, self.pad_token_id),
                "completion_mask": self._pad([[1] * len(c) for c in completions], 0),
            }
        else:
            output = {
                "input_ids": self._pad([p + c for p, c in zip(prompts, completions, strict=True)], self.pad_token_id),
                "attention_mask": self._pad(
                    [[1] * (len(p) + len(c)) for p, c in zip(prompts, completions, strict=True)], 0
                ),
                "completion_mask": self._pad(
                    [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions, strict=True)], 0
                ),
            }
        for column, dtype in ROW_TENSOR_COLUMNS.items():
            if column in examples[0]:
                output[column] = torch.tensor([example[column] for example in examples], dtype=dtype)
        return output


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
    _precomputed_column = "target"  # a dataset holding this column already went through the target pass
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
        elif not isinstance(args, config_class):
            raise TypeError(
                f"`args` must be a `{config_class.__name__}`, got `{type(args).__name__}`: rename `KTOConfig(...)` "
                f"to `{config_class.__name__}(...)` (same arguments; options without meaning here are reported)."
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

    # RPO has no KL term: this switches off KTOTrainer's mismatched-completion machinery (KL columns, the
    # sequential-sampler and batch-size > 1 requirements, the extra forwards).
    @property
    def calculate_KL(self) -> bool:
        return False

    @calculate_KL.setter
    def calculate_KL(self, value: bool) -> None:
        pass

    # ----------------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "completion_ids" in dataset.column_names:  # already prepared
            return dataset
        map_kwargs = {"num_proc": args.dataset_num_proc}
        with global_then_local_main_first():
            dataset = to_reward_rows(dataset, dataset_name)
            conversational = is_conversational(dataset[0])
            if conversational and not getattr(self._tokenizer, "chat_template", None):
                raise ValueError(
                    f"The {dataset_name} dataset is conversational (message lists) but the tokenizer has no chat "
                    "template to render them. Set `tokenizer.chat_template` (e.g. one of trl/chat_templates/), or "
                    "pass plain-string prompts and completions."
                )
            if not conversational and not self.is_encoder_decoder:
                eos = self._tokenizer.eos_token
                dataset = dataset.map(
                    lambda x: {
                        "completion": x["completion"] if x["completion"].endswith(eos) else x["completion"] + eos
                    },
                    desc=f"Adding EOS to {dataset_name} dataset",
                    **map_kwargs,
                )
            dataset = dataset.map(
                _tokenize_seq2seq_row if self.is_encoder_decoder else _tokenize_row,
                fn_kwargs={"processing_class": processing_class},
                desc=f"Tokenizing {dataset_name} dataset",
                **map_kwargs,
            )
            # An encoder-decoder model truncates prompt and completion separately (the authors' `max_len` for
            # both), so no row loses its whole completion; a causal model drops rows whose prompt fills the window.
            if args.max_length is not None and not self.is_encoder_decoder:
                dataset = self._drop_overlong_prompts(dataset, args.max_length, dataset_name)
        return dataset

    def _drop_overlong_prompts(self, dataset, max_length, dataset_name):
        # A prompt that fills `max_length` leaves no completion token after truncation: nothing to learn from.
        keep = [len(ids) < max_length for ids in list(dataset["prompt_ids"])]
        dropped = len(keep) - sum(keep)
        if dropped == len(keep):
            raise ValueError(
                f"Every prompt of the {dataset_name} dataset fills `max_length={max_length}` tokens, so no completion "
                "token is left. Increase `max_length` or shorten the prompts."
            )
        if dropped:
            first = [i for i, k in enumerate(keep) if not k][:5]
            logger.warning(
                f"Dropped {dropped} of {len(keep)} rows of the {dataset_name} dataset whose prompt fills "
                f"`max_length={max_length}` (first rows: {first}). Increase `max_length` to keep them."
            )
            dataset = dataset.select([i for i, k in enumerate(keep) if k])
        self._data_stats[f"data/{dataset_name}_rows_dropped_max_length"] = float(dropped)
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", *ROW_TENSOR_COLUMNS]

    # ------------------------------------------------------------------------------------- target pass
    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """Attach `ref_logps`, `target` and `value` to every row: one no-grad reference pass, then the maths."""
        if self._precomputed_column in dataset.column_names:
            return dataset
        is_train = dataset is self.train_dataset
        sum_logps, num_tokens = self._reference_logps(dataset, name, batch_size)
        ref_logps = self._aggregate(sum_logps, num_tokens)
        group_ids = torch.tensor(list(dataset["group_key"]), dtype=torch.int64)
        rewards, stats = normalize_rewards(
            torch.tensor(list(dataset["reward"]), dtype=torch.float64),
            group_ids,
            mode=self.args.reward_normalization,
            stats=None if is_train else self._reward_stats,
        )
        if is_train:
            self._reward_stats = stats
            if stats.constant and self.args.reward_normalization == "global":
                logger.warning("The training rewards are constant: they are centred but not scaled.")
        return self._attach_row_targets(dataset, name, ref_logps, rewards, group_ids, is_train)

    def _attach_row_targets(
        self,
        dataset: Dataset,
        name: str,
        ref_logps: torch.Tensor,
        rewards: torch.Tensor,
        group_ids: torch.Tensor,
        is_train: bool,
    ) -> Dataset:
        """Add the per-row columns the loss reads, from the aggregated reference log-probs and normalised rewards.

        RPO adds `ref_logps`, `target` and `value` (and drops sparse rows if asked). A subclass with another
        objective on the same rows overrides this hook and sets `_precomputed_column` to a column it adds.
        """
        targets = rpo_targets(
            ref_logps,
            rewards,
            group_ids,
            torch.tensor(list(dataset["completion_key"]), dtype=torch.int64),
            beta=self.args.beta,
            estimator=self.args.partition_estimator,
            min_completions_per_prompt=self.args.min_completions_per_prompt,
            sparse_prompt_strategy=self.args.sparse_prompt_strategy,
            global_value=None if is_train else self._global_value,
        )
        if is_train:
            self._global_value = targets.global_value
        self._record_sparse_counts(name, group_ids, targets)
        dataset = dataset.add_column("ref_logps", ref_logps.tolist())
        dataset = dataset.add_column("target", targets.targets.tolist())
        dataset = dataset.add_column("value", targets.values.tolist())
        if not bool(targets.keep.all()):
            dataset = dataset.select(torch.nonzero(targets.keep).flatten().tolist())
        return dataset

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

        Both aggregations derive from (sum, count), so the cache depends only on the data, the reference and
        `max_length`; RPO's settings are applied afterwards, which takes well under a second.
        """
        fingerprint = [
            Hasher.hash((_CACHE_VERSION, dataset._fingerprint, self._precompute_model_hash, self.args.max_length))
        ]
        broadcast_object_list(fingerprint, from_process=0)
        cache_file = os.path.join(_cache_dir(dataset), f"{fingerprint[0]}.pt")
        cached = [None]
        if self.accelerator.is_main_process and os.path.exists(cache_file):
            cached[0] = torch.load(cache_file, weights_only=True)
        broadcast_object_list(cached, from_process=0)  # one decision for all ranks, even without a shared disk
        if cached[0] is not None:
            logger.info(f"Reusing the reference log-probs of the {name} dataset cached in {cache_file}.")
            return cached[0]["sum_logps"], cached[0]["num_tokens"]
        sum_logps, num_tokens = self._reference_pass(dataset, name, batch_size)
        if self.accelerator.is_main_process:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            torch.save({"sum_logps": sum_logps, "num_tokens": num_tokens}, cache_file)
        self.accelerator.wait_for_everyone()
        return sum_logps, num_tokens

    def _reference_pass(self, dataset: Dataset, name: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        columns = ["prompt_ids", "completion_ids"]
        loader = DataLoader(
            dataset.select_columns(columns),
            batch_size=batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            shuffle=False,
        )
        loader = self.accelerator.prepare(loader)
        if self.ref_model is None and self.is_deepspeed_enabled:
            # The policy is not prepared yet (ZeRO-3 shards it): wrap it once in an inference engine, as KTO does.
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        was_training = model.training
        model.eval()  # the reference is evaluated without dropout, whatever `disable_dropout` says
        sums, counts = [], []
        for batch in tqdm(loader, desc=f"Computing reference log-probs for the {name} dataset"):
            sum_logps, num_tokens = self._reference_batch_logps(model, batch)
            sum_logps, num_tokens = self.accelerator.gather_for_metrics((sum_logps, num_tokens))
            sums.append(sum_logps.double().cpu())
            counts.append(num_tokens.cpu())
        model.train(was_training)
        return torch.cat(sums), torch.cat(counts).double()

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
            with _completion_only_lm_head(with_entropy):
                outputs = model(**kwargs, labels=labels, fused_lm_head=True)
            # Position i predicts token i + 1; prompt-learning PEFT prepends virtual tokens, so keep the last ones.
            mask = batch["completion_mask"][:, 1:]
            token_logps, entropy = outputs.log_probs[:, -mask.size(1) :], outputs.entropy
        entropy = (entropy[:, -mask.size(1) :].detach() * mask).sum(-1) if with_entropy else None
        return token_logps.sum(-1), mask.sum(-1), entropy, outputs

    def _aggregate(self, sum_logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        return sum_logps if self.args.logps_aggregation == "sum" else sum_logps / num_tokens.clamp(min=1)

    def _reference_batch_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs and token counts of one batch: no grad, no checkpointing, adapter off."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            # a PeftModel passed in got a frozen "ref" copy of its adapter; otherwise the adapter is disabled
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        gc_off = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
        with torch.no_grad(), gc_off, adapter, self.accelerator.autocast():
            sum_logps, num_tokens, _, _ = self._completion_logps(model, batch)
        return sum_logps, num_tokens

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
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
        raw = eval_dataset is not None and not isinstance(eval_dataset, str)
        if raw and self.ref_model is None and not is_peft_model(self.model) and self.state.global_step > 0:
            raise ValueError(
                "Cannot compute RPO targets for a dataset passed to `evaluate()` after training started: with full "
                "fine-tuning and no `ref_model`, the reference is the initial policy, which only exists before the "
                "first update. Pass the dataset as `eval_dataset` when building the trainer, or pass a `ref_model`."
            )
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)


def _tokenize_row(example: dict, processing_class) -> dict:
    """Tokenise like TRL's KTOTrainer, and add the group key (the tokenised prompt) and a completion key."""
    template_kwargs = {"tools": example.get("tools"), **(example.get("chat_template_kwargs") or {})}
    if is_conversational(example):
        prompt_ids = _tokenize(processing_class, example["prompt"], add_generation_prompt=True, **template_kwargs)
        full_ids = _tokenize(processing_class, example["prompt"] + example["completion"], **template_kwargs)
    else:
        prompt_ids = _tokenize(processing_class, example["prompt"])
        full_ids = _tokenize(processing_class, example["prompt"] + example["completion"])
    prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    # The completion starts where the two tokenisations diverge (chat templates or BPE merges across the boundary).
    prompt_len = common_prefix_length(prompt_ids, full_ids)
    group_key = _ids_key(prompt_ids)  # the whole tokenised prompt, so a boundary merge cannot split a group
    return {
        "prompt_ids": full_ids[:prompt_len],
        "completion_ids": full_ids[prompt_len:],
        "group_key": group_key,
        "completion_key": _ids_key(prompt_ids, full_ids[prompt_len:]),
    }


# Above this many logits (completion tokens x vocabulary; 256 MB in fp32) the CPU head goes back to TRL's tiles.
_PLAIN_HEAD_MAX_LOGITS = 2**26


class _CompletionHeadOffAccelerator:
    """Stands in for TRL's `_ChunkedLogProbFunction` inside `_completion_only_lm_head()` (same `apply` signature).

    On CPU and MPS, TRL's tiled log-prob function falls back to several plain-torch passes per tile and recomputes
    the projection in backward: 1.2x a plain PyTorch step on its own in benchmarks/throughput.py. When the logits
    of the completion tokens are small enough to hold, they are computed once here (projection, TRL's scale /
    softcap / temperature transform, one `log_softmax` kept for backward) and the entropy and mean logit are read
    from them without gradient. On accelerators, or for larger batches, TRL's function runs. Either way only the
    outputs in `keep` are computed (when set): KTO's set-up asks for the mean logit, which RPO never logs, and the
    reference pass needs no entropy.
    """

    chunked = trl_utils._ChunkedLogProbFunction
    keep: tuple[str, ...] | None = None

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        if cls.keep is not None:
            outputs = tuple(name for name in outputs if name in cls.keep)
        too_big = hidden.shape[0] * weight.shape[0] > _PLAIN_HEAD_MAX_LOGITS
        if hidden.device.type not in ("cpu", "mps") or too_big or {"log_sum_sq_probs", "is_top1"} & set(outputs):
            return cls.chunked.apply(
                hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs
            )
        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature  # TRL's order: scale, softcap, temperature
        log_probs = logits.log_softmax(-1)
        token_logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1) if "entropy" in outputs else None
            mean_logits = logits.mean(-1) if "mean_logits" in outputs else None
        return token_logps, entropy, None, mean_logits, None


@contextlib.contextmanager
def _completion_only_lm_head(with_entropy: bool):
    """Make TRL's fused LM head cheap on CPU and MPS, with the same results.

    1. It projects only the labelled (completion) positions on CUDA/XPU but every position elsewhere (fixed tile
       shapes, for Neuron's compiler): on CPU/MPS that multiplies the head's work by sequence/completion length for
       nothing (3.2x RPO's step time in benchmarks/throughput.py), so it is switched to the labelled positions.
    2. Its log-prob function is replaced there by `_CompletionHeadOffAccelerator` (see its docstring).
    3. Everywhere, only the log-probs (and the entropy, if `with_entropy`) are computed.
    """
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: original(device) or device.type in ("cpu", "mps")
    trl_utils._ChunkedLogProbFunction = _CompletionHeadOffAccelerator
    _CompletionHeadOffAccelerator.keep = ("log_probs", "entropy") if with_entropy else ("log_probs",)
    try:
        yield
    finally:
        trl_utils._use_triton = original
        trl_utils._ChunkedLogProbFunction = _CompletionHeadOffAccelerator.chunked
        _CompletionHeadOffAccelerator.keep = None


def _tokenize_seq2seq_row(example: dict, processing_class) -> dict:
    """Encoder-decoder rows: the prompt feeds the encoder, the completion plus EOS is the decoder's target."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if is_conversational(example):
        template_kwargs = {"tools": example.get("tools"), **(example.get("chat_template_kwargs") or {})}
        prompt_ids = _tokenize(processing_class, example["prompt"], add_generation_prompt=True, **template_kwargs)
        completion = "".join(message["content"] for message in example["completion"])
    else:
        prompt_ids = _tokenize(processing_class, example["prompt"])
        completion = example["completion"]
    prompt_ids = prompt_ids["input_ids"]
    completion_ids = tokenizer(completion)["input_ids"]  # T5's tokenizer appends </s>; others may not
    if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "group_key": _ids_key(prompt_ids),
        "completion_key": _ids_key(prompt_ids, completion_ids),
    }


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
            f"The {name} dataset is an `IterableDataset`, but RPO must see every completion of a prompt before "
            "training to estimate V̂(x). Use a map-style `Dataset` instead (e.g. `load_dataset(..., streaming=False)`)"
            ": `datasets` memory-maps it from disk, so it works at any size."
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
