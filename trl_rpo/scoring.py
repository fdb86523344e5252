"""Score completions: the `reward` column RPO trains on, from reward functions and/or a reward model.

[`score_completions`] (the `trl-rpo score` command) is the second step of generate → score → train. Its reward
sources are those of TRL's `GRPOTrainer`: reward functions with the `reward_funcs` signature and sequence-
classification reward models, combined as a weighted sum. What differs, because scoring happens once, offline, on a
dataset:

- a row where any source gives `None` (or NaN) is dropped, and counted (GRPOTrainer instead leaves that function
  out of that row's sum): RPO trains only on rows with a reward;
- the reward functions' extra keyword arguments are the dataset's other columns, as lists, and `trainer_state` is a
  fresh [`~transformers.TrainerState`] (step 0); `completion_ids` is passed only when a tokenizer is given;
  `log_metric` values are averaged and logged at the end, `log_extra` is accepted and ignored;
- each source's scores are kept as a column, `reward_<name>`, next to the weighted sum, `reward`.
"""

import asyncio
import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from datasets import Dataset
from datasets.fingerprint import generate_random_fingerprint
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerState,
)
from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import get_callable_name, get_config_model_id, is_async_callable

from .data import column_numpy, describe_rows


logger = get_logger(__name__)

RewardFunc = Callable[..., list[float | None]]
# Keyword arguments of a reward function that are not dataset columns; a column with one of these names is not passed.
RESERVED_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def score_completions(
    dataset: Dataset,
    reward_funcs: RewardFunc | str | PreTrainedModel | Sequence[RewardFunc | str | PreTrainedModel] | None = None,
    reward_model: str | PreTrainedModel | None = None,
    reward_weights: Sequence[float] | None = None,
    *,
    batch_size: int = 32,
    processing_class: PreTrainedTokenizerBase | None = None,
    reward_processing_class: PreTrainedTokenizerBase | None = None,
    model_init_kwargs: dict | None = None,
) -> Dataset:
    r"""
    Add a `reward` column to `prompt`/`completion` rows, the weighted sum of one or more reward sources.

    Args:
        dataset ([`~datasets.Dataset`]):
            Rows with `prompt` and `completion` columns, standard (strings) or conversational (message lists), e.g.
            the output of [`generate_completions`]. Every other column is passed to the reward functions.
        reward_funcs (`Callable`, `str`, [`~transformers.PreTrainedModel`] or a list of them, *optional*):
            Reward sources, as `GRPOTrainer`'s `reward_funcs`:

            - a function called as `func(prompts=[...], completions=[...], trainer_state=..., log_extra=...,
              log_metric=..., **other_columns)` (each column a list over the batch; also `completion_ids` when
              `processing_class` is given), returning one float per completion, or `None` to drop the row. Prompts
              and completions are strings, or message lists for conversational rows. Async functions work too;
            - a string `"module:function"` or `"path/to/file.py:function"`, imported;
            - any other string (no `:`): a reward model id or folder, as `reward_model`;
            - a sequence-classification [`~transformers.PreTrainedModel`].
        reward_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            One more reward source, after `reward_funcs`: a sequence-classification reward model, or its id or folder
            (loaded with `AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)`). As in GRPOTrainer,
            it scores the text of prompt + completion: conversational rows are rendered with its tokenizer's chat
            template; standard rows too, as a user turn and an assistant turn, when its tokenizer has a chat template
            (reward models are trained on chat-formatted text), else the two strings are concatenated.
        reward_weights (sequence of `float`, *optional*):
            Weight of each source, in the order `reward_funcs` then `reward_model`; all 1 by default.
        batch_size (`int`, *optional*, defaults to `32`):
            Rows per reward-function call and per reward-model forward.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer of the policy: with it, reward functions get `completion_ids` (the completions' token ids,
            without special tokens), as GRPOTrainer passes them; without it, they do not.
        reward_processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer of the reward model; loaded from its id or folder by default.
        model_init_kwargs (`dict`, *optional*):
            Keyword arguments for loading the reward model, e.g. `{"dtype": "bfloat16", "revision": "main"}`.

    Returns:
        [`~datasets.Dataset`]: the rows that every source scored, with `reward_<name>` per source and `reward`.
        Dropped rows are counted in a warning that names the first few (their indices in `dataset`).

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from trl_rpo import score_completions
    >>> def exact_answer(completions, answer, **kwargs):
    ...     return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]
    >>> rows = Dataset.from_dict({"prompt": ["2 + 2 ="] * 2, "completion": [" 4", " 5"], "answer": ["4", "4"]})
    >>> score_completions(rows, exact_answer)["reward"]
    [1.0, 0.0]
    ```
    """
    state = PartialState()  # the device, and accelerate's logger needs it
    _check_columns(dataset)
    sources = _sources(reward_funcs, reward_model, reward_processing_class, model_init_kwargs or {}, state.device)
    weights = _weights(reward_weights, sources)
    if "reward" in dataset.column_names:
        logger.warning("The dataset already has a 'reward' column: it is replaced by the new scores.")
    metrics = _Metrics()
    scored = dataset.map(
        _score_batch,
        fn_kwargs={"sources": sources, "weights": weights, "processing_class": processing_class, "metrics": metrics},
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        desc="Scoring",
        new_fingerprint=generate_random_fingerprint(),  # reward code and models are not hashed: never reuse a cache
    )
    metrics.log()
    return _drop_unscored(scored, sources)


