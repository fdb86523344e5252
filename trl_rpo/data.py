"""Turn the dataset formats a TRL user has into RPO rows, `(prompt, completion, reward)`, refusing bad input early.

Accepted formats (standard strings or conversational message lists, extra columns ignored):

- `prompt, completion, reward`: a real-valued reward per row (a bool `reward` column counts as 1.0 / 0.0);
- `prompt, completion, label`: KTO's unpaired format, `label` True → reward 1.0, False → 0.0;
- `prompt?, chosen, rejected`: DPO's paired format, two rows per pair, rewards from `score_chosen` /
  `score_rejected` when both are present, else 1.0 / 0.0; without `prompt`, the common prefix of the two
  conversations is the prompt (TRL's `extract_prompt`).

Every problem raises one `ValueError` naming the column, the rows and the fix, before any model work.
"""

import math
from collections.abc import Sequence

from datasets import Dataset
from trl.data_utils import extract_prompt


PAIRED_COLUMNS = ("chosen", "rejected")
SCORE_COLUMNS = ("score_chosen", "score_rejected")
# Per-row chat-template inputs that TRL's tokenisation understands; kept next to the RPO columns.
PASSTHROUGH_COLUMNS = ("tools", "chat_template_kwargs")
FORMATS_HELP = (
    "RPO accepts `prompt`/`completion`/`reward` (float), `prompt`/`completion`/`label` (bool, KTO format) or "
    "`prompt`/`chosen`/`rejected` with optional `score_chosen`/`score_rejected` (DPO format)."
)


def _rows(indices: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return f"{len(indices)} row(s) (indices {shown}{more})"


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _is_empty(value) -> bool:
    if isinstance(value, str):
        return value == ""
    return not value or all(not m.get("content") for m in value)


def _check_real(values: list, column: str, split: str, fix: str) -> list[float]:
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise ValueError(f"Column '{column}' of the {split} dataset has no value in {_rows(missing)}. {fix}")
    if any(isinstance(v, str) for v in values):
        bad = [i for i, v in enumerate(values) if isinstance(v, str)]
        raise ValueError(
            f"Column '{column}' of the {split} dataset holds text, not real numbers, in {_rows(bad)}. Cast it to "
            f"float (e.g. `dataset.cast_column('{column}', Value('float64'))`) after fixing those rows."
        )
    values = [float(v) for v in values]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"Column '{column}' of the {split} dataset is NaN or infinite in {_rows(bad)}. {fix}")
    return values


def _check_text_columns(dataset: Dataset, columns: Sequence[str], split: str) -> None:
    """Every text column must be all strings or all message lists, matching each other, with no missing value."""
    kinds = {}
    for column in columns:
        values = list(dataset[column])
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise ValueError(
                f"Column '{column}' of the {split} dataset is missing in {_rows(missing)}. Fill or drop them."
            )
        is_conv = [_is_messages(v) for v in values]
        if any(is_conv) and not all(is_conv):
            odd = [i for i, c in enumerate(is_conv) if c != is_conv[0]]
            raise ValueError(
                f"Column '{column}' of the {split} dataset mixes plain strings and message lists: {_rows(odd)} differ "
                "from row 0. Use one format (standard strings or conversational messages) for the whole dataset."
            )
        kinds[column] = "conversational" if is_conv[0] else "standard"
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"'{c}' is {k}" for c, k in kinds.items())
        raise ValueError(
            f"The {split} dataset mixes formats across columns ({described}). Use strings everywhere, or message "
            "lists everywhere, e.g. completion=[{'role': 'assistant', 'content': '...'}]."
        )


def _check_not_empty(dataset: Dataset, columns: Sequence[str], split: str) -> None:
    for column in columns:
        empty = [i for i, v in enumerate(dataset[column]) if _is_empty(v)]
        if empty:
            raise ValueError(
                f"Column '{column}' of the {split} dataset is empty in {_rows(empty)}: an empty completion has no "
                "token to score. Remove those rows (e.g. `dataset.filter(lambda x: len(x['completion']) > 0)`)."
            )


def _label_rewards(dataset: Dataset, split: str) -> list[float]:
    labels = list(dataset["label"])
    bad = [i for i, v in enumerate(labels) if not isinstance(v, bool)]
    if bad:
        raise ValueError(
            f"Column 'label' of the {split} dataset must hold booleans (KTO format), but {_rows(bad)} do not. For "
            "real-valued feedback, name the column 'reward' instead."
        )
    return [1.0 if v else 0.0 for v in labels]


def _unpaired_rewards(dataset: Dataset, split: str) -> list[float]:
    columns = set(dataset.column_names)
    if "reward" in columns and "label" in columns:
        raise ValueError(
            f"The {split} dataset has both a 'reward' and a 'label' column, so the reward is ambiguous. Remove one: "
            "`dataset.remove_columns('label')` to train on the real-valued reward."
        )
    if "reward" in columns:
        return _check_real(
            list(dataset["reward"]), "reward", split, "Give every row a finite reward or drop those rows."
        )
    if "label" in columns:
        return _label_rewards(dataset, split)
    raise ValueError(f"The {split} dataset has no 'reward' or 'label' column. {FORMATS_HELP}")


def _paired_to_rows(dataset: Dataset, split: str) -> Dataset:
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
    n = len(dataset)
    fix = "Give every pair finite scores or drop those rows."
    chosen = _check_real(list(dataset["score_chosen"]), "score_chosen", split, fix) if present else [1.0] * n
    rejected = _check_real(list(dataset["score_rejected"]), "score_rejected", split, fix) if present else [0.0] * n
    if "prompt" not in columns:
        dataset = dataset.map(extract_prompt, desc=f"Extracting prompt from {split} dataset")
    _check_text_columns(dataset, ("prompt", *PAIRED_COLUMNS), split)
    _check_not_empty(dataset, PAIRED_COLUMNS, split)
    rows = {
        "prompt": list(dataset["prompt"]) * 2,
        "completion": list(dataset["chosen"]) + list(dataset["rejected"]),
        "reward": chosen + rejected,
    }
    for column in PASSTHROUGH_COLUMNS:
        if column in columns:
            rows[column] = list(dataset[column]) * 2
    return Dataset.from_dict(rows)


def to_reward_rows(dataset: Dataset, split: str) -> Dataset:
    """Validate `dataset` and return it as `prompt`, `completion`, `reward` (float) rows.

    Paired rows become two rows (all chosen rows first, then all rejected rows); the other formats keep their order
    and row count, so row indices in later messages refer to the user's rows.
    """
    if len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty.")
    columns = set(dataset.column_names)
    if "image" in columns or "images" in columns:
        raise ValueError(f"The {split} dataset has image columns; RPOTrainer supports text datasets only for now.")
    if set(PAIRED_COLUMNS) <= columns:
        return _paired_to_rows(dataset, split)
    missing = [c for c in ("prompt", "completion") if c not in columns]
    if missing:
        raise ValueError(f"The {split} dataset is missing column(s) {missing}. {FORMATS_HELP}")
    rewards = _unpaired_rewards(dataset, split)
    _check_text_columns(dataset, ("prompt", "completion"), split)
    _check_not_empty(dataset, ("completion",), split)
    keep = ["prompt", "completion", *(c for c in PASSTHROUGH_COLUMNS if c in columns)]
    dataset = dataset.select_columns(keep)
    return dataset.add_column("reward", rewards)
