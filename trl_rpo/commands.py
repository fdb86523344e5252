"""`trl-rpo generate`, `trl-rpo score` and `trl-rpo iterate`: sample completions from prompts, score them, train;
or all three, round after round.

```bash
trl-rpo generate --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name prompts.jsonl --output_dir samples \
    --num_generations 8 --max_new_tokens 256
trl-rpo generate --accelerate_config multi_gpu --num_processes 4 --model_name_or_path ... --output_dir samples
trl-rpo score --dataset_name samples/completions.jsonl --output_dir samples \
    --reward_funcs my_rewards:exact_answer rewards.py:brevity --reward_model_name_or_path my-rm \
    --reward_weights 1 0.1 0.5
trl-rpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name samples/scored.jsonl --output_dir qwen-rpo \
    --partition_estimator monte_carlo
trl-rpo iterate --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name prompts.jsonl --output_dir qwen-iter \
    --reward_funcs rewards.py:exact_answer --rounds 3 --num_generations 8 --eval_dataset_name held_out.jsonl
```

The arguments are the fields of [`GenerateArguments`] and [`ScoreArguments`]; `--help` lists them, `--config` reads
them from a YAML file (flags override its keys). `--dataset_name` is a local `.json`/`.jsonl`/`.csv`/`.parquet` file,
a folder of data files or a Hub dataset id, loaded as the training command loads it.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from accelerate.commands.launch import launch_command, launch_command_parser
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DatasetMixtureConfig, ModelConfig, TrlParser, get_peft_config, get_quantization_config
from trl.cli.commands.training import _subtract_subsequence

from .cli import RPOScriptArguments, _split, load_rpo_dataset, resolve_accelerate_config, set_model_init_kwargs
from .generation import COMPLETIONS_FILE, generate_completions
from .iterate import QUANTIZED_ROUNDS, iterate_rpo, rounds_table
from .rpo_config import RPOConfig
from .scoring import describe_rewards, score_completions


SCORED_FILE = "scored.jsonl"
SCORING_CONFIG_FILE = "scoring_config.json"


@dataclass
class _DatasetArguments:
    """The input dataset, loaded as `trl-rpo` loads its training data."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A local .json/.jsonl/.csv/.parquet file, a folder of data files, or a Hub dataset id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub datasets)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to read (a single file is 'train')."})
    prompt_column: str = field(
        default="prompt", metadata={"help": "Column holding the prompts; renamed to `prompt` when different."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder for the output files (required)."})

    def load(self, **columns: str) -> Dataset:
        script_args = RPOScriptArguments(
            dataset_name=self.dataset_name,
            dataset_config=self.dataset_config,
            dataset_train_split=self.dataset_train_split,
            prompt_column=self.prompt_column,
            **columns,
        )
        dataset = load_rpo_dataset(script_args, DatasetMixtureConfig())
        return _split(dataset, self.dataset_train_split, "dataset_train_split")

    def require(self, *names: str) -> None:
        missing = [f"--{name}" for name in ("output_dir", *names) if getattr(self, name) is None]
        if missing:
            raise ValueError(f"Missing required argument(s): {', '.join(missing)}.")


@dataclass
class GenerateArguments(_DatasetArguments):
    """
    Arguments of `trl-rpo generate`: see [`generate_completions`] for what each setting does.

    RPO's Monte-Carlo partition estimator is consistent only on samples at temperature 1 with no top-p/top-k
    truncation; other settings are warned about, and call for the empirical estimator.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model to sample from (id or folder): causal LM or encoder-decoder (required)."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Model revision on the Hub."})
    adapter_name_or_path: str | None = field(
        default=None, metadata={"help": "PEFT (LoRA) adapter folder applied to the model before sampling."}
    )
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
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion, in tokens."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call, per process."})
    seed: int = field(default=0, metadata={"help": "Random seed of the sampling."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16."})
    backend: str = field(
        default="transformers",
        metadata={"help": "transformers, or vllm (one process, a CUDA GPU, `pip install vllm`; not tested here)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


@dataclass
class ScoreArguments(_DatasetArguments):
    """Arguments of `trl-rpo score`: see [`score_completions`]. Writes `scored.jsonl` and `scoring_config.json`."""

    completion_column: str = field(
        default="completion",
        metadata={"help": "Column holding the completions; renamed to `completion` if different."},
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Reward functions, each 'module:function', 'module.function' or 'file.py:function'."},
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Sequence-classification reward model (id or folder), scored after the functions."},
    )
    reward_model_revision: str | None = field(default=None, metadata={"help": "Reward model revision on the Hub."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per source (functions, then the model); all 1 by default."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Policy tokenizer: reward functions then get `completion_ids`, as in GRPOTrainer."},
    )
    batch_size: int = field(default=32, metadata={"help": "Rows per reward-function call and reward-model forward."})
    dtype: str = field(default="auto", metadata={"help": "Reward model dtype: auto, float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


@dataclass
class IterateArguments:
    """
    Arguments of `trl-rpo iterate` besides `RPOConfig`'s (each round's training, `output_dir` included) and
    `ModelConfig`'s (the initial model, LoRA): see [`iterate_rpo`]. The prompts are read as `trl-rpo generate` reads
    them; the sampling settings are those of `trl-rpo generate`, the reward sources those of `trl-rpo score`.
    """

    dataset_name: str | None = field(
        default=None, metadata={"help": "Training prompts: a .json/.jsonl/.csv/.parquet file, a folder or a Hub id."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to read (a single file is 'train')."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    rounds: int = field(default=2, metadata={"help": "Rounds of sample → score → train."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Held-out prompts (a file or folder): each round's policy is scored on them."}
    )
    eval_num_generations: int = field(default=1, metadata={"help": "Samples per held-out prompt."})
    anchor_to_initial_reference: bool = field(
        default=False,
        metadata={"help": "Keep the initial model as every round's reference (empirical partition estimator)."},
    )
    num_generations: int = field(default=4, metadata={"help": "Completions sampled per prompt per round."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (1 for the Monte-Carlo estimator)."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion, in tokens."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Reward functions, each 'module:function', 'module.function' or 'file.py:function'."},
    )
    reward_model_name_or_path: str | None = field(default=None, metadata={"help": "Sequence-classification RM."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per source (functions, then the model); all 1 by default."}
    )


_SUBCOMMANDS = {
    "generate": (
        (GenerateArguments,),
        "Sample N completions per prompt for RPO: batched, sharded under accelerate, resumable.",
    ),
    "score": (
        (ScoreArguments,),
        "Add a `reward` column to prompt/completion rows from reward functions and/or a reward model.",
    ),
    "iterate": (
        (IterateArguments, RPOConfig, ModelConfig),
        (
            "Iterative RPO: each round samples from the current policy, scores, and trains with it as the reference "
            "(Monte-Carlo partition). Prints the per-round table."
        ),
    ),
}


def make_subcommand_parser(name: str) -> TrlParser:
    """The parser of `trl-rpo generate`, `score` or `iterate` (`--config` YAML, flags override, unknown keys fail)."""
    classes, description = _SUBCOMMANDS[name]
    return TrlParser(classes, prog=f"trl-rpo {name}", allow_abbrev=False, description=description)


def iterate_main(argv: list[str]) -> None:
    """`trl-rpo iterate ARGS`: run the rounds (one process) and print the per-round table."""
    iterate_args, training_args, model_args = make_subcommand_parser("iterate").parse_args_and_config(argv)
    required = {"--dataset_name": iterate_args.dataset_name, "--model_name_or_path": model_args.model_name_or_path}
    missing = [flag for flag, value in required.items() if not value]
    if missing:
        raise ValueError(f"Missing required argument(s): {', '.join(missing)}.")
    if get_quantization_config(model_args) is not None:
        raise ValueError(QUANTIZED_ROUNDS)
    set_model_init_kwargs(training_args, model_args)  # dtype, revision, attention: honoured by every round

    def prompts(name: str, split: str) -> Dataset:
        source = _DatasetArguments(name, dataset_train_split=split, prompt_column=iterate_args.prompt_column)
        return source.load()

    eval_prompts = prompts(iterate_args.eval_dataset_name, "train") if iterate_args.eval_dataset_name else None
    results = iterate_rpo(
        model_args.model_name_or_path,
        prompts(iterate_args.dataset_name, iterate_args.dataset_train_split),
        training_args,
        rounds=iterate_args.rounds,
        reward_funcs=iterate_args.reward_funcs,
        reward_model=iterate_args.reward_model_name_or_path,
        reward_weights=iterate_args.reward_weights,
        num_generations=iterate_args.num_generations,
        eval_prompts=eval_prompts,
        eval_num_generations=iterate_args.eval_num_generations,
        peft_config=get_peft_config(model_args),
        anchor_to_initial_reference=iterate_args.anchor_to_initial_reference,
        generation_kwargs={
            "temperature": iterate_args.temperature,
            "max_new_tokens": iterate_args.max_new_tokens,
            "batch_size": iterate_args.generation_batch_size,
        },
    )
    print(rounds_table(results))


def generate_main(argv: list[str]) -> None:
    """`trl-rpo generate ARGS`; with `--accelerate_config NAME|PATH` it relaunches itself under `accelerate launch`,
    the options that are not its own (`--num_processes`, `--main_process_port`, …) going to accelerate."""
    parser = make_subcommand_parser("generate")
    if "--accelerate_config" in argv:
        _relaunch(parser, argv, "generate")
        return
    (args,) = parser.parse_args_and_config(argv)
    args.require("model_name_or_path")
    rows = generate_completions(
        args.load(),
        model=args.model_name_or_path,
        output_dir=args.output_dir,
        num_generations=args.num_generations,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        adapter=args.adapter_name_or_path,
        revision=args.model_revision,
        dtype=args.dtype,
        backend=args.backend,
        trust_remote_code=args.trust_remote_code,
    )
    state = PartialState()
    state.print(
        f"✅ {len(rows)} completions on {state.num_processes} process(es): {args.output_dir}/{COMPLETIONS_FILE}"
    )
    state.wait_for_everyone()  # every rank leaves together, then the group goes: no rank waits at exit for another
    state.destroy_process_group()


def _relaunch(parser: TrlParser, argv: list[str], subcommand: str) -> None:
    """As `trl-rpo --accelerate_config` does for training, keeping the subcommand in the relaunched arguments."""
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config(config_remaining + cli_remaining)
    script_args = _subtract_subsequence(argv, cli_remaining)
    module_args = ["--module", "trl_rpo.cli", subcommand, *script_args]
    launch_command(launch_command_parser().parse_args([*launch_args, *module_args]))


def score_main(argv: list[str]) -> None:
    """`trl-rpo score ARGS`: score the dataset and write `scored.jsonl` and `scoring_config.json` to `output_dir`."""
    (args,) = make_subcommand_parser("score").parse_args_and_config(argv)
    args.require()
    model_init_kwargs = {"revision": args.reward_model_revision, "dtype": args.dtype}
    model_init_kwargs["trust_remote_code"] = args.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path) if args.tokenizer_name_or_path else None
    dataset = args.load(completion_column=args.completion_column)
    output_dir = Path(args.output_dir)
    _set_aside(output_dir, (SCORED_FILE, SCORING_CONFIG_FILE))  # a failed rerun leaves nothing current-looking
    scored = score_completions(
        dataset,
        reward_funcs=args.reward_funcs,
        reward_model=args.reward_model_name_or_path,
        reward_weights=args.reward_weights,
        batch_size=args.batch_size,
        processing_class=tokenizer,
        model_init_kwargs=model_init_kwargs,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(scored, output_dir / SCORED_FILE)
    _write_scoring_config(output_dir, args, rows_in=len(dataset), rows_out=len(scored))
    for name in (SCORED_FILE, SCORING_CONFIG_FILE):  # this run's outputs are written: the earlier ones can go
        output_dir.joinpath(name + ".previous").unlink(missing_ok=True)
    print(describe_rewards(scored))
    print(f"✅ {len(scored)} of {len(dataset)} rows scored: {output_dir / SCORED_FILE}")


def _set_aside(output_dir: Path, names: tuple[str, ...]) -> None:
    """Rename an earlier run's outputs to `<name>.previous` before work that may fail, so that a failed rerun cannot
    leave them looking like its own (they are deleted once the new outputs are written)."""
    moved = [name for name in names if (output_dir / name).is_file()]
    for name in moved:
        (output_dir / name).replace(output_dir / (name + ".previous"))
    if moved:
        print(f"Earlier outputs in {output_dir} set aside as *.previous until this run's are written.")


def write_jsonl(dataset: Dataset, path: Path, batch_size: int = 1000) -> None:
    """`dataset` as JSON lines, floats written exactly, replacing `path` only once complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        for batch in dataset.iter(batch_size=batch_size):
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    os.replace(tmp, path)


def _write_scoring_config(output_dir: Path, args: ScoreArguments, rows_in: int, rows_out: int) -> None:
    from . import __version__

    record = {
        "dataset_name": args.dataset_name,
        "reward_funcs": args.reward_funcs,
        "reward_model": args.reward_model_name_or_path,
        "reward_model_revision": args.reward_model_revision,
        "reward_weights": args.reward_weights,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "trl_rpo_version": __version__,
    }
    (output_dir / SCORING_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
