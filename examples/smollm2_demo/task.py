"""The demo's task: one-digit additions a chat model answers, and the verifiable reward that scores each answer.

Reward of a completion, given the true sum (the "answer" is the last number in the text, the one a reader takes as
the conclusion of "3 + 4 = 7"):

| completion | reward |
|---|---|
| the correct number, alone or in a sentence (`7`, `3 + 4 = 7`, `The answer is 7.`) | 1.0 |
| a wrong number, within 10 of the answer | 0.25 · (1 − error / 10) |
| a number 10 or more off, or no number at all | 0.0 |

A near miss earns a little, which gives RPO rewards of several magnitudes to rank within each prompt's group of
sampled answers. [`addition_reward`] is the same score as a reward function with TRL GRPOTrainer's signature, which
`trl_rpo.score_completions` and `trl-rpo score --reward_funcs examples/smollm2_demo/task.py:addition_reward` call.
"""

import random
import re


QUESTION = "What is {a} + {b}?"
# One-digit operands: SmolLM2-135M answers about half of them right (greedy), depending on how it phrases the answer
# ("4 + 2 = 6" is nearly always right, a digression rarely), which RPO can learn. With two-digit operands it gets a
# third right and the groups held too few good answers to learn from.
OPERAND_RANGE = (0, 9)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
CLOSE_RANGE = 10  # a wrong number earns partial credit when it is closer than this to the answer
CLOSE_CREDIT = 0.25


def make_problems(count: int, seed: int, exclude: set[tuple[int, int]] = frozenset()) -> list[tuple[int, int]]:
    """`count` distinct (a, b) operand pairs, none of them in `exclude` (so train and eval prompts are disjoint)."""
    low, high = OPERAND_RANGE
    if count > (high - low + 1) ** 2 - len(exclude):
        raise ValueError(f"Only {(high - low + 1) ** 2 - len(exclude)} distinct problems are left, asked for {count}.")
    rng = random.Random(seed)
    problems: list[tuple[int, int]] = []
    seen = set(exclude)
    while len(problems) < count:
        pair = (rng.randint(low, high), rng.randint(low, high))
        if pair not in seen:
            seen.add(pair)
            problems.append(pair)
    return problems


def prompt_messages(a: int, b: int) -> list[dict[str, str]]:
    """The conversational prompt; the tokenizer's chat template adds the system turn and the assistant header."""
    return [{"role": "user", "content": QUESTION.format(a=a, b=b)}]


def parse_answer(text: str) -> float | None:
    """The last number in `text` (integers or decimals, optionally negative), or None when there is none."""
    numbers = NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def reward(completion: str, answer: int) -> float:
    """Score one completion against the true answer (table in the module docstring)."""
    guess = parse_answer(completion)
    if guess is None:
        return 0.0
    if guess == answer:
        return 1.0
    return CLOSE_CREDIT * max(0.0, 1.0 - abs(guess - answer) / CLOSE_RANGE)


def addition_reward(completions: list, answer: list[int], **kwargs) -> list[float | None]:
    """[`reward`] as a reward function with GRPOTrainer's signature, for `score_completions` / `trl-rpo score`.

    `completions` are strings, or conversational message lists whose last message is the answer; `answer` is the
    column of true sums (a prompt row's column, copied onto its samples by `generate_completions`). An empty
    completion (the model ended its turn at once) gets `None`: `RPOTrainer` refuses empty completions, and
    `score_completions` drops the rows without a reward. Other keyword arguments (`prompts`, `trainer_state`, …) are
    ignored.
    """
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [reward(text, a) if text else None for text, a in zip(texts, answer, strict=True)]
