"""Sequence layouts: how a tokenised `(prompt, completion)` row becomes model inputs, and how the model's per-token
log-probs become per-row sums. One class per layout, chosen once per trainer ([`choose_layout`]):

- [`CausalLayout`]: prompt + completion in one right-padded sequence of a causal LM;
- [`PackedCausalLayout`] (`padding_free=True`): the rows of a batch laid end to end in one sequence, no padding;
- [`EncoderDecoderLayout`]: the prompt feeds the encoder, the completion is the decoder's target (Flan-T5);
- [`VisionLanguageLayout`]: a causal layout whose prompts hold images, read by a vision-language model (LLaVA-style)
  through its processor; the images ride along with each row and become `pixel_values` per batch.

Each owns its truncation rule (which rows keep a completion token under `max_length`), the tokens the model reads
per row, its collator, the model's keyword inputs and the per-row sums; options a layout cannot take are refused
here, once. No trainer is imported: the trainers hold a layout and call it.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate.utils import is_peft_model
from trl.trainer.utils import selective_log_softmax_and_entropy

from .data import IMAGE_COLUMNS, DataCollatorForRewardedCompletions, DataCollatorForRewardedImageCompletions
from .lm_head import completion_only_lm_head


# Attention implementations that read per-row position ids of one packed sequence as separate sequences
# (transformers' masking utilities for sdpa/eager/flex, `cu_seqlens` for flash-attention).
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")

_NO_LIMIT = np.iinfo(np.int64).max


@dataclass(frozen=True)
class CausalLayout:
    """Prompt + completion in one sequence, right-padded, cut at `max_length` keeping the start."""

    max_length: int | None = None
    name: ClassVar[str] = "causal"
    is_encoder_decoder: ClassVar[bool] = False
    # Columns besides the token ids that a batch is built from (the reference pass reads them with the ids).
    row_columns: ClassVar[tuple[str, ...]] = ()
    collator_class: ClassVar[type] = DataCollatorForRewardedCompletions

    # ----------------------------------------------------------------------------------------------- rows
    def fits(self, prompt_lengths: np.ndarray) -> np.ndarray:
        """Rows that keep a completion token after truncation: the prompt must be shorter than `max_length`."""
        if self.max_length is None:
            return np.ones(len(prompt_lengths), dtype=bool)
        return prompt_lengths < self.max_length

    def input_lengths(self, prompt_lengths: np.ndarray, completion_lengths: np.ndarray) -> np.ndarray:
        """Tokens the model reads per row after truncation (what `group_by_length` sorts)."""
        return np.minimum(prompt_lengths + completion_lengths, self.max_length or _NO_LIMIT)

    @property
    def needs_prompt_token(self) -> bool:
        """A causal model predicts each completion token from the tokens before it: with no prompt token, the first
        completion token would never be scored."""
        return True

    @property
    def sorts_reference_rows_by_length(self) -> bool:
        """Whether the target pass batches rows longest first (little padding per batch)."""
        return True

    # ---------------------------------------------------------------------------------------- batches
    def collator(self, pad_token_id: int, pad_to_multiple_of: int | None, value_columns: dict[str, torch.dtype]):
        return self.collator_class(
            pad_token_id=pad_token_id,
            max_length=self.max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            value_columns=value_columns,
            **self._collator_options(),
        )

    def _collator_options(self) -> dict[str, Any]:
        """What the collator of this layout is built with besides padding, truncation and value columns."""
        return {"is_encoder_decoder": self.is_encoder_decoder}

    def check_model(self, model) -> None:
        """Refuse a model this layout cannot feed (nothing to refuse for plain causal rows)."""

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The forward's inputs besides the labels."""
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def tokens_per_row(self, batch: dict[str, torch.Tensor], completion_tokens: torch.Tensor) -> torch.Tensor:
        """Tokens the model read per row (the `num_tokens` metric)."""
        return batch["attention_mask"].sum(-1)

    def prompt_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's token ids and its mask over the batch's positions (what DRO's value network reads)."""
        return batch["input_ids"], batch["attention_mask"] * (1 - batch["completion_mask"])

    @property
    def outputs_have_logits(self) -> bool:
        """Whether the training forward returns logits (`compute_metrics` wants them; the fused head builds none)."""
        return False

    def completion_logps(self, model, batch: dict[str, torch.Tensor], with_entropy: bool, **forward_kwargs):
        """Per row: summed log-prob of the completion tokens, their count, summed token entropy (or `None`), and the
        model's outputs. TRL's fused LM head gives the log-probs of the labelled tokens without full logits."""
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        with completion_only_lm_head(with_entropy):
            outputs = model(**self.model_inputs(batch), use_cache=False, labels=labels, fused_lm_head=True,
                            **forward_kwargs)  # fmt: skip
        # Position i predicts token i + 1; prompt-learning PEFT prepends virtual tokens, so keep the last ones.
        mask = batch["completion_mask"][:, 1:]
        token_logps = outputs.log_probs[:, -mask.size(1) :] * mask
        entropy = outputs.entropy[:, -mask.size(1) :].detach() * mask if with_entropy else None
        return *self._row_sums(batch, token_logps, mask, entropy), outputs

    def _row_sums(self, batch, token_logps: torch.Tensor, mask: torch.Tensor, entropy: torch.Tensor | None):
        return token_logps.sum(-1), mask.sum(-1), None if entropy is None else entropy.sum(-1)


@dataclass(frozen=True)
class PackedCausalLayout(CausalLayout):
    """`padding_free=True`: the rows of a batch laid end to end in one sequence, kept apart by per-row position ids
    (see [`~trl_rpo.data.pack_rows`]); truncation is the padded layout's."""

    name: ClassVar[str] = "packed causal"

    @property
    def sorts_reference_rows_by_length(self) -> bool:
        # No padding to save; on attention quadratic in the packed length (sdpa on CPU) grouping long rows costs more.
        return False

    def _collator_options(self):
        return {"padding_free": True}

    def check_model(self, model) -> None:
        """Rows of a packed batch share one sequence: only attention that keeps them apart may read it."""
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if not (attention in PACKING_ATTENTION or "flash" in str(attention)):
            raise ValueError(
                "`padding_free=True` needs an attention implementation that keeps packed rows apart "
                f"({', '.join(PACKING_ATTENTION)} or a flash-attention kernel); this model uses {attention!r}. Load "
                "it with `model_init_kwargs={'attn_implementation': 'sdpa'}` or remove `padding_free`."
            )
        if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
            raise ValueError(
                "`padding_free=True` cannot be used with prompt-learning PEFT (prompt/prefix tuning): its virtual "
                "tokens are added once per sequence, not once per row. Use LoRA, or remove `padding_free`."
            )

    def model_inputs(self, batch):
        # Position ids restarting on each row: transformers builds the mask that keeps the rows apart from them.
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}

    def tokens_per_row(self, batch, completion_tokens):
        return batch["row_lengths"]

    def _row_sums(self, batch, token_logps, mask, entropy):
        """Per-row sums of the one packed sequence: position i predicts token i + 1, so a value belongs to the row
        of the token it predicts."""
        row_lengths = batch["row_lengths"]
        rows = torch.repeat_interleave(torch.arange(len(row_lengths), device=row_lengths.device), row_lengths)[1:]
        per_row = lambda values: values.new_zeros(len(row_lengths)).index_add(0, rows, values[0])  # noqa: E731
        return per_row(token_logps), per_row(mask), None if entropy is None else per_row(entropy)


