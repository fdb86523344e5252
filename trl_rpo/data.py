"""Turn the dataset formats a TRL user has into tokenised RPO rows, refusing bad input early.

Accepted formats (standard strings or conversational message lists, extra columns ignored):

- `prompt, completion, reward`: a real-valued reward per row (a bool `reward` column counts as 1.0 / 0.0);
- `prompt, completion, label`: KTO's unpaired format, `label` True → reward 1.0, False → 0.0;
- `prompt?, chosen, rejected`: DPO's paired format, two rows per pair (chosen, then rejected), rewards from
  `score_chosen` / `score_rejected` when both are present, else 1.0 / 0.0; without `prompt`, the common prefix of the
  two conversations is the prompt (TRL's `extract_prompt`).

[`check_rows`] validates a split in one pass over its Arrow batches (no column is pulled into Python lists, so it
costs little at any size) and raises one `ValueError` naming the column, the rows and the fix. [`reward_rows_batch`]
and [`tokenize_batch`] then run inside one batched `Dataset.map`. Columns derived by a trainer (token ids, keys,
targets) are never trusted: they are dropped and recomputed with the current trainer's settings. Every output row
keeps `source_row`, the index of the row (or pair) in the dataset the user passed, so that later errors and counts
name the user's rows. [`DataCollatorForRewardedCompletions`] pads rows into batches, from Python rows in training
and from Arrow batches (no loop over rows) in the target pass.
"""

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset
from transformers.data.data_collator import DataCollatorMixin
from trl.data_utils import _tokenize, common_prefix_length, extract_prompt
from trl.trainer.utils import pad


logger = logging.getLogger(__name__)

PAIRED_COLUMNS = ("chosen", "rejected")
SCORE_COLUMNS = ("score_chosen", "score_rejected")
# Per-row chat-template inputs that TRL's tokenisation understands; kept next to the RPO columns.
PASSTHROUGH_COLUMNS = ("tools", "chat_template_kwargs")
# Columns the data preparation and the target pass add (TRL's KTO ones included): recomputed, never read from the
# input. Each trainer adds the columns of its own objective (`check_rows(..., trainer_columns=...)`).
DERIVED_COLUMNS = (
    "source_row", "prompt_ids", "completion_ids", "group_key", "completion_key", "length", "KL_completion_ids",
    "ref_KL_logps",
)  # fmt: skip
FORMATS_HELP = (
    "RPO accepts `prompt`/`completion`/`reward` (float), `prompt`/`completion`/`label` (bool, KTO format) or "
    "`prompt`/`chosen`/`rejected` with optional `score_chosen`/`score_rejected` (DPO format)."
)
_SCAN_BATCH = 10_000
# Per-row values every trainer's batches carry (metrics read them); each objective adds the columns its loss reads.
SHARED_ROW_COLUMNS = {"reward": torch.float32, "group_key": torch.int64}


@dataclass(frozen=True)
class RowFormat:
    """What [`check_rows`] found: the layout, whether the text is conversational, and the columns to carry."""

    layout: str  # "reward", "label" or "paired"
    conversational: bool
    scored: bool = False  # paired rows with `score_chosen` / `score_rejected`
    passthrough: tuple[str, ...] = ()


def describe_rows(indices: Iterable[int], count: int | None = None, limit: int = 5) -> str:
    """`"3 row(s) (indices 0, 4, 9)"`, with at most `limit` indices shown."""
    shown = [int(i) for i in list(indices)[:limit]]
    count = len(shown) if count is None else count
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    return f"{count} row(s) (indices {', '.join(str(i) for i in shown)}{more})"


@dataclass
class _Hits:
    """Rows where a check failed: the count and the first few indices, gathered batch by batch."""

    count: int = 0
    first: list[int] = field(default_factory=list)

    def add(self, mask: np.ndarray, offset: int) -> None:
        found = np.flatnonzero(mask)
        self.count += len(found)
        self.first.extend((found[: 5 - len(self.first)] + offset).tolist())

    def __str__(self) -> str:
        return describe_rows(self.first, self.count)


def _scan(dataset: Dataset, columns: list[str]) -> Iterable[tuple[int, pa.Table]]:
    """`(offset, batch)` over the rows of `dataset` (its indices mapping applied), as Arrow tables."""
    offset = 0
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=_SCAN_BATCH):
        yield offset, batch
        offset += batch.num_rows


def _is_messages_type(arrow_type: pa.DataType) -> bool:
    if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)):
        return False
    item = arrow_type.value_type
    return pa.types.is_struct(item) and {"role", "content"} <= {item.field(i).name for i in range(item.num_fields)}


