"""The dataset formats a TRL user has, validated and turned into `(prompt, completion, reward)` rows."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from trl.data_utils import extract_prompt

from .columns import _Hits, _scan


logger = logging.getLogger(__name__)

PAIRED_COLUMNS = ("chosen", "rejected")
SCORE_COLUMNS = ("score_chosen", "score_rejected")
# Per-row chat-template inputs that TRL's tokenisation understands; kept next to the RPO columns.
PASSTHROUGH_COLUMNS = ("tools", "chat_template_kwargs")
# A row's images (TRL's `image`: one, `images`: a list), for a vision-language model; kept next to the RPO columns.
IMAGE_COLUMNS = ("image", "images")
# Columns the data preparation and the target pass add (TRL's KTO ones included): recomputed, never read from the
# input. Each trainer adds the columns of its own objective (`check_rows(..., trainer_columns=...)`).
DERIVED_COLUMNS = (
    "source_row", "prompt_ids", "completion_ids", "group_key", "completion_key", "length", "KL_completion_ids",
    "ref_KL_logps",
)  # fmt: skip
# The per-row columns the objectives store (`objectives.py`: RPO's ℓ_ref, t, V̂; DRO's ℓ_ref and normalised reward).
OBJECTIVE_COLUMNS = ("ref_logps", "target", "value", "reward_z")
GROUPED_COLUMNS = ("completions", "rewards")
FORMATS_HELP = (
    "RPO accepts `prompt`/`completion`/`reward` (float), `prompt`/`completions`/`rewards` (lists: several scored "
    "completions per prompt), `prompt`/`completion`/`label` (bool, KTO format) or `prompt`/`chosen`/`rejected` with "
    "optional `score_chosen`/`score_rejected` (DPO format); `reward_columns` builds the reward from several columns."
)
# Per-column transforms of `reward_column_transforms`: "log1p" is sign(x)·log(1 + |x|), for counts such as votes.
REWARD_TRANSFORMS = ("identity", "log1p")


@dataclass(frozen=True)
class RewardSpec:
    """The reward built from several columns: r = Σ_k weight_k · transform_k(column_k), before the trainer's
    `reward_normalization`. With the grouped layout each column holds one list per prompt, aligned with
    `completions`."""

    columns: tuple[str, ...]
    weights: tuple[float, ...]
    transforms: tuple[str, ...]

    @classmethod
    def from_config(cls, args) -> "RewardSpec | None":
        """From `reward_columns`, `reward_column_weights` (default 1 each) and `reward_column_transforms` (default
        "identity"; one value applies to every column); `None` when `reward_columns` is unset."""
        if not args.reward_columns:
            return None
        columns = tuple(args.reward_columns)
        weights = (
            tuple(float(w) for w in args.reward_column_weights)
            if args.reward_column_weights
            else (1.0,) * len(columns)
        )
        transforms = tuple(args.reward_column_transforms or ("identity",))
        return cls(columns, weights, transforms * len(columns) if len(transforms) == 1 else transforms)

    def combine(self, columns: Sequence[Sequence[float]]) -> list[float]:
        total = np.zeros(len(columns[0]), dtype=np.float64)
        for values, weight, transform in zip(columns, self.weights, self.transforms, strict=True):
            values = np.asarray(values, dtype=np.float64)
            if transform == "log1p":
                values = np.sign(values) * np.log1p(np.abs(values))
            total += weight * values
        return total.tolist()


@dataclass(frozen=True)
class RowFormat:
    """What [`check_rows`] found: the layout, whether the text is conversational, and the columns to carry."""

    layout: str  # "reward", "grouped", "label" or "paired"
    conversational: bool
    scored: bool = False  # paired rows with `score_chosen` / `score_rejected`
    passthrough: tuple[str, ...] = ()
    reward_spec: RewardSpec | None = None  # the reward from several columns (`reward_columns`)


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
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
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


def _is_list_type(arrow_type: pa.DataType) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)


@dataclass
class _Positions:
    """(row, list position) pairs where a check failed: the count and the first few, gathered batch by batch."""

    count: int = 0
    first: list[tuple[int, int]] = field(default_factory=list)

    def add(self, mask: np.ndarray, rows: np.ndarray, positions: np.ndarray, offset: int) -> None:
        found = np.flatnonzero(mask)
        self.count += len(found)
        self.first.extend((int(rows[i]) + offset, int(positions[i])) for i in found[: 5 - len(self.first)])

    def __str__(self) -> str:
        shown = ", ".join(f"row {row} position {position}" for row, position in self.first)
        more = f" and {self.count - len(self.first)} more" if self.count > len(self.first) else ""
        return f"{self.count} item(s) ({shown}{more})"


def _flat_positions(values: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """The flattened items of a list column, each item's row in the batch and its position in its list."""
    flat = pc.list_flatten(values)
    rows = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(pc.list_value_length(values).fill_null(0).to_numpy())])[:-1]
    return flat, rows, np.arange(len(rows)) - starts[rows]


