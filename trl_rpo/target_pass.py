"""The target pass: before training, every tokenised split gets the reference log-probs of its rows (from the cache,
or one no-grad pass of π_ref shared out across ranks) and then the objective's columns. [`TargetPass`] is a
component a trainer holds: it owns its state — which module is π_ref (an explicit `ref_model`, or the policy with
its adapter disabled under PEFT, else the initial policy) and when an explicit one is let go, the weights digest and
the cache, the reward statistics the training split fixes, the per-split log — and is given what it reads: the
accelerator, the options, the layout, the objective, the collator, and the policy at each call. It imports no
trainer."""

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model
from accelerate.utils.memory import clear_device_cache
from datasets import Dataset
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from . import reference_cache
from .data import (
    DataCollatorForRewardedCompletions,
    column_digest,
    column_numpy,
    describe_rows,
    list_lengths,
    token_ids_digest,
)
from .layouts import CausalLayout
from .losses import aggregate_logps, normalize_rewards
from .modeling import trainable_bnb_layout
from .objectives import SplitRows


logger = get_logger(__name__)


class TargetPass:
    """Reference log-probs and objective columns of tokenised splits: `run(dataset, name, batch_size, policy,
    is_train)` returns the split with the objective's columns and `length`, keeping the rows that fit `max_length`
    and that the objective keeps. The training split runs first: it fixes the reward statistics (and the
    objective's own) that evaluation splits reuse."""

    def __init__(
        self,
        *,
        accelerator: Accelerator,
        args: Any,
        layout: CausalLayout,
        objective: Any,
        collator: Callable,
        ref_model: torch.nn.Module | None,
        completion_logps: Callable,
        stats: dict[str, float],
    ):
        self.accelerator = accelerator
        self.args = args
        self.layout = layout
        self.objective = objective
        self.collator = collator
        self.ref_model = ref_model  # an explicit reference; None: the policy (adapter disabled under PEFT)
        self.completion_logps = completion_logps  # (model, batch) → summed log-probs, counts, entropy, outputs
        self.stats = stats  # counts the trainer logs once (`data/<split>_*`)
        self.log: dict[str, dict[str, Any]] = {}  # per split, on this rank: cache "hit"/"miss"/"off", rows scored
        # Per split, the seconds of each phase ("reference", "maths", "columns"), and the phase running now: what
        # benchmarks/scale.py reads, instead of timing private methods.
        self.seconds: dict[str, dict[str, float]] = {}
        self.phase: str | None = None
        self.reward_stats = None  # the training split's, reused by evaluation splits
        self.deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
        self.sharded = self.deepspeed or getattr(accelerator.state, "fsdp_plugin", None) is not None
        self.engine = None  # the DeepSpeed inference engine wrapping the policy as reference
        self._weights_digest: str | None = None
        self._ref_released = False

    # ------------------------------------------------------------------------------------------ the pass
    def run(
        self, dataset: Dataset, name: str, batch_size: int, policy: torch.nn.Module, is_train: bool = False
    ) -> Dataset:
        """Attach the objective's columns and `length` to every row: one no-grad reference pass (or the cache),
        then the maths."""
        fits = self._fits_max_length(dataset, name)
        scored = dataset if fits.all() else dataset.select(np.flatnonzero(fits))
        self.seconds[name] = {}
        with self._timed(name, "reference"):
            sum_logps, num_tokens = self.reference_logps(scored, name, batch_size, policy)
        with self._timed(name, "maths"):
            columns, keep = self._objective_columns(scored, name, sum_logps, num_tokens, is_train)
        with self._timed(name, "columns"):
            return self._attach_columns(dataset, fits, columns, keep)

    @contextlib.contextmanager
    def _timed(self, name: str, phase: str):
        start, self.phase = time.perf_counter(), phase
        try:
            yield
        finally:
            self.phase = None
            self.seconds[name][phase] = time.perf_counter() - start

    def _objective_columns(
        self, scored: Dataset, name: str, sum_logps: torch.Tensor, num_tokens: torch.Tensor, is_train: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The rewards normalised (with the training split's statistics for evaluation splits), then the
        objective's columns and the rows it keeps."""
        ref_logps = aggregate_logps(sum_logps, num_tokens, self.args.logps_aggregation)
        group_ids = torch.from_numpy(column_numpy(scored, "group_key"))
        rewards, reward_stats = normalize_rewards(
            torch.from_numpy(column_numpy(scored, "reward")).to(torch.float64),
            group_ids,
            mode=self.args.reward_normalization,
            stats=None if is_train else self.reward_stats,
        )
        if is_train:
            self.reward_stats = reward_stats
            if reward_stats.constant and self.args.reward_normalization == "global":
                logger.warning("The training rewards are constant: they are centred but not scaled.")
        rows = SplitRows(
            name=name,
            ref_logps=ref_logps,
            rewards=rewards,
            group_ids=group_ids,
            completion_keys=torch.from_numpy(column_numpy(scored, "completion_key")),
            source_rows=column_numpy(scored, "source_row"),
            stats=self.stats,
        )
        return self.objective.row_columns(rows, is_train)

    def _fits_max_length(self, dataset: Dataset, name: str) -> np.ndarray:
        """Rows that keep a completion token after truncation (the layout's rule); the others are dropped, counted."""
        max_length = self.args.max_length
        fits = self.layout.fits(list_lengths(dataset, "prompt_ids"))
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
        self.stats[f"data/{name}_rows_dropped_max_length"] = float(dropped)
        return fits

    def _attach_columns(
        self, dataset: Dataset, fits: np.ndarray, columns: dict[str, torch.Tensor], keep: torch.Tensor
    ) -> Dataset:
        """Add the columns (computed for the rows that fit) to the whole tokenised split, then keep the rows that fit
        and that `keep` retains. Adding before selecting leaves the split's Arrow table as is: `add_column` on a
        selection would first rewrite every column of the selected rows."""
        for column, values in columns.items():
            full = np.full(len(dataset), np.nan)
            full[fits] = values.numpy()
            dataset = dataset.add_column(column, full)
        dataset = dataset.add_column(self.args.length_column_name, self.input_lengths(dataset))
        kept = np.flatnonzero(fits)[keep.numpy()]
        return dataset if len(kept) == len(dataset) else dataset.select(kept)

    def input_lengths(self, dataset: Dataset) -> np.ndarray:
        """Tokens the model reads per row after truncation (what `train_sampling_strategy='group_by_length'` sorts)."""
        return self.layout.input_lengths(list_lengths(dataset, "prompt_ids"), list_lengths(dataset, "completion_ids"))

    # ----------------------------------------------------------------------------- reference log-probs
    def reference_logps(
        self, dataset: Dataset, name: str, batch_size: int, policy: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs and completion-token counts per row, from the cache or one no-grad pass.

        Both aggregations derive from (sum, count), so the cache holds only what the reference determines; the
        objective's settings are applied afterwards, which takes well under a second.
        """
        model = self.reference_model(policy)
        log = self.log[name] = {"cache": "off", "rows_scored_here": 0}  # this pass's, not a previous one's
        cache_file = self._cache_file(dataset, model, policy) if self.args.cache_ref_log_probs else None
        cached = [None]
        if cache_file is not None and self.accelerator.is_main_process:
            cached[0] = reference_cache.load(cache_file, len(dataset))
        broadcast_object_list(cached, from_process=0)  # one decision for all ranks, even without a shared disk
        if cached[0] is not None:
            log["cache"] = "hit"
            logger.info(f"Reference log-probs of the {name} dataset: cache hit, read from {cache_file}.")
            return cached[0]["sum_logps"], cached[0]["num_tokens"]
        sum_logps, num_tokens = self._reference_pass(model, dataset, name, batch_size, policy)
        if cache_file is not None:
            log["cache"] = "miss"
            if self.accelerator.is_main_process:
                reference_cache.save(cache_file, {"sum_logps": sum_logps, "num_tokens": num_tokens})
            logger.info(
                f"Reference log-probs of the {name} dataset: cache miss, computed and written to {cache_file}."
            )
            self.accelerator.wait_for_everyone()
        return sum_logps, num_tokens

    def reference_model(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward gives ℓ_ref: the explicit reference, or the policy before its first update
        (adapter disabled under PEFT), wrapped for DeepSpeed like the policy will be (FSDP: the trainer shards the
        policy first, see [`shard_policy_for_fsdp`])."""
        if self._ref_released:
            raise ValueError(
                "The explicit `ref_model` was released after the target pass (training does not need it). To compute "
                "targets for a dataset passed to `evaluate()` later, build the trainer with `keep_ref_model=True`, or "
                "pass the dataset as `eval_dataset` when building the trainer."
            )
        if self.ref_model is not None:
            return self.ref_model
        if self.deepspeed:
            # The policy is not prepared yet (ZeRO-3 shards it): wrap it once in an inference engine, as KTO does.
            if self.engine is None:
                self.engine = prepare_deepspeed(policy, self.accelerator)
            return self.engine
        return policy

    def _cache_file(self, dataset: Dataset, model: torch.nn.Module, policy: torch.nn.Module) -> str:
        """`<cache dir>/<key>.safetensors`, the key digesting all that determines ℓ_ref (`trl_rpo.reference_cache`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if self._weights_digest is None:
            # Under PEFT the reference is the frozen part (base, and a frozen "ref" adapter); else every weight.
            peft = self.ref_model is None and is_peft_model(unwrapped)
            frozen = (lambda name, param: not param.requires_grad) if peft else None
            self._weights_digest = reference_cache.weights_digest(unwrapped, frozen)
        config = unwrapped.config
        key = reference_cache.cache_key(
            weights=self._weights_digest,
            config=reference_cache.config_digest(config),
            attn_implementation=getattr(config, "_attn_implementation", None),
            autocast=self.accelerator.mixed_precision,
            max_length=self.args.max_length,
            encoder_decoder=self.layout.is_encoder_decoder,
            pad_token_id=getattr(self.collator, "pad_token_id", None),
            tokens=token_ids_digest(dataset),
            # Image rows: what the reference also reads. The group key digests each row's images (and prompt).
            **({"images": column_digest(dataset, "group_key")} if "images" in self.layout.row_columns else {}),
        )
        key = [key]
        broadcast_object_list(key, from_process=0)
        return os.path.join(_cache_dir(dataset), key[0] + reference_cache.CACHE_SUFFIX)

    def _reference_pass(
        self, model: torch.nn.Module, dataset: Dataset, name: str, batch_size: int, policy: torch.nn.Module
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
        log = self.log.setdefault(name, {"cache": "off", "rows_scored_here": 0})
        with self._reference_forward(model, policy):
            for first in tqdm(
                range(0, per_rank, batch_size), desc=f"Computing reference log-probs for the {name} dataset"
            ):
                last = min(first + batch_size, stop - start)
                table = rows[first:last] if last > first else columns[:1]  # an idle rank joins the collectives
                sum_logps, num_tokens, _, _ = self.completion_logps(model, self._collate(table))
                scored = torch.from_numpy(order[first:last]) if last > first else torch.zeros(0, dtype=torch.int64)
                local[scored, 0] = sum_logps[: len(scored)].detach().double().cpu()
                local[scored, 1] = num_tokens[: len(scored)].double().cpu()
                log["rows_scored_here"] += len(scored)
        gathered = self.accelerator.gather(local.to(self.accelerator.device)).cpu()[:num_rows]
        return gathered[:, 0].contiguous(), gathered[:, 1].contiguous()

    def _scoring_order(self, dataset: Dataset, start: int, stop: int) -> np.ndarray:
        """Positions 0 … stop − start of a shard in the order the pass scores them. Padded batches take the rows
        longest first, so each batch holds rows of similar length and little padding (the results are per row, so
        the order changes nothing else; the longest batch comes first, so an out-of-memory error comes at once).
        The packed layout keeps the shard's order (see `PackedCausalLayout`)."""
        if not self.layout.sorts_reference_rows_by_length or stop <= start:
            return np.arange(stop - start)
        lengths = self.input_lengths(dataset.select(range(start, stop)))
        return np.argsort(-lengths, kind="stable")

    def _collate(self, table: pa.Table | dict[str, list]) -> dict[str, torch.Tensor]:
        collator = self.collator
        if type(collator) is DataCollatorForRewardedCompletions:
            batch = collator.collate_arrow(table.column("prompt_ids"), table.column("completion_ids"))
        elif isinstance(table, dict):  # decoded columns (images)
            batch = collator([dict(zip(table, row, strict=True)) for row in zip(*table.values(), strict=True)])
        else:  # a custom collator gets the rows as the training loader gives them
            batch = collator(table.to_pylist())
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    @contextlib.contextmanager
    def _reference_forward(self, model: torch.nn.Module, policy: torch.nn.Module):
        """Run `model` as the reference: eval mode, no grad, no checkpointing, autocast, and under PEFT the adapter
        disabled (or the frozen "ref" copy of the adapter a `PeftModel` passed in was given, as in KTO)."""
        was_training = model.training
        model.eval()  # the reference is evaluated without dropout, whatever `disable_dropout` says
        with contextlib.ExitStack() as stack:
            if self.ref_model is None and is_peft_model(policy):
                unwrapped = self.accelerator.unwrap_model(policy)
                adapter = "ref" if "ref" in unwrapped.peft_config else None
                stack.enter_context(use_adapter(unwrapped, adapter_name=adapter))
            stack.enter_context(disable_gradient_checkpointing(policy, self.args.gradient_checkpointing_kwargs))
            stack.enter_context(torch.no_grad())
            stack.enter_context(self.accelerator.autocast())
            stack.enter_context(trainable_bnb_layout(model))
            try:
                yield
            finally:
                model.train(was_training)

    # ----------------------------------------------------------------------------------------- release
    def release_reference(self) -> bool:
        """An explicit `ref_model` is only read by the target pass: let it go (off the accelerator, and out of this
        component) unless `keep_ref_model=True`; returns whether it went, so the trainer drops its own handle. Your
        own handle to it, if you keep one, still holds it in memory."""
        if self.ref_model is None or self.args.keep_ref_model:
            return False
        if not self.sharded:  # sharded engines are freed with the last reference
            self.accelerator.unwrap_model(self.ref_model).to("cpu")
        # `accelerator.prepare_model` keeps every model it prepared: drop that hold too.
        self.accelerator._models = [m for m in self.accelerator._models if m is not self.ref_model]
        self.ref_model = None
        self._ref_released = True
        clear_device_cache(garbage_collection=True)
        return True

    def release(self) -> None:
        """Drop the DeepSpeed inference engine (at the end of a script, before the process group goes)."""
        self.engine = None


def shard_policy_for_fsdp(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Shard the policy now, with accelerate's own FSDP preparation, so that the target pass reads real weights (with
    `fsdp_cpu_ram_efficient_loading`, ranks > 0 hold none until then) and runs sharded like training.

    FSDP2: `accelerator.prepare` wants the optimizer too, which does not exist yet, so `fsdp2_prepare_model` (what it
    calls on the model: auto-wrap per layer, mixed precision, rank 0's weights broadcast) shards it in place;
    `train()` then finds an FSDP module, keeps it and maps the optimizer onto its parameters, as after an evaluation
    before training. FSDP1: `accelerator.prepare(model)` wraps it, as `Trainer.evaluation_loop` does.
    """
    if accelerator.is_fsdp2:
        if accelerator.state.fsdp_plugin.activation_checkpointing:
            model = fsdp2_apply_ac(accelerator, model)  # before sharding, as accelerate orders them
        model = fsdp2_prepare_model(accelerator, model)
        accelerator._models.append(model)  # prepared: the evaluation loop must not prepare it again
        return model
    return accelerator.prepare(model)


def _cache_dir(dataset: Dataset) -> str:
    """Next to the dataset's own cache files; for in-memory datasets, under the `datasets` cache directory."""
    if dataset.cache_files:
        return os.path.dirname(dataset.cache_files[0]["filename"])
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "trl_rpo")