def _text_kind(dataset: Dataset, column: str, split: str) -> str:
    arrow_type = dataset.data.schema.field(column).type
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "standard"
    if _is_messages_type(arrow_type):
        return "conversational"
    if pa.types.is_null(arrow_type):
        raise ValueError(f"Column '{column}' of the {split} dataset is missing in every row. Fill or drop them.")
    raise ValueError(
        f"Column '{column}' of the {split} dataset holds {arrow_type}, not text. Use strings, or lists of "
        "{'role': ..., 'content': ...} messages (conversational format)."
    )


def _empty_text(column: pa.ChunkedArray, conversational: bool) -> np.ndarray:
    """True where a text cell is empty: `""`, no message, or messages that all have empty content."""
    column = column.combine_chunks()
    if not conversational:
        return pc.fill_null(pc.equal(pc.utf8_length(column), 0), False).to_numpy(zero_copy_only=False)
    contents = pc.struct_field(pc.list_flatten(column), "content")
    filled = pc.fill_null(pc.greater(pc.utf8_length(contents), 0), False).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    filled_messages = np.bincount(parents, weights=filled, minlength=len(column))
    return filled_messages == 0


def _check_text_columns(dataset: Dataset, columns: tuple[str, ...], nonempty: tuple[str, ...], split: str) -> bool:
    """Every text column is all strings or all message lists, the same across columns, never missing; the
    `nonempty` ones never empty. Returns whether the split is conversational."""
    kinds = {column: _text_kind(dataset, column, split) for column in columns}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"'{c}' is {k}" for c, k in kinds.items())
        raise ValueError(
            f"The {split} dataset mixes formats across columns ({described}). Use strings everywhere, or message "
            "lists everywhere, e.g. completion=[{'role': 'assistant', 'content': '...'}]."
        )
    conversational = next(iter(kinds.values())) == "conversational"
    missing = {column: _Hits() for column in columns}
    empty = {column: _Hits() for column in nonempty}
    for offset, batch in _scan(dataset, list(columns)):
        for column in columns:
            values = batch.column(column)
            if values.null_count:
                missing[column].add(values.is_null().to_numpy(zero_copy_only=False), offset)
            if column in empty:
                empty[column].add(_empty_text(values, conversational), offset)
    for column, hits in missing.items():
        if hits.count:
            raise ValueError(f"Column '{column}' of the {split} dataset is missing in {hits}. Fill or drop them.")
    for column, hits in empty.items():
        if hits.count:
            raise ValueError(
                f"Column '{column}' of the {split} dataset is empty in {hits}: an empty completion has no token to "
                f"score. Remove those rows (e.g. `dataset.filter(lambda x: len(x['{column}']) > 0)`)."
            )
    return conversational


def _check_real_column(dataset: Dataset, column: str, split: str, fix: str) -> None:
    """A column of one finite real number (or bool) per row."""
    arrow_type = dataset.data.schema.field(column).type
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        raise ValueError(
            f"Column '{column}' of the {split} dataset holds text, not real numbers. Cast it to float (e.g. "
            f"`dataset.cast_column('{column}', Value('float64'))`) after fixing the rows that do not parse."
        )
    if pa.types.is_null(arrow_type):
        raise ValueError(f"Column '{column}' of the {split} dataset has no value in any row. {fix}")
    if not (pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type)):
        kind = "lists" if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) else str(arrow_type)
        raise ValueError(
            f"Column '{column}' of the {split} dataset holds {kind}, not one real number per row. Give each row a "
            "single float reward (to combine several scores, add a column with their weighted sum)."
        )
    missing, not_finite = _Hits(), _Hits()
    for offset, batch in _scan(dataset, [column]):
        values = batch.column(column)
        if values.null_count:
            missing.add(values.is_null().to_numpy(zero_copy_only=False), offset)
        if pa.types.is_floating(arrow_type):
            finite = pc.fill_null(pc.is_finite(values), True).to_numpy(zero_copy_only=False)
            not_finite.add(~finite, offset)
    if missing.count:
        raise ValueError(f"Column '{column}' of the {split} dataset has no value in {missing}. {fix}")
    if not_finite.count:
        raise ValueError(f"Column '{column}' of the {split} dataset is NaN or infinite in {not_finite}. {fix}")


