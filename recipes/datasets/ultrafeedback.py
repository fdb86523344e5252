"""openbmb/UltraFeedback → grouped rows: `dataset_transform: recipes/datasets/ultrafeedback.py:to_grouped`.

The card's schema: one row per prompt (`instruction`), a list of `completions` structs (`response`, `annotations`
with string ratings "1"-"5" — "N/A" allowed for honesty — per aspect, `fine-grained_score`: their mean over the rated
aspects, 1-5, and `overall_score`: GPT-4's critique score, 1-10). Out: `prompt`, `completions`, `rewards` (the
fine-grained score) and one list column per aspect rating (`helpfulness`, `honesty`, `instruction_following`,
`truthfulness`; an "N/A" rating takes the completion's fine-grained score), for `reward_columns`. Completions without
a response or a score are dropped and counted.
"""

import logging
import math

from datasets import Dataset


logger = logging.getLogger("trl_rpo")

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def _rating(annotation, fallback: float) -> float:
    annotation = annotation[0] if isinstance(annotation, list) else annotation  # older releases wrap it in a list
    rating = (annotation or {}).get("Rating")
    return float(rating) if rating not in (None, "N/A") else fallback


def _usable(completion: dict) -> bool:
    score = completion.get("fine-grained_score")
    return bool(completion.get("response")) and score is not None and math.isfinite(score)


def _group(batch: dict[str, list]) -> dict[str, list]:
    out = {"prompt": batch["instruction"], "completions": [], "rewards": [], **{a: [] for a in ASPECTS}}
    for completions in batch["completions"]:
        kept = [c for c in completions if _usable(c)]
        out["completions"].append([c["response"] for c in kept])
        out["rewards"].append([float(c["fine-grained_score"]) for c in kept])
        for aspect in ASPECTS:
            out[aspect].append([_rating(c["annotations"].get(aspect), c["fine-grained_score"]) for c in kept])
    return out


def to_grouped(dataset: Dataset) -> Dataset:
    total = sum(len(c) for c in dataset["completions"])
    grouped = dataset.map(_group, batched=True, remove_columns=dataset.column_names, desc="UltraFeedback → groups")
    dropped = total - sum(len(c) for c in grouped["completions"])
    if dropped:
        logger.warning(f"UltraFeedback: dropped {dropped} of {total} completions without a response or a score.")
    return grouped
