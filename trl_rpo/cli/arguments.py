"""The argument groups the commands share, each declared once and composed per command, as TRL's CLI composes its
dataclasses: the training data (`RPOScriptArguments`, with `trl kto`'s `ScriptArguments`), an input dataset
(`DatasetArguments`), the sampling settings (`SamplingArguments`, with GRPOConfig's names), the reward sources
(`RewardSourceArguments`); and the dataset loading they all use."""

import os
from dataclasses import dataclass, field

from accelerate.logging import get_logger
from datasets import Dataset, DatasetDict, load_dataset
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, get_dataset

from ..rpo_config import RPOConfig
from ..scoring import load_function


logger = get_logger(__name__)

# `load_dataset` builders for a single local file given as `--dataset_name`.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class RPOScriptArguments(ScriptArguments):
    """
    [`~trl.ScriptArguments`] plus the names of the dataset columns RPO reads.

    `dataset_name` may also be a local folder of data files or a single `.json`/`.jsonl`/`.csv`/`.parquet`/`.arrow`
    file (loaded as the `dataset_train_split` split). Streaming (`dataset_streaming`) is refused: RPO computes V̂(x)
    from every completion of a prompt before training, so it needs a map-style dataset.

    Parameters:
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Dataset column holding the prompt. When it differs from `"prompt"`, it is renamed to `prompt` in every
            split before training.
        completion_column (`str`, *optional*, defaults to `"completion"`):
            Dataset column holding the completion, renamed to `completion` when different.
        reward_column (`str`, *optional*, defaults to `"reward"`):
            Dataset column holding the scalar reward, renamed to `reward` when different.
        completions_column (`str`, *optional*, defaults to `"completions"`):
            Grouped format: column holding each prompt's list of completions, renamed to `completions`.
        rewards_column (`str`, *optional*, defaults to `"rewards"`):
            Grouped format: column holding each prompt's list of rewards, renamed to `rewards`.
        remove_columns (`list[str]`, *optional*):
            Columns dropped from every split before training, e.g. the `chosen`/`rejected` pair that a dataset of
            scored samples also carries, which would make its format ambiguous.
        dataset_transform (`str`, *optional*):
            A function `Dataset -> Dataset` applied to every split first, as `module:function` or
            `path/to/file.py:function`: for public data in its own shape (e.g. `recipes/datasets/shp.py:to_grouped`).
    """

    prompt_column: str = field(
        default="prompt",
        metadata={
            "help": "Dataset column holding the prompt; renamed to `prompt` before training when different (e.g. "
            "`instruction` for bilalfaye/ultrafeedback-rpo-split)."
        },
    )
    completion_column: str = field(
        default="completion",
        metadata={
            "help": "Dataset column holding the completion; renamed to `completion` before training when different "
            "(e.g. `response`)."
        },
    )
    reward_column: str = field(
        default="reward",
        metadata={
            "help": "Dataset column holding the scalar reward; renamed to `reward` before training when different."
        },
    )
    completions_column: str = field(
        default="completions",
        metadata={"help": "Grouped format: the column of completion lists; renamed to `completions` when different."},
    )
    rewards_column: str = field(
        default="rewards",
        metadata={"help": "Grouped format: the column of reward lists; renamed to `rewards` when different."},
    )
    remove_columns: list[str] | None = field(
        default=None,
        metadata={"help": "Columns dropped from every split before training (after `dataset_transform`)."},
    )
    dataset_transform: str | None = field(
        default=None,
        metadata={
            "help": "A function Dataset -> Dataset applied to every split first: `module:function` or "
            "`path/to/file.py:function`."
        },
    )


@dataclass
class DatasetArguments:
    """An input dataset (prompts, or prompt/completion rows), loaded as the training command loads its data."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A local .json/.jsonl/.csv/.parquet file, a folder of data files, or a Hub dataset id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub datasets)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to read (a single file is 'train')."})
    prompt_column: str = field(
        default="prompt", metadata={"help": "Column holding the prompts; renamed to `prompt` when different."}
    )

    def load(self, name: str | None = None, split: str | None = None, **columns: str) -> Dataset:
        """The split (`dataset_train_split`, or `split`) of `dataset_name` (or `name`), the prompt column (and the
        `columns` given) renamed to RPO's names."""
        split = split or self.dataset_train_split
        script_args = RPOScriptArguments(
            dataset_name=name or self.dataset_name,
            dataset_config=self.dataset_config,
            dataset_train_split=split,
            prompt_column=self.prompt_column,
            **columns,
        )
        return split_of(load_rpo_dataset(script_args, DatasetMixtureConfig()), split, "dataset_train_split")


@dataclass
class OutputArguments:
    """Where a command that is not training writes (training's `output_dir` is `RPOConfig`'s)."""

    output_dir: str | None = field(default=None, metadata={"help": "Folder for the output files (required)."})


@dataclass
class SamplingArguments:
    """
    How completions are sampled (`trl-rpo generate`, and each round of `trl-rpo iterate`), with GRPOConfig's names;
    the names of earlier releases (`--max_new_tokens`, `--batch_size`) stay as aliases. RPO's Monte-Carlo
    partition estimator is consistent only on samples at temperature 1 with no top-p/top-k truncation; other
    settings are warned about, and call for the empirical estimator.
    """

    num_generations: int = field(default=4, metadata={"help": "Completions sampled per prompt."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; keep 1 for partition_estimator='monte_carlo'."}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling mass; keep 1 for the Monte-Carlo estimator."}
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "Keep the k most likely tokens; unset (no top-k) for the Monte-Carlo estimator."},
    )
    max_completion_length: int = field(
        default=256, metadata={"help": "Longest completion, in tokens.", "aliases": ["--max_new_tokens"]}
    )
    generation_batch_size: int = field(
        default=8, metadata={"help": "Prompts per generate call, per process.", "aliases": ["--batch_size"]}
    )

    def sampling_kwargs(self) -> dict:
        """These settings as [`~trl_rpo.generate_completions`] takes them."""
        return {
            "num_generations": self.num_generations,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_completion_length,
            "batch_size": self.generation_batch_size,
        }