# ---------------------------------------------------------------------------------------------------- sources
@dataclass
class _Source:
    """One reward source: its column name and a function with the `reward_funcs` signature."""

    column: str
    func: RewardFunc


def _sources(reward_funcs, reward_model, reward_processing_class, model_init_kwargs, device) -> list[_Source]:
    if reward_funcs is None:
        reward_funcs = []
    elif isinstance(reward_funcs, (str, PreTrainedModel)) or callable(reward_funcs):
        reward_funcs = [reward_funcs]
    items = [*reward_funcs, *([reward_model] if reward_model is not None else [])]
    if not items:
        raise ValueError(
            "No reward source: pass `reward_funcs` (functions or 'module:function' specs), `reward_model`, or both."
        )
    funcs = []
    for item in items:
        if isinstance(item, str) and (":" in item or _is_dotted(item)) and not os.path.isdir(item):
            funcs.append(load_function(item))
        elif isinstance(item, (str, PreTrainedModel)):
            tokenizer = reward_processing_class if item is reward_model else None
            funcs.append(RewardModelFunction(item, tokenizer, model_init_kwargs, device))
        elif callable(item):
            funcs.append(item)
        else:
            raise TypeError(f"Reward source {item!r} is neither a function, a 'module:function' string nor a model.")
    names = [f.name if isinstance(f, RewardModelFunction) else get_callable_name(f) for f in funcs]
    return [_Source(f"reward_{name}", func) for name, func in zip(_unique(names), funcs, strict=True)]


def _unique(names: list[str]) -> list[str]:
    """Names made unique by a suffix (`f`, `f_2`, …), so two sources never share a column."""
    seen: dict[str, int] = defaultdict(int)
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def load_function(spec: str, what: str = "Reward function") -> Callable:
    """
    Import the function named by `spec`: `"module:function"` or `"module.function"` (an importable module, e.g. one
    of your package's; the dotted form is how `trl grpo` names reward functions) or `"path/to/file.py:function"` (a
    Python file, imported as a module). `what` names it in errors (the reward functions of `trl-rpo score`, the
    `dataset_transform` of `trl-rpo`).
    """
    location, _, name = spec.rpartition("." if _is_dotted(spec) else ":")
    if not location or not name.isidentifier():
        raise ValueError(
            f"{what} {spec!r} is not a 'module:function' spec. Give it as 'module:function' or 'module.function' (an "
            "importable module) or 'path/to/file.py:function'."
        )
    module = _import_file(location, spec, what) if location.endswith(".py") else _import_module(location, spec, what)
    func = getattr(module, name, None)
    if func is None or not callable(func):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        kind = "defines no" if func is None else "has a non-callable"
        raise ValueError(
            f"{what} {spec!r}: {location} {kind} {name!r}. Functions it defines: {defined}. Fix the name after the "
            "':'."
        )
    return func


def _is_dotted(spec: str) -> bool:
    """`package.module.function`, as `trl grpo` names reward functions (a model id has a `/`, a file a `.py`)."""
    return ":" not in spec and "." in spec.strip(".") and "/" not in spec and not spec.endswith(".py")


def _import_module(location: str, spec: str, what: str):
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"{what} {spec!r}: cannot import module {location!r} ({error}). Install it, add its folder to "
            f"PYTHONPATH, or give the file: '{location.replace('.', '/')}.py:{spec.rpartition(':')[2]}'."
        ) from error


def _import_file(location: str, spec: str, what: str):
    path = Path(location).resolve()
    if not path.is_file():
        raise ValueError(
            f"{what} {spec!r}: no file {location} (from {os.getcwd()}). Give it as 'module:function' or "
            "'path/to/file.py:function'."
        )
    name = f"trl_rpo_user_{path.stem}_{abs(hash(str(path)))}"
    if name not in sys.modules:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # registered before it runs, as `import` does (dataclasses, pickling need it)
        module_spec.loader.exec_module(module)
    return sys.modules[name]


