"""The `trl-rpo` command: RPO training from the command line or a YAML recipe, the way `trl kto` trains KTO.

```bash
trl-rpo --config recipes/flan-t5-small/rpo/config_full.yaml
trl-rpo --config recipes/flan-t5-small/rpo/config_full.yaml --learning_rate 5e-5 --output_dir data/my-run
trl-rpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name path/to/rows.jsonl --output_dir qwen-rpo
trl-rpo --accelerate_config multi_gpu --num_processes 4 --config recipes/flan-t5-large/rpo/config_full.yaml
accelerate launch --config_file recipes/accelerate_configs/zero3.yaml -m trl_rpo.cli --config ...
```

The arguments are the fields of [`RPOScriptArguments`], [`RPOConfig`], [`~trl.ModelConfig`] and
[`~trl.DatasetMixtureConfig`]; `trl-rpo --help` lists them. YAML keys set the defaults, command-line flags override
them, and an unknown key or flag is an error. `python -m trl_rpo` and `python -m trl_rpo.cli` run the same command.
"""

import argparse
import contextlib
import gc
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.commands.launch import launch_command, launch_command_parser
from accelerate.logging import get_logger
from datasets import Dataset, DatasetDict, load_dataset
from trl import (
    DatasetMixtureConfig,
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_dataset,
    get_peft_config,
    get_quantization_config,
)
from trl.cli.accelerate_config import resolve_accelerate_config_argument
from trl.cli.commands.training import _subtract_subsequence

from .rpo_config import RPOConfig
from .rpo_trainer import RPOTrainer
from .scoring import load_function


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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`HfArgumentParser`'s defaults in the option help, and the subcommand list kept as written."""


SUBCOMMANDS_HELP = """subcommands (each with its own --help):
  trl-rpo generate   sample N completions per prompt from a model (batched, resumable, multi-process)
  trl-rpo score      add a reward column from reward functions and/or a reward model
  trl-rpo iterate    rounds of generate → score → train, each round's policy the next one's reference
  trl-rpo [options]  train (this command; the options below)

add --traceback to see where an error was raised"""


def make_parser(prog: str | None = None) -> TrlParser:
    """The `trl-rpo` parser, over `RPOScriptArguments`, `RPOConfig`, `ModelConfig` and `DatasetMixtureConfig`."""
    return TrlParser(
        (RPOScriptArguments, RPOConfig, ModelConfig, DatasetMixtureConfig),
        prog=prog or "trl-rpo",
        allow_abbrev=False,  # a misspelled flag is an error, never a prefix match of another one
        description="Train a model with Reward Partitioning Optimization (RPO, Faye et al., arXiv 2506.13702) on\n"
        "(prompt, completion, reward) rows. Pass a YAML recipe with --config; flags override its keys.\n\n"
        + SUBCOMMANDS_HELP,
        formatter_class=_HelpFormatter,
    )


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


def _split(dataset: DatasetDict, split: str, option: str) -> Dataset:
    if split not in dataset:
        raise ValueError(f"The dataset has no split {split!r} (splits: {list(dataset)}). Set `{option}`.")
    return dataset[split]


def _hub_dataset_id(script_args: RPOScriptArguments, dataset_args: DatasetMixtureConfig) -> str | None:
    """The Hub id of the training data for the model card, or `None` for local data or a mixture of several."""
    paths = [d.path for d in dataset_args.datasets] if dataset_args.datasets else [script_args.dataset_name]
    if len(paths) != 1 or paths[0] is None or os.path.exists(paths[0]):
        return None
    return paths[0]


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


def main(
    script_args: RPOScriptArguments,
    training_args: RPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
) -> None:
    """Train with RPO, save the model (and its model card) to `output_dir`, and push it to the Hub if asked."""
    set_model_init_kwargs(training_args, model_args)

    # Dataset
    dataset = load_rpo_dataset(script_args, dataset_args)
    train_dataset = _split(dataset, script_args.dataset_train_split, "dataset_train_split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = _split(dataset, script_args.dataset_test_split, "dataset_test_split")

    # Training
    trainer = RPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    accelerator = trainer.accelerator
    how = f" ({accelerator.distributed_type.value})" if accelerator.num_processes > 1 else ""
    accelerator.print(f"✅ Training completed on {accelerator.num_processes} process(es){how}.")

    # Save (with a model card: KTOTrainer writes one only with a checkpoint) and push to the Hub
    trainer.save_model(training_args.output_dir)
    hub_id = training_args.hub_model_id
    model_name = hub_id.split("/")[-1] if hub_id else os.path.basename(os.path.normpath(training_args.output_dir))
    dataset_id = _hub_dataset_id(script_args, dataset_args)
    trainer.create_model_card(model_name=model_name, dataset_name=dataset_id)
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_id)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    trainer.end()  # every rank exits by itself
    del trainer  # its model may hold the process group (ZeRO-3, FSDP2): let both go before interpreter shutdown
    gc.collect()


