"""stanfordnlp/SHP → grouped rows: `dataset_transform: recipes/datasets/shp.py:to_grouped`.

The card's schema: one row per pair of Reddit comments under a post (`history`: title + body; `human_ref_A`,
`human_ref_B`: the comments; `score_A`, `score_B`: their net votes + 1; `score_ratio`: preferred / dispreferred
score, ≥ 1). Out: `prompt` (the post), `completions` (the two comments) and `rewards` (their scores, vote counts:
the recipe sets `reward_column_transforms: [log1p]`). As the card advises, only pairs with `score_ratio` ≥ 2 are
kept (the others are counted in a log line); the pairs of one post share its prompt, so RPO estimates V̂(x) over all
of the post's comments, each distinct comment once.
"""

import logging

from datasets import Dataset


logger = logging.getLogger("trl_rpo")

MIN_SCORE_RATIO = 2.0


def _group(batch: dict[str, list]) -> dict[str, list]:
    return {
        "prompt": batch["history"],
        "completions": [[a, b] for a, b in zip(batch["human_ref_A"], batch["human_ref_B"], strict=True)],
        "rewards": [[float(a), float(b)] for a, b in zip(batch["score_A"], batch["score_B"], strict=True)],
    }


def to_grouped(dataset: Dataset) -> Dataset:
    kept = dataset.filter(lambda ratio: ratio >= MIN_SCORE_RATIO, input_columns="score_ratio", desc="SHP ratio ≥ 2")
    if len(kept) < len(dataset):
        logger.warning(f"SHP: kept {len(kept)} of {len(dataset)} pairs with score_ratio ≥ {MIN_SCORE_RATIO}.")
    return kept.map(_group, batched=True, remove_columns=kept.column_names, desc="SHP → groups")
