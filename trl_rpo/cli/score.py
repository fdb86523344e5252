"""`trl-rpo score`: add a `reward` column to prompt/completion rows from reward functions and/or a reward model.

```bash
trl-rpo score --dataset_name samples/completions.jsonl --output_dir samples \
    --reward_funcs my_rewards:exact_answer rewards.py:brevity --reward_model_name_or_path my-rm \
    --reward_weights 1 0.1 0.5
```
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer
from trl import TrlParser

from ..files import atomic_path, write_json
from ..scoring import describe_rewards, score_completions
from ..version import __version__
from .arguments import DatasetArguments, OutputArguments, RewardSourceArguments, require


SCORED_FILE = "scored.jsonl"
SCORING_CONFIG_FILE = "scoring_config.json"


@dataclass
class ScoreArguments(DatasetArguments, RewardSourceArguments, OutputArguments):
    """Arguments of `trl-rpo score`: the rows, the reward sources; see [`score_completions`]. Writes `scored.jsonl`
    and `scoring_config.json`."""

    completion_column: str = field(
        default="completion",
        metadata={"help": "Column holding the completions; renamed to `completion` if different."},
    )
    reward_model_revision: str | None = field(default=None, metadata={"help": "Reward model revision on the Hub."})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Policy tokenizer: reward functions then get `completion_ids`, as in GRPOTrainer."},
    )
    batch_size: int = field(default=32, metadata={"help": "Rows per reward-function call and reward-model forward."})
    dtype: str = field(default="auto", metadata={"help": "Reward model dtype: auto, float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


def make_parser() -> TrlParser:
    return TrlParser(
        (ScoreArguments,),
        prog="trl-rpo score",
        allow_abbrev=False,
        description="Add a `reward` column to prompt/completion rows from reward functions and/or a reward model.",
    )


def run(argv: list[str]) -> None:
    """`trl-rpo score ARGS`: score the dataset and write `scored.jsonl` and `scoring_config.json` to `output_dir`."""
    (args,) = make_parser().parse_args_and_config(argv)
    require(args, "output_dir")
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
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        for batch in dataset.iter(batch_size=batch_size):
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_scoring_config(output_dir: Path, args: ScoreArguments, rows_in: int, rows_out: int) -> None:
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
    write_json(output_dir / SCORING_CONFIG_FILE, record)
