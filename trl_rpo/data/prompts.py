"""The prompts a model samples from: extracted from a prompt-only dataset or from one in a trainer's format, checked,
and digested (so that a resumed run is known to sample the same prompts). Sampling (`generation.py`) reads them
here, and renders them with [`~trl_rpo.data.render_prompt_ids`], the renderer the trainers' tokenisation uses: what
makes the samples the reference's, for the Monte-Carlo partition."""

import hashlib
import json
import logging
from typing import Any

from datasets import Dataset
from trl.data_utils import extract_prompt

from .columns import describe_rows
from .formats import DERIVED_COLUMNS, GROUPED_COLUMNS, OBJECTIVE_COLUMNS, PAIRED_COLUMNS, SCORE_COLUMNS


logger = logging.getLogger(__name__)

# Columns that belong to one completion (or to a trainer's work on it), never to a prompt: not carried over when the
# prompts come from a dataset in one of the trainer's formats.
COMPLETION_COLUMNS = frozenset(
    {"completion", "reward", "label", "prompt_index", "sample_index", "finished", *GROUPED_COLUMNS, *PAIRED_COLUMNS}
    | {*SCORE_COLUMNS, *DERIVED_COLUMNS, *OBJECTIVE_COLUMNS}
)


def prompt_rows(dataset: Dataset) -> list[dict[str, Any]]:
    """
    The prompt rows [`generate_completions`] samples from, as Python dicts: every row of a prompt-only dataset, or
    the distinct prompts of a dataset in one of `RPOTrainer`'s formats (their columns that are the same on every row
    of the prompt, completion columns excluded). A paired dataset without `prompt` gets TRL's `extract_prompt`.
    """
    if len(dataset) == 0:
        raise ValueError("The dataset has no rows: there is no prompt to sample from.")
    columns = set(dataset.column_names)
    if "prompt" not in columns and not set(PAIRED_COLUMNS) <= columns:
        raise ValueError(
            f"The dataset has no 'prompt' column (columns: {sorted(columns)}). Rename the column holding the prompts "
            "to 'prompt' (`dataset.rename_column(...)`, or `--prompt_column` on the command line)."
        )
    rows = dataset.to_list()
    if "prompt" not in columns:  # DPO pairs with an implicit prompt: the common prefix of the two conversations
        rows = [{"prompt": extract_prompt(row)["prompt"], **row} for row in rows]
    _check_prompts(rows)
    has_completions = "completion" in columns or "completions" in columns or set(PAIRED_COLUMNS) <= columns
    return _distinct_prompts(rows) if has_completions else rows


def _check_prompts(rows: list[dict]) -> None:
    kinds = [isinstance(row["prompt"], list) for row in rows]
    if any(kinds) and not all(kinds):
        standard = [i for i, kind in enumerate(kinds) if not kind]
        raise ValueError(
            f"The 'prompt' column mixes conversational message lists and strings: {describe_rows(standard)} are "
            "strings. Use one format for every row."
        )
    empty = [i for i, row in enumerate(rows) if not row["prompt"]]
    if empty:
        raise ValueError(f"The 'prompt' column is empty or missing in {describe_rows(empty)}. Fill or drop them.")


def prompt_key(row: dict) -> str:
    """Rows with the same prompt and chat-template inputs are one prompt."""
    parts = [row["prompt"], row.get("tools"), row.get("chat_template_kwargs")]
    return json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)


def _distinct_prompts(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(prompt_key(row), []).append(row)
    candidates = [c for c in rows[0] if c not in COMPLETION_COLUMNS]
    kept = [c for c in candidates if all(all(r[c] == group[0][c] for r in group) for group in groups.values())]
    varying = sorted(set(candidates) - set(kept))
    if varying:
        logger.warning(
            f"Columns {varying} differ between rows of one prompt, so they describe completions, not prompts: they "
            "are not copied onto the generated rows."
        )
    return [{c: group[0][c] for c in kept} for group in groups.values()]


def prompts_digest(prompts: list[dict]) -> str:
    """A digest of the prompt rows, so a resumed run is known to sample the same prompts."""
    h = hashlib.blake2b(digest_size=16)
    for index, row in enumerate(prompts):
        try:
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        except TypeError as error:
            column = next(c for c, v in row.items() if not _json_serializable(v))
            raise ValueError(
                f"Column '{column}' of prompt row {index} holds {type(row[column]).__name__} values, which a JSONL "
                f"file cannot store. Drop it (`dataset.remove_columns('{column}')`) or convert it to text."
            ) from error
    return h.hexdigest()


def _json_serializable(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