def _grouped_text_kind(dataset: Dataset, split: str) -> bool:
    """Whether `completions` holds message lists (conversational) or strings; anything else is an error."""
    arrow_type = dataset.data.schema.field("completions").type
    item = arrow_type.value_type if _is_list_type(arrow_type) else None
    if item is not None and (pa.types.is_string(item) or pa.types.is_large_string(item)):
        return False
    if item is not None and _is_messages_type(item):
        return True
    raise ValueError(
        f"Column 'completions' of the {split} dataset holds {arrow_type}, not one list of completions per prompt. "
        "Give each row a list of strings, or a list of message lists (conversational format)."
    )


def _check_grouped_completions(dataset: Dataset, split: str, conversational: bool) -> None:
    missing, empty_lists, missing_items, empty_items = _Hits(), _Hits(), _Positions(), _Positions()
    for offset, batch in _scan(dataset, ["completions"]):
        values = batch.column("completions").combine_chunks()
        missing.add(values.is_null().to_numpy(zero_copy_only=False), offset)
        lengths = pc.list_value_length(values).fill_null(1).to_numpy(zero_copy_only=False)
        empty_lists.add(lengths == 0, offset)
        flat, rows, positions = _flat_positions(values)
        missing_items.add(flat.is_null().to_numpy(zero_copy_only=False), rows, positions, offset)
        empty_items.add(_empty_text(flat, conversational) & flat.is_valid().to_numpy(zero_copy_only=False),
                        rows, positions, offset)  # fmt: skip
    if missing.count:
        raise ValueError(f"Column 'completions' of the {split} dataset is missing in {missing}. Fill or drop them.")
    if missing_items.count or empty_items.count:
        bad, what = (missing_items, "missing") if missing_items.count else (empty_items, "empty")
        raise ValueError(
            f"Column 'completions' of the {split} dataset has {what} completions in {bad} (an empty completion has "
            "no token to score). Remove them from their lists, together with their rewards."
        )
    if empty_lists.count:
        logger.warning(
            f"{empty_lists.count} prompt row(s) of the {split} dataset have no completion ({empty_lists}); they "
            "give no training row."
        )