class RewardModelFunction:
    """
    A sequence-classification reward model as a reward function: the model's first logit for each prompt + completion
    text, batched, as GRPOTrainer scores with a reward model.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`]):
            The model, or its id or folder (loaded with `num_labels=1`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Its tokenizer; loaded from the model's id or folder by default.
        model_init_kwargs (`dict`, *optional*):
            Keyword arguments of `from_pretrained` when `model` is a string.
        device (`torch.device` or `str`, *optional*):
            Where to run it; the current accelerate device by default.
    """

    def __init__(self, model, tokenizer=None, model_init_kwargs: dict | None = None, device=None):
        if isinstance(model, str):
            model = AutoModelForSequenceClassification.from_pretrained(
                model, num_labels=1, **(model_init_kwargs or {})
            )
        model_id = get_config_model_id(model.config)
        self.name = os.path.basename(os.path.normpath(model_id)) or "reward_model"
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_id)
        if self.tokenizer.pad_token_id is None:  # as GRPOTrainer: batches need a pad token, EOS serves
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model.config.get_text_config().pad_token_id = self.tokenizer.pad_token_id  # where the last token is found
        self.model = model.to(device or PartialState().device).eval()

    def texts(self, prompts: list, completions: list) -> list[str]:
        """The text the model reads for each row (see [`score_completions`])."""
        if is_conversational({"prompt": prompts[0]}):
            conversations = [p + c for p, c in zip(prompts, completions, strict=True)]
        elif self.tokenizer.chat_template is not None:
            conversations = [
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                for p, c in zip(prompts, completions, strict=True)
            ]
        else:
            return [p + c for p, c in zip(prompts, completions, strict=True)]
        return [apply_chat_template({"messages": messages}, self.tokenizer)["text"] for messages in conversations]

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        inputs = self.tokenizer(
            text=self.texts(prompts, completions),
            return_tensors="pt",
            padding=True,
            padding_side="right",
            add_special_tokens=False,  # the chat template has them already; GRPOTrainer does the same for raw text
        ).to(self.model.device)
        with torch.inference_mode():
            return self.model(**inputs).logits[:, 0].float().tolist()


def _weights(reward_weights: Sequence[float] | None, sources: list[_Source]) -> np.ndarray:
    if reward_weights is None:
        return np.ones(len(sources))
    if len(reward_weights) != len(sources):
        columns = [source.column for source in sources]
        raise ValueError(
            f"{len(reward_weights)} reward weight(s) for {len(sources)} reward source(s) ({columns}, in this order: "
            "reward functions, then the reward model). Give one weight per source."
        )
    return np.asarray(reward_weights, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------- scoring
def _check_columns(dataset: Dataset) -> None:
    missing = [c for c in ("prompt", "completion") if c not in dataset.column_names]
    if missing:
        hint = (
            " It has 'completions': one row per completion is needed, e.g. from `trl-rpo generate`."
            if "completions" in dataset.column_names
            else " Rename the columns (`dataset.rename_column`, or --prompt_column/--completion_column)."
        )
        raise ValueError(
            f"Scoring needs 'prompt' and 'completion' columns; the dataset lacks {missing} (columns: "
            f"{dataset.column_names}).{hint}"
        )


@dataclass
class _Metrics:
    """What reward functions report through `log_metric`, averaged and logged once scoring is done."""

    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def __call__(self, name: str, value: float) -> None:
        self.values[name].append(float(value))

    def log(self) -> None:
        for name, values in self.values.items():
            logger.info(f"{name}: {sum(values) / len(values):.6g} (mean over {len(values)} batches)")


def _score_batch(batch: dict[str, list], indices: list[int], sources, weights, processing_class, metrics) -> dict:
    prompts, completions = batch["prompt"], batch["completion"]
    kwargs = {c: v for c, v in batch.items() if c not in ("prompt", "completion", *RESERVED_KWARGS)}
    kwargs |= {"trainer_state": TrainerState(), "log_extra": _ignore, "log_metric": metrics}
    if processing_class is not None:
        kwargs["completion_ids"] = _completion_ids(processing_class, completions)
    columns = {}
    for source in sources:
        try:
            values = source.func(prompts=prompts, completions=completions, **kwargs)
            if is_async_callable(source.func):
                values = asyncio.run(values)
        except Exception as error:  # the user's code: say whose, and on which rows, then keep its traceback
            raise RuntimeError(
                f"The reward source '{source.column.removeprefix('reward_')}' raised {type(error).__name__}: {error} "
                f"while scoring {describe_rows(indices)}."
            ) from error
        columns[source.column] = _as_rewards(values, source, indices)
    scores = np.array([columns[source.column] for source in sources], dtype=np.float64)
    return {**columns, "reward": (weights @ scores).tolist()}  # NaN wherever one source has no reward


def _ignore(*args, **kwargs) -> None:
    """`log_extra`: GRPOTrainer adds the values to its completions table; here there is no table."""


def _completion_ids(processing_class, completions: list) -> list[list[int]]:
    if completions and isinstance(completions[0], list):
        completions = ["".join(message["content"] for message in messages) for messages in completions]
    return processing_class(text=completions, add_special_tokens=False)["input_ids"]


def _as_rewards(values, source: _Source, indices: list[int]) -> list[float]:
    """One float per row (NaN for `None`), or an error naming the source, the rows and the fix."""
    name = source.column.removeprefix("reward_")
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(
            f"Reward function {name!r} returned {type(values).__name__}, not a list. Return a list with one float "
            "(or None, to drop the row) per completion."
        )
    if len(values) != len(indices):
        raise ValueError(
            f"Reward function {name!r} returned {len(values)} rewards for {len(indices)} completions (rows "
            f"{indices[0]}-{indices[-1]}). Return one float (or None, to drop the row) per completion, in order."
        )
    rewards = [_as_float(value, name, row) for value, row in zip(values, indices, strict=True)]
    infinite = [row for row, reward in zip(indices, rewards, strict=True) if math.isinf(reward)]
    if infinite:
        raise ValueError(
            f"Reward function {name!r} returned an infinite reward for {describe_rows(infinite)}. Return a finite "
            "float, or None to drop the row."
        )
    return rewards


def _as_float(value, name: str, row: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (str, bytes)):
        raise ValueError(f"Reward function {name!r} returned text ({value!r}) for row {row}. Return a float.")
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Reward function {name!r} returned {type(value).__name__} for row {row}, not a real number. Return a "
            "float, or None to drop the row."
        ) from error


