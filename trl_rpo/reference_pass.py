"""The reference side of the target pass: which module is π_ref, how it runs (adapter disabled, no grad, sharded
like the policy), one no-grad pass over a split shared out across ranks, the on-disk cache, and letting an explicit
`ref_model` go.

[`ReferencePassMixin`] is mixed into the trainers of `trl_rpo` (over `KTOTrainer`); it reads the trainer's
`accelerator`, `model`, `ref_model`, `args`, `data_collator`, `layout`, `_completion_logps` and
`_model_input_lengths`.
"""

import contextlib
import os

import datasets
import numpy as np
import pyarrow as pa
import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model
from accelerate.utils.memory import clear_device_cache
from datasets import Dataset
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from . import reference_cache
from .data import DataCollatorForRewardedCompletions, column_digest, token_ids_digest
from .modeling import trainable_bnb_layout


logger = get_logger(__name__)


class ReferencePassMixin:
    """Reference log-probs of a tokenised split: `_reference_logps(dataset, name, batch_size)` gives, per row, the
    summed log-prob of the completion under π_ref and its token count, from the cache or one no-grad pass."""

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
            cached[0] = reference_cache.load(cache_file, len(dataset))
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
        """`<cache dir>/<key>.safetensors`, the key digesting all that determines ℓ_ref (`trl_rpo.reference_cache`)."""
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
            # Image rows: what the reference also reads. The group key digests each row's images (and prompt).
            **({"images": column_digest(dataset, "group_key")} if "images" in self.layout.row_columns else {}),
        )
        key = [key]
        broadcast_object_list(key, from_process=0)
        return os.path.join(_cache_dir(dataset), key[0] + reference_cache.CACHE_SUFFIX)

    def _reference_pass(
        self, model: torch.nn.Module, dataset: Dataset, name: str, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One no-grad pass of `model` over `dataset`: each process scores a contiguous shard of the rows, in the same
        number of batches (sharded engines run collectives in every forward), and all shards are gathered on every
        rank in row order. Padded batches take the shard's rows longest first (see `_scoring_order`)."""
        num_rows, world, rank = len(dataset), self.accelerator.num_processes, self.accelerator.process_index
        per_rank = -(-num_rows // world)
        start, stop = min(rank * per_rank, num_rows), min((rank + 1) * per_rank, num_rows)
        order = self._scoring_order(dataset, start, stop)  # shard positions, in the order they are scored
        columns = dataset.select_columns(["prompt_ids", "completion_ids", *self.layout.row_columns])
        columns = columns if self.layout.row_columns else columns.with_format("arrow")  # images: decoded rows
        rows = columns.select(order + start)
        # Filled in place: a small tensor kept per batch would pin the heap between the batches' large freed blocks.
        local = torch.zeros(per_rank, 2, dtype=torch.float64)  # (summed log-probs, tokens); zeros past a short shard
        log = self.target_pass_log.setdefault(name, {"cache": "off", "rows_scored_here": 0})
        with self._reference_forward(model):
            for first in tqdm(
                range(0, per_rank, batch_size), desc=f"Computing reference log-probs for the {name} dataset"
            ):
                last = min(first + batch_size, stop - start)
                table = rows[first:last] if last > first else columns[:1]  # an idle rank joins the collectives
                sum_logps, num_tokens, _, _ = self._completion_logps(model, self._collate_reference_batch(table))
                scored = torch.from_numpy(order[first:last]) if last > first else torch.zeros(0, dtype=torch.int64)
                local[scored, 0] = sum_logps[: len(scored)].detach().double().cpu()
                local[scored, 1] = num_tokens[: len(scored)].double().cpu()
                log["rows_scored_here"] += len(scored)
        gathered = self.accelerator.gather(local.to(self.accelerator.device)).cpu()[:num_rows]
        return gathered[:, 0].contiguous(), gathered[:, 1].contiguous()

    def _scoring_order(self, dataset: Dataset, start: int, stop: int) -> np.ndarray:
        """Positions 0 … stop − start of a shard in the order the pass scores them. Padded batches take the rows
        longest first, so each batch holds rows of similar length and little padding (the results are per row, so
        the order changes nothing else; the longest batch comes first, so an out-of-memory error comes at once). A
        padding-free batch has no padding to save, and on attention that is quadratic in the packed length (sdpa on
        CPU) grouping the long rows would cost more: it keeps the shard's order."""
        if not self.layout.sorts_reference_rows_by_length or stop <= start:
            return np.arange(stop - start)
        lengths = self._model_input_lengths(dataset.select(range(start, stop)))
        return np.argsort(-lengths, kind="stable")

    def _collate_reference_batch(self, table: pa.Table | dict[str, list]) -> dict[str, torch.Tensor]:
        collator = self.data_collator
        if type(collator) is DataCollatorForRewardedCompletions:
            batch = collator.collate_arrow(table.column("prompt_ids"), table.column("completion_ids"))
        elif isinstance(table, dict):  # decoded columns (images)
            batch = collator([dict(zip(table, row, strict=True)) for row in zip(*table.values(), strict=True)])
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


def _cache_dir(dataset: Dataset) -> str:
    """Next to the dataset's own cache files; for in-memory datasets, under the `datasets` cache directory."""
    if dataset.cache_files:
        return os.path.dirname(dataset.cache_files[0]["filename"])
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "trl_rpo")