def _check_reward_lists(dataset: Dataset, column: str, split: str) -> None:
    """One list of finite real numbers per row, as long as the row's `completions` list."""
    arrow_type = dataset.data.schema.field(column).type
    item = arrow_type.value_type if _is_list_type(arrow_type) else None
    if item is None or not (pa.types.is_floating(item) or pa.types.is_integer(item) or pa.types.is_boolean(item)):
        raise ValueError(
            f"Column '{column}' of the {split} dataset holds {arrow_type}, but with 'completions' (grouped format) "
            "each row needs one list of real numbers, one per completion."
        )
    missing, mismatched, bad_items = _Hits(), _Hits(), _Positions()
    for offset, batch in _scan(dataset, ["completions", column]):
        values = batch.column(column).combine_chunks()
        missing.add(values.is_null().to_numpy(zero_copy_only=False), offset)
        completions = pc.list_value_length(batch.column("completions").combine_chunks()).fill_null(0)
        lengths = pc.list_value_length(values).fill_null(0)
        mismatched.add(pc.not_equal(lengths, completions).to_numpy(zero_copy_only=False), offset)
        flat, rows, positions = _flat_positions(values)
        ok = pc.fill_null(pc.is_finite(flat), False) if pa.types.is_floating(item) else flat.is_valid()
        bad_items.add(~ok.to_numpy(zero_copy_only=False), rows, positions, offset)
    if missing.count:
        raise ValueError(f"Column '{column}' of the {split} dataset is missing in {missing}. Fill or drop them.")
    if mismatched.count:
        raise ValueError(
            f"Column '{column}' of the {split} dataset does not have one value per completion in {mismatched}. "
            f"Give each row as many '{column}' values as 'completions'."
        )
    if bad_items.count:
        raise ValueError(
            f"Column '{column}' of the {split} dataset is missing, NaN or infinite in {bad_items}. Give every "
            "completion a finite reward, or remove the completion and its reward from their lists."
        )


def _check_grouped(dataset: Dataset, split: str, spec: "RewardSpec | None") -> RowFormat:
    columns = set(dataset.column_names)
    if "completion" in columns:
        raise ValueError(
            f"The {split} dataset has both 'completion' and 'completions' columns; it is unclear which to train on. "
            "Remove 'completions' (one completion per row) or 'completion' (grouped format)."
        )
    if "prompt" not in columns:
        raise ValueError(f"The {split} dataset is missing column(s) ['prompt']. {FORMATS_HELP}")
    reward_lists = _reward_source(columns, spec, "rewards", split)
    conversational = _grouped_text_kind(dataset, split)
    if _check_text_columns(dataset, ("prompt",), (), split) != conversational:
        raise ValueError(
            f"The {split} dataset mixes formats: 'prompt' and 'completions' must both be strings or both be "
            "message lists (conversational format)."
        )
    _check_grouped_completions(dataset, split, conversational)
    for column in reward_lists:
        _check_reward_lists(dataset, column, split)
    return RowFormat("grouped", conversational, passthrough=_passthrough(columns), reward_spec=spec)


def _reward_source(columns: set[str], spec: "RewardSpec | None", default: str, split: str) -> tuple[str, ...]:
    """The columns the reward is read from: `spec.columns`, else the layout's own reward column."""
    if spec is None:
        if default not in columns:
            raise ValueError(f"The {split} dataset has no '{default}' column. {FORMATS_HELP}")
        return (default,)
    absent = [c for c in spec.columns if c not in columns]
    if absent:
        raise ValueError(
            f"`reward_columns` names {absent}, which the {split} dataset does not have (columns: "
            f"{sorted(columns)}). Fix `reward_columns`."
        )
    ambiguous = [c for c in (default, "label") if c in columns and c not in spec.columns]
    if ambiguous:
        raise ValueError(
            f"The {split} dataset has a '{ambiguous[0]}' column and `reward_columns={list(spec.columns)}` does not "
            f"include it, so the reward is ambiguous. Add it to `reward_columns` or remove the column."
        )
    return spec.columns


def _passthrough(columns: set[str]) -> tuple[str, ...]:
    return tuple(c for c in (*PASSTHROUGH_COLUMNS, *IMAGE_COLUMNS) if c in columns)