@dataclass
class RewardSourceArguments:
    """Where the reward comes from (`trl-rpo score`, and each round of `trl-rpo iterate`): reward functions and/or a
    reward model, weighted."""

    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Reward functions, each 'module:function', 'module.function' or 'file.py:function'."},
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Sequence-classification reward model (id or folder), scored after the functions."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per source (functions, then the model); all 1 by default."}
    )


def require(args, *names: str) -> None:
    """One error naming every required option left unset."""
    missing = [f"--{name}" for name in names if not getattr(args, name)]
    if missing:
        raise ValueError(f"Missing required argument(s): {', '.join(missing)}.")


def _refuse_streaming(script_args: RPOScriptArguments, dataset_args: DatasetMixtureConfig) -> None:
    option = "dataset_streaming" if script_args.dataset_streaming else "streaming" if dataset_args.streaming else None
    if option is not None:
        raise ValueError(
            f"`{option}` is not supported by RPO: V̂(x) is estimated from every completion of a prompt "
            "before training, so RPO needs a map-style dataset. Remove the option; `datasets` memory-maps a "
            "map-style dataset from disk, so a large dataset does not need to fit in memory."
        )


def load_rpo_dataset(script_args: RPOScriptArguments, dataset_args: DatasetMixtureConfig) -> DatasetDict:
    """
    Load the dataset as `trl kto` does (a `datasets` mixture wins over `dataset_name`), also accepting a single local
    data file as `dataset_name`, then rename the configured columns to `prompt` / `completion` / `reward`.
    """
    _refuse_streaming(script_args, dataset_args)
    name = script_args.dataset_name
    if dataset_args.datasets:
        if name:
            logger.warning(
                "Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to load the "
                "dataset and `dataset_name` will be ignored."
            )
        dataset = get_dataset(dataset_args)
    elif name and os.path.isfile(name):
        suffix = os.path.splitext(name)[1].lower()
        if suffix not in FILE_BUILDERS:
            raise ValueError(
                f"Cannot load the local file {name!r}: expected one of {sorted(FILE_BUILDERS)}. Convert it, or pass "
                "its folder (or a Hub dataset id) as `dataset_name`."
            )
        dataset = load_dataset(FILE_BUILDERS[suffix], data_files={script_args.dataset_train_split: name})
    elif name and _is_local_path(name) and not os.path.exists(name):
        raise FileNotFoundError(
            f"`dataset_name` {name!r}: no such file or folder (looked in {os.getcwd()}). Fix the path; a Hub dataset "
            "is named 'owner/name', without a file suffix."
        )
    elif name:
        dataset = load_dataset(name, name=script_args.dataset_config)
    else:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")
    if script_args.dataset_transform:
        transform = load_function(script_args.dataset_transform, "`dataset_transform`")
        dataset = DatasetDict({split: transform(rows) for split, rows in dataset.items()})
    if script_args.remove_columns:
        dataset = dataset.remove_columns(script_args.remove_columns)
    return rename_rpo_columns(dataset, script_args)


def _is_local_path(name: str) -> bool:
    """A name that can only mean a file or folder: a data-file suffix, a leading `/`, `.` or `~`, or more than one
    `/` (a Hub id is `owner/name`)."""
    return (
        os.path.splitext(name)[1].lower() in FILE_BUILDERS or name.startswith(("/", ".", "~")) or name.count("/") > 1
    )


def rename_rpo_columns(dataset: DatasetDict, script_args: RPOScriptArguments) -> DatasetDict:
    """Rename the `*_column` options' columns to RPO's names in every split."""
    mapping = {
        script_args.prompt_column: "prompt",
        script_args.completion_column: "completion",
        script_args.reward_column: "reward",
        script_args.completions_column: "completions",
        script_args.rewards_column: "rewards",
    }
    mapping = {source: target for source, target in mapping.items() if source != target}
    if not mapping:
        return dataset
    for split, columns in dataset.column_names.items():
        for source, target in mapping.items():
            option = f"{target}_column"
            if source not in columns:
                raise ValueError(
                    f"`{option}={source!r}` but the {split!r} split has no column {source!r} (columns: {columns}). "
                    f"Set `{option}` to the column that holds the {target}."
                )
            if target in columns:
                raise ValueError(
                    f"`{option}={source!r}` would rename {source!r} to {target!r}, but the {split!r} split already "
                    f"has a {target!r} column. Remove one of the two columns, or leave `{option}` at its default."
                )
    return dataset.rename_columns(mapping)


def split_of(dataset: DatasetDict, split: str, option: str) -> Dataset:
    if split not in dataset:
        raise ValueError(f"The dataset has no split {split!r} (splits: {list(dataset)}). Set `{option}`.")
    return dataset[split]


def set_model_init_kwargs(training_args: RPOConfig, model_args: ModelConfig) -> None:
    """`ModelConfig`'s loading options (revision, attention, dtype) into `training_args.model_init_kwargs`, which the
    trainer loads a model named by its path with; keys given there directly win."""
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