@dataclass(frozen=True)
class EncoderDecoderLayout(CausalLayout):
    """The prompt feeds the encoder and the completion is the decoder's target, each cut at `max_length` (the
    authors' `max_len` for both), so no row loses its whole completion."""

    name: ClassVar[str] = "encoder-decoder"
    is_encoder_decoder: ClassVar[bool] = True

    def fits(self, prompt_lengths):
        return np.ones(len(prompt_lengths), dtype=bool)

    def input_lengths(self, prompt_lengths, completion_lengths):
        limit = self.max_length or _NO_LIMIT
        return np.minimum(prompt_lengths, limit) + np.minimum(completion_lengths, limit)

    @property
    def needs_prompt_token(self) -> bool:
        return False  # the decoder starts from its own start token

    def tokens_per_row(self, batch, completion_tokens):
        return batch["attention_mask"].sum(-1) + completion_tokens

    def prompt_inputs(self, batch):
        return batch["input_ids"], batch["attention_mask"]  # the encoder reads the prompt alone

    @property
    def outputs_have_logits(self) -> bool:
        return True

    def completion_logps(self, model, batch, with_entropy, **forward_kwargs):
        mask = batch["completion_mask"]
        labels = batch["completion_ids"].masked_fill(mask == 0, -100)  # the model shifts them into its decoder
        outputs = model(**self.model_inputs(batch), labels=labels, **forward_kwargs)
        token_logps, entropy = selective_log_softmax_and_entropy(
            outputs.logits, batch["completion_ids"], entropy_requires_grad=False, row_mask=mask
        )
        entropy = entropy.detach() * mask if with_entropy else None
        return *self._row_sums(batch, token_logps * mask, mask, entropy), outputs