def _check_label_column(dataset: Dataset, split: str) -> None:
    arrow_type = dataset.data.schema.field("label").type
    if not pa.types.is_boolean(arrow_type):
        raise ValueError(
            f"Column 'label' of the {split} dataset must hold booleans (KTO format), but it holds {arrow_type}. For "
            "real-valued feedback, name the column 'reward' instead."
        )
    missing = _Hits()
    for offset, batch in _scan(dataset, ["label"]):
        if batch.column("label").null_count:
            missing.add(batch.column("label").is_null().to_numpy(zero_copy_only=False), offset)
    if missing.count:
        raise ValueError(f"Column 'label' of the {split} dataset has no value in {missing}. Fill or drop them.")


def _check_paired(dataset: Dataset, split: str) -> RowFormat:
    columns = set(dataset.column_names)
    if "completion" in columns:
        raise ValueError(
            f"The {split} dataset has 'chosen'/'rejected' and 'completion' columns; it is unclear which to train on. "
            "Remove 'completion' (paired format) or 'chosen'/'rejected' (unpaired format)."
        )
    present = [c for c in SCORE_COLUMNS if c in columns]
    if len(present) == 1:
        raise ValueError(
            f"The {split} dataset has '{present[0]}' but not its partner; add both score columns or neither."
        )
    for column in present:
        _check_real_column(dataset, column, split, "Give every pair finite scores or drop those rows.")
    text = ("prompt", *PAIRED_COLUMNS) if "prompt" in columns else PAIRED_COLUMNS
    conversational = _check_text_columns(dataset, text, PAIRED_COLUMNS, split)
    return RowFormat("paired", conversational, bool(present), _passthrough(columns))


def _passthrough(columns: set[str]) -> tuple[str, ...]:
    return tuple(c for c in PASSTHROUGH_COLUMNS if c in columns)


def check_rows(dataset: Dataset, split: str, trainer_columns: tuple[str, ...] = ()) -> RowFormat:
    """Validate a split before any model work and return its [`RowFormat`]; raise one `ValueError` naming the
    column, the rows (count and first indices, in the user's numbering) and the fix. Derived columns (the data
    preparation's and the calling trainer's `trainer_columns`) are reported as ignored."""
    if len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty.")
    columns = set(dataset.column_names)
    if "image" in columns or "images" in columns:
        raise ValueError(f"The {split} dataset has image columns; RPOTrainer supports text datasets only for now.")
    derived = sorted(columns & {*DERIVED_COLUMNS, *trainer_columns})
    if derived:
        logger.warning(
            f"The {split} dataset carries columns a trainer derived ({', '.join(derived)}). They are ignored and "
            "recomputed from the text with this trainer's tokenizer, reference and settings."
        )
    if set(PAIRED_COLUMNS) <= columns:
        return _check_paired(dataset, split)
    missing = [c for c in ("prompt", "completion") if c not in columns]
    if missing:
        raise ValueError(f"The {split} dataset is missing column(s) {missing}. {FORMATS_HELP}")
    if "reward" in columns and "label" in columns:
        raise ValueError(
            f"The {split} dataset has both a 'reward' and a 'label' column, so the reward is ambiguous. Remove one: "
            "`dataset.remove_columns('label')` to train on the real-valued reward."
        )
    if "reward" in columns:
        _check_real_column(dataset, "reward", split, "Give every row a finite reward or drop those rows.")
        layout = "reward"
    elif "label" in columns:
        _check_label_column(dataset, split)
        layout = "label"
    else:
        raise ValueError(f"The {split} dataset has no 'reward' or 'label' column. {FORMATS_HELP}")
    conversational = _check_text_columns(dataset, ("prompt", "completion"), ("completion",), split)
    return RowFormat(layout, conversational, passthrough=_passthrough(columns))