def _drop_unscored(scored: Dataset, sources: list[_Source]) -> Dataset:
    """The rows every source scored; the others are counted in a warning, per source."""
    missing = np.isnan(column_numpy(scored, "reward"))
    if not missing.any():
        return scored
    dropped = np.flatnonzero(missing)
    per_source = {s.column: int(np.isnan(column_numpy(scored, s.column)).sum()) for s in sources}
    if len(dropped) == len(scored):
        raise ValueError(f"Every row was dropped: a reward source gave None or NaN on each ({per_source}).")
    logger.warning(
        f"Dropped {describe_rows(dropped, len(dropped))} of {len(scored)}: a reward source gave None or NaN for them "
        f"(rows without a value, per source: {per_source}). RPO trains only on rows with a reward."
    )
    return scored.select(np.flatnonzero(~missing))


def describe_rewards(scored: Dataset) -> str:
    """What a user would rather see than read: the reward distribution of the scored rows, and how many prompts give
    RPO something to learn. A prompt whose completions all have one reward has no within-prompt contrast (only the
    partition's level moves it), and a prompt with a single completion has no group at all."""
    rewards = column_numpy(scored, "reward").astype(np.float64)
    if rewards.size == 0:
        return "No scored rows."
    names, quartiles = ("min", "25%", "median", "75%", "max"), np.quantile(rewards, [0, 0.25, 0.5, 0.75, 1])
    spread = " | ".join(f"{name} {q:.4g}" for name, q in zip(names, quartiles, strict=True))
    summary = f"mean {rewards.mean():.4g}, sd {rewards.std():.4g}, {np.unique(rewards).size} distinct"
    lines = [f"Rewards of {rewards.size} rows: {summary}; {spread}."]
    if "prompt" in scored.column_names:
        groups: dict[str, list[float]] = defaultdict(list)
        for prompt, reward in zip(scored["prompt"], rewards.tolist(), strict=True):
            groups[prompt if isinstance(prompt, str) else repr(prompt)].append(reward)
        single = sum(len(values) == 1 for values in groups.values())
        flat = sum(len(values) > 1 and max(values) - min(values) == 0 for values in groups.values())
        varied = len(groups) - single - flat
        lines.append(
            f"{len(groups)} prompts: {varied} with completions of different rewards, {flat} whose completions all "
            f"have one reward (no contrast for RPO to learn from), {single} with a single completion."
        )
    return "\n".join(lines)