@dataclass(frozen=True)
class VisionLanguageLayout(CausalLayout):
    """A causal layout for vision-language models: each row's images (`images`, a list) ride along with its token
    ids, and each batch gets them as the processor's image inputs (`pixel_values`, and `image_sizes` /
    `image_grid_thw` where the model wants them). The prompt ids already hold the image tokens the processor
    expanded at tokenisation; a prompt is never cut (rows whose prompt fills `max_length` are dropped, as in the
    causal layout), so no image loses its tokens."""

    processor: Any = None
    name: ClassVar[str] = "vision-language"
    row_columns: ClassVar[tuple[str, ...]] = ("images",)

    collator_class: ClassVar[type] = DataCollatorForRewardedImageCompletions

    def _collator_options(self):
        return {"image_processor": self.processor.image_processor}

    def model_inputs(self, batch):
        image_inputs = {key: batch[key] for key in DataCollatorForRewardedImageCompletions.image_keys if key in batch}
        return super().model_inputs(batch) | image_inputs


def choose_layout(
    *,
    is_encoder_decoder: bool,
    padding_free: bool,
    has_images: bool,
    processing_class,
    max_length: int | None,
    custom_collator: bool = False,
) -> CausalLayout:
    """The layout of a trainer's rows, decided once, with the one refusal for each combination that cannot work."""
    if padding_free and custom_collator:
        raise ValueError(
            "`padding_free=True` sets up the trainer's own collator, but a `data_collator` was passed. Remove one of "
            "them (or pack in your collator: see `trl_rpo.data.pack_rows`)."
        )
    if has_images:
        if not hasattr(processing_class, "image_processor"):
            raise ValueError(
                f"The dataset has image columns ({' or '.join(IMAGE_COLUMNS)}), but the processing class "
                f"({type(processing_class).__name__}) has no image processor: pass the model's processor "
                "(`AutoProcessor.from_pretrained(...)`) as `processing_class`, with a vision-language model, or drop "
                "the image columns."
            )
        if is_encoder_decoder:
            raise ValueError(
                "Image rows need a vision-language model with a causal decoder (LLaVA-style); this model is an "
                "encoder-decoder. Drop the image columns or use a vision-language model."
            )
        if padding_free:
            raise ValueError(
                "`padding_free=True` cannot pack image rows: each row's image features are placed by its own image "
                "tokens, which packing does not keep apart. Remove `padding_free`."
            )
        return VisionLanguageLayout(max_length, processor=processing_class)
    if is_encoder_decoder:
        if padding_free:
            raise ValueError(
                "`padding_free=True` needs a causal model: an encoder-decoder's prompt and completion are two "
                "sequences, which cannot be laid end to end. Remove `padding_free`."
            )
        return EncoderDecoderLayout(max_length)
    return PackedCausalLayout(max_length) if padding_free else CausalLayout(max_length)
