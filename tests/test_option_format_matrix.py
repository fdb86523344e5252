"""Every data format × every value of every RPO option: the trainer's stored targets equal a naive loop over the user's
rows (groups by prompt text, distinct completions by text, z-scores, sparse prompts, drops), row for row.

The data holds a duplicated completion and, in the unpaired formats, a prompt with a single completion, so that
deduplication, the sparse-prompt strategies and the estimators all change the numbers."""

import math
from collections import defaultdict

import pytest
import torch
from datasets import Dataset

from trl_rpo import RPOTrainer


PROMPTS = ["1 + 1 =", "2 + 2 =", "3 + 3 ="]
UNPAIRED = [  # (prompt index, completion, reward): prompt 0 repeats " 2"; prompt 2 has one completion
    (0, " 2", 1.0), (0, " 3", -0.5), (0, " 2", 0.6), (0, " 7", -2.0),
    (1, " 4", 2.0), (1, " 5", 0.0),
    (2, " 6", 0.3),
]  # fmt: skip
PAIRS = [(0, " 2", " 3", 4.0, 1.0), (0, " 7", " 3", 0.5, 2.5), (1, " 4", " 5", 3.0, -1.0), (2, " 6", " 9", 2.0, 1.5)]


def _messages(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def user_dataset(layout: str) -> tuple[Dataset, list[tuple[int, str, float, int]]]:
    """The dataset in `layout`, and the RPO rows it must become: (prompt index, completion, reward, source row)."""
    if layout.startswith("paired"):
        scored, rows = "scored" in layout, []
        for i, (p, chosen, rejected, score_chosen, score_rejected) in enumerate(PAIRS):
            rows += [
                (p, chosen, score_chosen if scored else 1.0, i),
                (p, rejected, score_rejected if scored else 0.0, i),
            ]
        data = {"chosen": [c for _, c, *_ in PAIRS], "rejected": [r for _, _, r, *_ in PAIRS]}
        if layout == "paired_implicit":  # conversations that share their user turn: the prompt is extracted
            data = {
                key: [_messages("user", PROMPTS[p[0]]) + _messages("assistant", text.strip()) for p, text in
                      zip(PAIRS, data[key], strict=True)]
                for key in data
            }  # fmt: skip
        else:
            data["prompt"] = [PROMPTS[p] for p, *_ in PAIRS]
        if "scored" in layout:
            data |= {"score_chosen": [s for *_, s, _ in PAIRS], "score_rejected": [s for *_, s in PAIRS]}
        return Dataset.from_dict(data), rows
    rows = [(p, c, r, i) for i, (p, c, r) in enumerate(UNPAIRED)]
    data = {"prompt": [PROMPTS[p] for p, _, _ in UNPAIRED], "completion": [c for _, c, _ in UNPAIRED]}
    if layout == "label":
        data["label"] = [r > 0 for _, _, r in UNPAIRED]
        rows = [(p, c, 1.0 if r > 0 else 0.0, i) for p, c, r, i in rows]
    else:
        data["reward"] = [r for _, _, r in UNPAIRED]
    if layout == "conversational":
        data["prompt"] = [_messages("user", p) for p in data["prompt"]]
        data["completion"] = [_messages("assistant", c.strip()) for c in data["completion"]]
    return Dataset.from_dict(data), rows


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _zscore(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (std if std > 1e-12 * max(abs(mean), 1.0) else 1.0) for v in values]


def naive_targets(rows, ref_logps, options) -> list[float | None]:
    """Targets by plain loops, from the user's rows and the stored reference log-probs; None for a dropped row."""
    tau, estimator = options["beta"], options["partition_estimator"]
    rewards = [r for _, _, r, _ in rows]
    groups = defaultdict(list)
    for j, (p, *_) in enumerate(rows):
        groups[p].append(j)
    if options["reward_normalization"] == "global":
        rewards = _zscore(rewards)
    elif options["reward_normalization"] == "per_prompt":
        for members in groups.values():
            for j, z in zip(members, _zscore([rewards[j] for j in members]), strict=True):
                rewards[j] = z
    global_value = tau * (_logsumexp([r / tau for r in rewards]) - math.log(len(rewards)))
    targets = [None] * len(rows)
    for members in groups.values():
        distinct = defaultdict(list)
        for j in members:
            distinct[rows[j][1]].append(j)
        mean_reward = {c: sum(rewards[j] for j in js) / len(js) for c, js in distinct.items()}
        if estimator == "empirical":
            terms = [sum(ref_logps[j] for j in js) / len(js) + mean_reward[c] / tau for c, js in distinct.items()]
            log_z, count = _logsumexp(terms), len(distinct)
        elif estimator == "monte_carlo":
            log_z = _logsumexp([rewards[j] / tau for j in members]) - math.log(len(members))
            count = len(members)
        else:
            log_z, count = 0.0, math.inf
        sparse = count < 2
        if sparse and options["sparse_prompt_strategy"] == "drop":
            continue
        for j in members:
            reward = mean_reward[rows[j][1]] if estimator == "empirical" else rewards[j]
            targets[j] = reward / tau - (global_value / tau if sparse else log_z)
    return targets


DEFAULTS = {
    "beta": 0.7,
    "partition_estimator": "empirical",
    "logps_aggregation": "mean",
    "reward_normalization": "global",
    "sparse_prompt_strategy": "global_baseline",
}
VARIANTS = [
    ("partition_estimator", "empirical"), ("partition_estimator", "monte_carlo"), ("partition_estimator", "none"),
    ("logps_aggregation", "sum"),
    ("reward_normalization", "none"), ("reward_normalization", "per_prompt"),
    ("sparse_prompt_strategy", "drop"),
]  # fmt: skip
LAYOUTS = ["reward", "conversational", "label", "paired", "paired_scored", "paired_implicit"]


@pytest.mark.parametrize(("option", "value"), VARIANTS, ids=[f"{o}={v}" for o, v in VARIANTS])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stored_targets_match_a_naive_loop(model_dir, make_args, layout, option, value):
    options = DEFAULTS | {option: value}
    dataset, rows = user_dataset(layout)
    trainer = RPOTrainer(model_dir, args=make_args(**options), train_dataset=dataset)
    data = trainer.train_dataset
    ref_by_source = defaultdict(list)
    for source, ref in zip(data["source_row"], data["ref_logps"], strict=True):
        ref_by_source[source].append(ref)
    # Rows keep the user's order (a pair: chosen then rejected), so the stored ref log-probs line up with `rows`;
    # a dropped row's reference is not stored, and the naive loop does not need it.
    expected = naive_targets(rows, _aligned_ref(rows, data), options)
    kept = [(row, t) for row, t in zip(rows, expected, strict=True) if t is not None]
    assert list(data["source_row"]) == [row[3] for row, _ in kept]  # no row lost, none added, user numbering
    assert list(data["reward"]) == pytest.approx([row[2] for row, _ in kept], abs=0)  # raw rewards kept
    torch.testing.assert_close(
        torch.tensor(list(data["target"]), dtype=torch.float64),
        torch.tensor([t for _, t in kept], dtype=torch.float64),
        rtol=0,
        atol=1e-9,
    )
    if option == "logps_aggregation":  # summed log-probs are the mean ones times the completion's token count
        mean = RPOTrainer(model_dir, args=make_args(**DEFAULTS), train_dataset=dataset).train_dataset
        counts = [len(ids) for ids in data["completion_ids"]]
        expected_sum = [m * n for m, n in zip(mean["ref_logps"], counts, strict=True)]
        assert list(data["ref_logps"]) == pytest.approx(expected_sum, rel=1e-9)


def _aligned_ref(rows, data) -> list[float]:
    """Stored ref log-probs per naive row: kept rows in order; NaN stands in for rows the trainer dropped."""
    stored = iter(zip(data["source_row"], data["completion"], data["ref_logps"], strict=True))
    aligned, pending = [], next(stored, None)
    for _, completion, _, source in rows:
        if pending is not None and pending[0] == source and _same_text(pending[1], completion):
            aligned.append(pending[2])
            pending = next(stored, None)
        else:
            aligned.append(math.nan)
    return aligned


def _same_text(stored, completion: str) -> bool:
    text = stored if isinstance(stored, str) else "".join(m["content"] for m in stored)
    return text.strip().removesuffix("<|im_end|>").strip() == completion.strip()