def reward_rows_batch(batch: dict[str, list], indices: list[int], row_format: RowFormat) -> dict[str, list]:
    """One batch of checked user rows → RPO rows: `prompt`, `completion`, `reward` (float), `source_row`, and the
    passthrough columns. A pair gives two consecutive rows, chosen then rejected."""
    n = len(indices)
    if row_format.layout != "paired":
        if row_format.layout == "label":
            rewards = [1.0 if label else 0.0 for label in batch["label"]]
        else:
            rewards = [float(r) for r in batch["reward"]]
        rows = {"prompt": batch["prompt"], "completion": batch["completion"], "reward": rewards}
        rows["source_row"] = list(indices)
        return rows | {c: batch[c] for c in row_format.passthrough}
    if "prompt" in batch:
        prompts = batch["prompt"]
    else:
        prompts, chosen, rejected = [], [], []
        for pair in zip(batch["chosen"], batch["rejected"], strict=True):
            split = extract_prompt({"chosen": pair[0], "rejected": pair[1]})
            prompts.append(split["prompt"])
            chosen.append(split["chosen"])
            rejected.append(split["rejected"])
        batch = {**batch, "chosen": chosen, "rejected": rejected}
    scores = (batch["score_chosen"], batch["score_rejected"]) if row_format.scored else ([1.0] * n, [0.0] * n)

    def twice(first: list, second: list) -> list:
        return [value for pair in zip(first, second, strict=True) for value in pair]

    rows = {
        "prompt": twice(prompts, prompts),
        "completion": twice(batch["chosen"], batch["rejected"]),
        "reward": [float(s) for s in twice(*scores)],
        "source_row": twice(indices, indices),
    }
    return rows | {c: twice(batch[c], batch[c]) for c in row_format.passthrough}


def to_reward_rows(dataset: Dataset, split: str, num_proc: int | None = None) -> Dataset:
    """Validate `dataset` ([`check_rows`]) and return it as `prompt`, `completion`, `reward` (float), `source_row`
    rows (plus `tools` / `chat_template_kwargs` when present); every other column is dropped."""
    row_format = check_rows(dataset, split)
    return dataset.map(
        reward_rows_batch,
        fn_kwargs={"row_format": row_format},
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Reading {split} rows",
    )


# ----------------------------------------------------------------------------------------------- tokenisation
def ids_key(*id_lists: list[int]) -> int:
    """A stable signed 64-bit key of token-id sequences (the group key of a tokenised prompt, or of a completion)."""
    h = hashlib.blake2b(digest_size=8)
    for ids in id_lists:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little", signed=True)


def _template_kwargs(rows: dict[str, list], i: int) -> dict:
    extra = dict(rows["chat_template_kwargs"][i] or {}) if "chat_template_kwargs" in rows else {}
    return {"tools": rows["tools"][i] if "tools" in rows else None, **extra}


def _encode_texts(processing_class, texts: list[str]) -> list[list[int]]:
    """`processing_class(text=texts)["input_ids"]`, each distinct text encoded once (rows of a prompt share it).

    With a fast tokenizer the Rust backend is called directly: the `transformers` wrapper builds a dict of lists per
    text, half of the tokenisation time on short rows. Its ids are checked against the wrapper's on the first text."""
    unique = list(dict.fromkeys(texts))
    backend = getattr(processing_class, "backend_tokenizer", None)
    encoded = None
    if backend is not None and unique:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encoded = [encoding.ids for encoding in encode(unique, add_special_tokens=True)]
        if encoded[0] != processing_class(text=unique[0])["input_ids"]:
            encoded = None
    if encoded is None:
        encoded = processing_class(text=unique)["input_ids"] if unique else []
    by_text = dict(zip(unique, encoded, strict=True))
    return [by_text[text] for text in texts]


def _tokenize_prompts(rows: dict[str, list], processing_class, conversational: bool) -> list[list[int]]:
    if not conversational:
        return _encode_texts(processing_class, rows["prompt"])
    return [
        _tokenize(processing_class, prompt, add_generation_prompt=True, **_template_kwargs(rows, i))["input_ids"]
        for i, prompt in enumerate(rows["prompt"])
    ]