class _StderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment (a test's capture, a redirected stream), not the one at creation."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@contextlib.contextmanager
def package_messages_shown():
    """While a command runs, the package's info messages (what a resume skips and what is left: "2 of 5 prompts left
    to sample", "Round 1: finished, skipped") reach stderr at the default log level; other libraries keep theirs."""
    package, handler = logging.getLogger("trl_rpo"), _StderrHandler()
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


# The accelerate configs ship inside the package (also reachable as `recipes/accelerate_configs/` in a checkout).
ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate_configs"


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME|PATH` → `--config_file PATH`: an existing file, else `recipes/accelerate_configs/
    NAME.yaml` in the working directory (your own configs), else `NAME.yaml` among the configs shipped inside trl_rpo
    (so it works from an installed wheel), else one of the configs TRL ships under that name."""
    if "--accelerate_config" in launch_args:
        index = launch_args.index("--accelerate_config") + 1
        name = launch_args[index] if index < len(launch_args) else ""
        for folder in (Path.cwd() / "recipes" / "accelerate_configs", ACCELERATE_CONFIGS):
            candidate = folder / f"{name}.yaml"
            if name and not Path(name).is_file() and candidate.is_file():
                launch_args = [*launch_args[:index], str(candidate), *launch_args[index + 1 :]]
                break
    return resolve_accelerate_config_argument(launch_args)


def cli(args: list[str] | None = None) -> None:
    """Entry point of `trl-rpo`, `python -m trl_rpo` and `python -m trl_rpo.cli`: parse, then [`main`].

    With `--accelerate_config NAME|PATH`, the command relaunches itself through `accelerate launch`, like `trl kto`:
    the options that are not training options (`--num_processes 8`, `--main_process_port`, …) go to accelerate.
    `trl-rpo generate ...`, `trl-rpo score ...` and `trl-rpo iterate ...` run [`~trl_rpo.commands.generate_main`],
    [`~trl_rpo.commands.score_main`] and [`~trl_rpo.commands.iterate_main`] instead.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in ("generate", "score", "iterate"):
        from . import commands  # imported here: training needs neither sampling nor scoring

        subcommands = {"generate": commands.generate_main, "score": commands.score_main}
        subcommands["iterate"] = commands.iterate_main
        with package_messages_shown():
            subcommands[argv[0]](argv[1:])
        return
    parser = make_parser()
    if "--accelerate_config" not in argv:
        main(*parser.parse_args_and_config(argv))
        return
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config(config_remaining + cli_remaining)
    script_args = _subtract_subsequence(argv, cli_remaining)
    launch_command(launch_command_parser().parse_args([*launch_args, "--module", "trl_rpo.cli", *script_args]))


TRACEBACK_FLAG, TRACEBACK_ENV = "--traceback", "TRL_RPO_TRACEBACK"


def run() -> None:
    """The `trl-rpo` console command: [`cli`], with a user error (a missing option, a refused resume, a bad reward
    function spec, a damaged record, a path that does not exist: the package's `ValueError`s and
    `FileNotFoundError`s) printed as one line and exit status 2, as argparse does, instead of a traceback.
    `--traceback` (or `--log_level debug`) keeps the traceback; it reaches processes relaunched through accelerate
    via the `TRL_RPO_TRACEBACK` environment variable. Errors of other kinds always keep theirs."""
    argv = sys.argv[1:]
    if TRACEBACK_FLAG in argv or _log_level(argv) == "debug":
        os.environ[TRACEBACK_ENV] = "1"
    argv = [arg for arg in argv if arg != TRACEBACK_FLAG]
    try:
        cli(argv)
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"trl-rpo: error: {error}\n(add {TRACEBACK_FLAG} to see where it was raised)", file=sys.stderr)
        sys.exit(2)


def _log_level(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg.startswith("--log_level="):
            return arg.partition("=")[2]
        if arg == "--log_level" and index + 1 < len(argv):
            return argv[index + 1]
    return None


if __name__ == "__main__":
    run()