def check_rows(
    dataset: Dataset, split: str, trainer_columns: tuple[str, ...] = (), reward_spec: RewardSpec | None = None
) -> RowFormat:
    """Validate a split before any model work and return its [`RowFormat`]; raise one `ValueError` naming the
    column, the rows (count and first indices, in the user's numbering; for lists, the list position too) and the
    fix. Derived columns (the data preparation's and the calling trainer's `trainer_columns`) are reported as
    ignored. `reward_spec` builds the reward from several columns instead of `reward`/`rewards`."""
    if len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty.")
    columns = set(dataset.column_names)
    if set(IMAGE_COLUMNS) <= columns:
        raise ValueError(
            f"The {split} dataset has both 'image' and 'images' columns; a row's images must come from one. Put "
            "each row's images in one list column: `images`."
        )
    derived = sorted(columns & {*DERIVED_COLUMNS, *trainer_columns})
    if derived:
        logger.warning(
            f"The {split} dataset carries columns a trainer derived ({', '.join(derived)}). They are ignored and "
            "recomputed from the text with this trainer's tokenizer, reference and settings."
        )
    if set(PAIRED_COLUMNS) <= columns and "completions" in columns:
        raise ValueError(
            f"The {split} dataset has 'chosen'/'rejected' and 'completions' columns; it is unclear which to train on. "
            "Remove one format: `dataset.remove_columns(['chosen', 'rejected'])` (`remove_columns` on the command "
            "line) to train on every scored completion."
        )
    if set(PAIRED_COLUMNS) <= columns:
        if reward_spec is not None:
            raise ValueError(
                f"`reward_columns` applies to unpaired and grouped rows, but the {split} dataset is paired "
                "('chosen'/'rejected'). Give pairs `score_chosen`/`score_rejected`, or unset `reward_columns`."
            )
        return _check_paired(dataset, split)
    if "completions" in columns:
        return _check_grouped(dataset, split, reward_spec)
    missing = [c for c in ("prompt", "completion") if c not in columns]
    if missing:
        raise ValueError(f"The {split} dataset is missing column(s) {missing}. {FORMATS_HELP}")
    if reward_spec is not None:
        for column in _reward_source(columns, reward_spec, "reward", split):
            _check_real_column(dataset, column, split, "Give every row a finite value or drop those rows.")
        conversational = _check_text_columns(dataset, ("prompt", "completion"), ("completion",), split)
        return RowFormat("reward", conversational, passthrough=_passthrough(columns), reward_spec=reward_spec)
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
    if row_format.layout == "grouped":
        return _explode_groups(batch, indices, row_format)
    if row_format.layout != "paired":
        if row_format.reward_spec is not None:
            rewards = row_format.reward_spec.combine([batch[c] for c in row_format.reward_spec.columns])
        elif row_format.layout == "label":
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


def _explode_groups(batch: dict[str, list], indices: list[int], row_format: RowFormat) -> dict[str, list]:
    """Grouped rows → one row per completion, in list order; `source_row` is the prompt's row."""
    sizes = [len(completions) for completions in batch["completions"]]
    spec = row_format.reward_spec
    reward_lists = [[v for values in batch[c] for v in values] for c in (spec.columns if spec else ("rewards",))]
    rewards = spec.combine(reward_lists) if spec else [float(r) for r in reward_lists[0]]

    def repeat(values: list) -> list:
        return [value for value, size in zip(values, sizes, strict=True) for _ in range(size)]

    rows = {
        "prompt": repeat(batch["prompt"]),
        "completion": [c for completions in batch["completions"] for c in completions],
        "reward": rewards,
        "source_row": repeat(list(indices)),
    }
    return rows | {c: repeat(batch[c]) for c in row_format.passthrough}


def to_reward_rows(
    dataset: Dataset, split: str, num_proc: int | None = None, reward_spec: RewardSpec | None = None
) -> Dataset:
    """Validate `dataset` ([`check_rows`]) and return it as `prompt`, `completion`, `reward` (float), `source_row`
    rows (plus `tools` / `chat_template_kwargs` when present); every other column is dropped."""
    row_format = check_rows(dataset, split, reward_spec=reward_spec)
    return dataset.map(
        reward_rows_batch,
        fn_kwargs={"row_format": row_format},
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Reading {split} rows",
    )