def tokenize_batch(rows: dict[str, list], processing_class, is_encoder_decoder: bool) -> dict[str, list]:
    """Tokenise a batch of RPO rows like TRL's KTOTrainer, adding `prompt_ids`, `completion_ids` (token ids), the
    `group_key` (the tokenised prompt's key: rows of one prompt share it) and the `completion_key` (the key of the
    prompt and completion tokens: duplicates share it).

    Causal models: the completion starts where the tokenisations of the prompt and of prompt + completion diverge
    (chat templates, BPE merges across the boundary); standard completions get the EOS token appended. Encoder-
    decoder models: the prompt feeds the encoder, and the completion (message contents joined) plus EOS is the
    decoder's target.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    rows = dict(rows)
    conversational = bool(rows["prompt"]) and isinstance(rows["prompt"][0], list)
    prompt_ids = _tokenize_prompts(rows, processing_class, conversational)
    if is_encoder_decoder:
        texts = rows["completion"]
        if conversational:
            texts = ["".join(message["content"] for message in messages) for messages in texts]
        eos = tokenizer.eos_token_id
        completion_ids = [ids if ids and ids[-1] == eos else [*ids, eos] for ids in _encode_texts(tokenizer, texts)]
    else:
        if conversational:
            full_ids = [
                _tokenize(processing_class, p + c, **_template_kwargs(rows, i))["input_ids"]
                for i, (p, c) in enumerate(zip(rows["prompt"], rows["completion"], strict=True))
            ]
        else:
            eos = tokenizer.eos_token
            rows["completion"] = [c if c.endswith(eos) else c + eos for c in rows["completion"]]
            texts = [p + c for p, c in zip(rows["prompt"], rows["completion"], strict=True)]
            full_ids = _encode_texts(processing_class, texts)
        cut = [common_prefix_length(p, f) for p, f in zip(prompt_ids, full_ids, strict=True)]
        completion_ids = [f[k:] for f, k in zip(full_ids, cut, strict=True)]
        keys_of = prompt_ids  # the whole tokenised prompt, so a boundary merge cannot split a group
        prompt_ids = [f[:k] for f, k in zip(full_ids, cut, strict=True)]
        return rows | _with_keys(prompt_ids, completion_ids, keys_of)
    return rows | _with_keys(prompt_ids, completion_ids, prompt_ids)


def prepare_rows_batch(
    batch: dict[str, list], indices: list[int], row_format: RowFormat, processing_class, is_encoder_decoder: bool
) -> dict[str, list]:
    """[`reward_rows_batch`] then [`tokenize_batch`]: user rows to tokenised RPO rows in one `Dataset.map`."""
    return tokenize_batch(reward_rows_batch(batch, indices, row_format), processing_class, is_encoder_decoder)


def _with_keys(prompt_ids, completion_ids, group_ids) -> dict[str, list]:
    keys: dict[int, int] = {}  # rows of one prompt share one list of ids: key it once
    group_keys = [keys[id(g)] if id(g) in keys else keys.setdefault(id(g), ids_key(g)) for g in group_ids]
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "group_key": group_keys,
        "completion_key": [ids_key([k], c) for k, c in zip(group_keys, completion_ids, strict=True)],
    }


# --------------------------------------------------------------------------------------------- column access
def column_numpy(dataset: Dataset, column: str) -> np.ndarray:
    """A numeric column of `dataset` (indices mapping applied) as one NumPy array, read batch by batch."""
    parts = [batch.column(column).to_numpy() for _, batch in _scan(dataset, [column])]
    return np.concatenate(parts) if parts else np.zeros(0)


def list_lengths(dataset: Dataset, column: str) -> np.ndarray:
    """Length of every list in a list column (e.g. a token-id column), without reading the lists into Python."""
    parts = [pc.list_value_length(batch.column(column)).to_numpy() for _, batch in _scan(dataset, [column])]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def token_ids_digest(dataset: Dataset, columns: tuple[str, ...] = ("prompt_ids", "completion_ids")) -> str:
    """A digest of the token-id columns of every row: what a model reads, whatever text or template made them."""
    h = hashlib.blake2b(digest_size=16)
    for _, batch in _scan(dataset, list(columns)):
        for column in columns:
            values = batch.column(column).combine_chunks()
            h.update(pc.list_value_length(values).to_numpy().astype(np.int64).tobytes())
            h.update(pc.list_flatten(values).to_numpy().astype(np.int64).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ collation
@dataclass
class DataCollatorForRewardedCompletions(DataCollatorMixin):
    """
    Pads tokenised `(prompt, completion)` rows on the right and carries per-row values as tensors.

    Each example holds `prompt_ids` and `completion_ids` and, once the target pass ran, per-row values: `reward` and
    `group_key`, and the columns of the trainer's objective (RPO's `ref_logps`, `target`, `value`), which the trainer
    names in `value_columns` (column → dtype). For a causal model the output has `input_ids` (prompt + completion),
    `attention_mask` and `completion_mask` (1 on completion tokens), truncated to `max_length` before padding
    (keeping the start). For an encoder-decoder model (`is_encoder_decoder=True`) the prompt alone feeds the encoder
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
        for column, dtype in self.value_columns.items():
            if column in examples[0]:
                output[column] = torch.tensor([example[column] for example in examples], dtype=dtype)
        return output

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
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": (piece == 1).long()}

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


def _flat_lists(lists: pa.Array, max_length: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of an Arrow list column, each list cut at `max_length` as the collator cuts it."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    if max_length is not None and (lengths > max_length).any():
        keep = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths) < max_length
        values, lengths = values[keep], np.minimum(lengths, max_length)
    return values, lengths
