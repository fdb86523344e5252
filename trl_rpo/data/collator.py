"""Batches of tokenised rows: right padding, truncation, and the per-row values the loss reads as tensors."""

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad


# Per-row values every trainer's batches carry (metrics read them); each objective adds the columns its loss reads.
SHARED_ROW_COLUMNS = {"reward": torch.float32, "group_key": torch.int64}


@dataclass
class DataCollatorForRewardedCompletions(DataCollatorMixin):
    """
    Pads tokenised `(prompt, completion)` rows on the right and carries per-row values as tensors.

    Each example holds `prompt_ids` and `completion_ids` and, once the target pass ran, per-row values: `reward` and
    `group_key`, and the columns of the trainer's objective (RPO's `ref_logps`, `target`, `value`), which the trainer
    names in `value_columns` (column → dtype). For a causal model the output has `input_ids` (prompt + completion),
    `attention_mask` and `completion_mask` (1 on completion tokens), truncated to `max_length` before padding
    (keeping the start); with `padding_free=True` the rows are then laid end to end in one sequence (see
    [`pack_rows`]). For an encoder-decoder model (`is_encoder_decoder=True`) the prompt alone feeds the encoder
    (`input_ids`, `attention_mask`) and the completion is the decoder's target (`completion_ids`, padded with the
    pad token, and `completion_mask`), each truncated to `max_length`. Each value column present becomes one tensor.

    Example:

    ```python
    >>> collator = DataCollatorForRewardedCompletions(pad_token_id=0, value_columns={"target": torch.float32})
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
    value_columns: dict[str, torch.dtype] = field(default_factory=lambda: dict(SHARED_ROW_COLUMNS))
    padding_free: bool = False
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.padding_free and self.is_encoder_decoder:
            raise ValueError(
                "`padding_free=True` needs a causal model: an encoder-decoder's prompt and completion are two "
                "sequences, which cannot be laid end to end. Remove `padding_free`."
            )

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
        for column, dtype in self.value_columns.items():
            if column in examples[0]:
                output[column] = torch.tensor([example[column] for example in examples], dtype=dtype)
        return pack_rows(output) if self.padding_free else output

    def collate_arrow(self, prompt_ids: pa.Array, completion_ids: pa.Array) -> dict[str, torch.Tensor]:
        """`torch_call` on token-id columns read as Arrow lists, vectorised (no Python work per row): what the
        target pass uses, where per-row collation would cost more than a small model's forward."""
        prompts = _flat_lists(prompt_ids, self.max_length)
        completions = _flat_lists(completion_ids, self.max_length)
        if self.is_encoder_decoder:
            input_ids, attention_mask, _ = self._pad_flat([prompts])
            labels, completion_mask, _ = self._pad_flat([completions])
            return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_ids": labels,
                    "completion_mask": completion_mask}  # fmt: skip
        input_ids, attention_mask, piece = self._pad_flat([prompts, completions])
        output = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": (piece == 1).long()}
        return pack_rows(output) if self.padding_free else output

    def _pad_flat(self, pieces: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, ...]:
        """Rows made of `pieces` (flat values, lengths) laid end to end, cut at `max_length`, right-padded: ids,
        attention mask, and which piece each position came from (-1 on padding)."""
        lengths = sum(length for _, length in pieces)
        kept = np.minimum(lengths, self.max_length or np.iinfo(np.int64).max)
        width = int(kept.max()) if len(kept) else 0
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = np.full((len(kept), width), self.pad_token_id, dtype=np.int64)
        source = np.full((len(kept), width), -1, dtype=np.int64)
        offset = np.zeros(len(kept), dtype=np.int64)
        for index, (values, length) in enumerate(pieces):
            rows = np.repeat(np.arange(len(length)), length)
            starts = np.repeat(np.cumsum(length) - length, length)
            positions = np.arange(len(values)) - starts + np.repeat(offset, length)
            inside = positions < kept[rows]
            ids[rows[inside], positions[inside]] = values[inside]
            source[rows[inside], positions[inside]] = index
            offset += length
        return torch.from_numpy(ids), torch.from_numpy((source >= 0).astype(np.int64)), torch.from_numpy(source)


@dataclass
class DataCollatorForRewardedImageCompletions(DataCollatorForRewardedCompletions):
    """
    [`DataCollatorForRewardedCompletions`] for a vision-language model: each example also holds `images` (a list,
    possibly empty), whose token ids its prompt already holds (the processor expanded them at tokenisation). The
    batch gets the images of all its rows, in row order, through `image_processor` (the processor's own):
    `pixel_values`, and `image_sizes` / `image_grid_thw` where the model wants them. Truncation, padding and value
    columns are the causal collator's; rows are never packed.
    """

    image_processor: Any = None
    # What an image processor returns for the model's forward (the keys a batch may carry besides the text's).
    image_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask")

    def __post_init__(self):
        if self.image_processor is None or self.padding_free or self.is_encoder_decoder:
            raise ValueError("Image rows need an `image_processor`, a causal model and no `padding_free`.")

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        output = super().torch_call(examples)
        images = [image for example in examples for image in example["images"] or []]
        if images:  # image processors refuse an empty list: a text-only batch has no image inputs
            processed = self.image_processor(images=images, return_tensors="pt")
            output |= {key: processed[key] for key in self.image_keys if key in processed}
        return output


def pack_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded causal batch → its rows laid end to end in one sequence, without pad tokens.

    The result has `input_ids` and `completion_mask` of shape (1, tokens), `position_ids` restarting at 0 on each
    row (what makes transformers' attention keep the rows apart), `row_lengths` (tokens of each row, in order) and
    no `attention_mask`; per-row value columns are kept as they are. Built from the padded batch, so truncation is
    exactly the padded path's.

    Example:

    ```python
    >>> pack_rows({"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
    ...            "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    ...            "completion_mask": torch.tensor([[0, 1, 1], [0, 1, 0]])})
    {'input_ids': tensor([[1, 2, 3, 4, 5]]), 'completion_mask': tensor([[0, 1, 1, 0, 1]]),
     'position_ids': tensor([[0, 1, 2, 0, 1]]), 'row_lengths': tensor([3, 2])}
    ```
    """
    tokens = batch["attention_mask"].bool()  # right padding: each row's tokens come first, in order
    row_lengths = tokens.sum(-1)
    starts = torch.repeat_interleave(row_lengths.cumsum(0) - row_lengths, row_lengths)
    packed = {
        "input_ids": batch["input_ids"][tokens][None],
        "completion_mask": batch["completion_mask"][tokens][None],
        "position_ids": (torch.arange(int(row_lengths.sum())) - starts)[None],
        "row_lengths": row_lengths,
    }
    per_row = {
        key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask", "completion_mask")
    }
    return packed | per_row


def _flat_lists(lists: pa.Array, max_length: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of an Arrow list column, each list cut at `max_length` as the collator cuts it."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    if max_length is not None and (lengths > max_length).any():
        keep = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths) < max_length
        values, lengths = values[keep], np.minimum(lengths, max_length)
    return values, lengths
