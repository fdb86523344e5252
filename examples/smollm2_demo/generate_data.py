"""Build the demo's data with `trl-rpo generate` + `trl-rpo score`: the model's own answers, scored by the task.

Draws disjoint train and held-out eval addition problems, then makes the training rows as any RPO user would from
prompts and a reward:

1. `generate_completions` (`trl-rpo generate`) samples `--num_generations` answers per train prompt from the model
   itself; each prompt row carries its true sum (`answer`) onto its samples;
2. `score_completions` (`trl-rpo score`) scores every answer with `task.addition_reward` (`task.reward` with
   GRPOTrainer's reward-function signature); an empty answer gets no reward and its row is dropped, as `RPOTrainer`
   refuses empty completions.

It writes conversational JSONL to `--output_dir`: `train.jsonl` (`prompt`, `completion`, `reward`, `answer`, one row
per scored answer, grouped by prompt) and `eval.jsonl` (`prompt`, `answer`), which `train.py` reads. The pipeline's
own files go to `--samples_dir` (default `<output_dir>/samples`): `prompts.jsonl` (the train prompts), the samples
(`completions.jsonl`, `generation_config.json` recording the settings, `shards/`); rerun the same command after an
interruption and the sampling resumes there. With the defaults (48 prompts x 6 answers, 40 eval prompts) it takes
1-2 min on 2 CPU cores. The files shipped in `data/` are kept as they are, so `make demo` starts at once: the demo's
earlier sampling loop made them, before `generate_completions` existed, from the same prompts and sizes at the
settings the defaults give (see "Sampling settings"), so a run with the defaults gives other draws of the same
distribution, not the same rows.

    python examples/smollm2_demo/generate_data.py [--model PATH_OR_ID] [--output_dir examples/smollm2_demo/data]
        [--samples_dir OUTPUT_DIR/samples] [--num_train_prompts 48] [--num_generations 6] [--num_eval 40]
        [--temperature 0.7] [--top_k 50] [--max_new_tokens 16] [--batch_size 8] [--seed 0]

The same two steps with the command line, once the script has written the prompts (it prints these commands with
its own paths and settings). OUT is `--output_dir`, MODEL the SmolLM2 folder (`python -c "from trl_rpo.testing
import smollm2_folder; print(smollm2_folder())"`); `OUT/samples/scored.jsonl` then holds the rows of `train.jsonl`
plus bookkeeping columns (`reward_addition_reward`, `prompt_index`, `sample_index`) that `RPOTrainer` ignores:

    trl-rpo generate --model_name_or_path MODEL --dataset_name OUT/samples/prompts.jsonl --output_dir OUT/samples \
        --num_generations 6 --temperature 0.7 --top_k 50 --max_new_tokens 16 --batch_size 8 --seed 0 --dtype float32
    trl-rpo score --dataset_name OUT/samples/completions.jsonl --output_dir OUT/samples \
        --reward_funcs examples/smollm2_demo/task.py:addition_reward

Sampling settings: the defaults, temperature 0.7 and top-k 50, are those of the shipped data and so of the results
in docs/demo.md. (The earlier loop asked for temperature 0.7 and left top-k unset, and transformers then applies its
default top-k of 50; `generate_completions` applies only the settings it is given, so the top-k is explicit here.)
`generate_completions` warns about them: RPO's Monte-Carlo partition estimator (`train.py`'s default) is consistent
only on samples of the reference policy itself, at temperature 1 with no top-p/top-k truncation; these samples come
from a sharper, truncated distribution, and the estimate of each prompt's V̂ carries a bias. `--temperature 1
--top_k 0` gives the consistent setting (not how the shipped rows, and so the reported results, were made).
"""

import argparse
import collections
import json
import os
import shlex
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however the script is started

from datasets import Dataset
from generation import default_model
from task import addition_reward, make_problems, prompt_messages

from trl_rpo import generate_completions, score_completions


DATA_DIR = Path(__file__).resolve().parent / "data"
TASK_FILE = Path(__file__).resolve().parent / "task.py"
TRAIN_COLUMNS = ["prompt", "completion", "reward", "answer"]  # what `train.py` and the shipped `train.jsonl` hold
DTYPE = "float32"  # CPU sampling; the SmolLM2 folder is float32 already, a Hub checkpoint may not be


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder or hub id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--output_dir", default=str(DATA_DIR), help="where train.jsonl and eval.jsonl go")
    parser.add_argument(
        "--samples_dir", default=None, help="the pipeline's files: prompts, samples (default: OUTPUT_DIR/samples)"
    )
    parser.add_argument("--num_train_prompts", type=int, default=48)
    parser.add_argument(
        "--num_generations", "--completions_per_prompt", type=int, default=6, help="answers sampled per prompt"
    )
    parser.add_argument("--num_eval", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7, help="1 samples the model's own distribution")
    parser.add_argument("--top_k", type=int, default=50, help="keep the k likeliest tokens per step; 0: no top-k")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def cli_commands(cli: argparse.Namespace, model: str, samples_dir: Path) -> list[list[str]]:
    """The `trl-rpo generate` and `trl-rpo score` command lines that make the same samples and rewards as `main`."""
    generate = ["trl-rpo", "generate", "--model_name_or_path", model]
    generate += ["--dataset_name", str(samples_dir / "prompts.jsonl"), "--output_dir", str(samples_dir)]
    generate += ["--num_generations", str(cli.num_generations), "--temperature", str(cli.temperature)]
    generate += ["--top_k", str(cli.top_k)] if cli.top_k else []
    generate += ["--max_new_tokens", str(cli.max_new_tokens), "--batch_size", str(cli.batch_size)]
    generate += ["--seed", str(cli.seed), "--dtype", DTYPE]
    score = ["trl-rpo", "score", "--dataset_name", str(samples_dir / "completions.jsonl")]
    score += ["--output_dir", str(samples_dir), "--reward_funcs", f"{TASK_FILE}:{addition_reward.__name__}"]
    return [generate, score]


def reward_bucket(value: float) -> str:
    if value == 1.0:
        return "1.0 (correct)"
    return "(0, 0.25) (near miss)" if value > 0 else "0 (wrong or no number)"


def print_reward_distribution(rows: list[dict]) -> None:
    rewards = [row["reward"] for row in rows]
    counts = collections.Counter(reward_bucket(r) for r in rewards)
    print(f"\n{len(rows)} train rows, mean reward {sum(rewards) / len(rewards):.3f}")
    for label, count in sorted(counts.items(), reverse=True):
        print(f"  reward {label}: {count} ({count / len(rows):.0%})")
    groups = collections.defaultdict(set)
    for row in rows:
        groups[row["prompt"][-1]["content"]].add(row["reward"])
    print(f"  prompts whose completions differ in reward: {sum(len(g) > 1 for g in groups.values())}/{len(groups)}")


def main(argv: list[str] | None = None) -> None:
    cli = parse_args(argv)
    start = time.time()
    model = cli.model or default_model()
    output_dir = Path(cli.output_dir)
    samples_dir = Path(cli.samples_dir) if cli.samples_dir else output_dir / "samples"
    eval_problems = make_problems(cli.num_eval, seed=cli.seed + 1)
    train_problems = make_problems(cli.num_train_prompts, seed=cli.seed, exclude=set(eval_problems))
    prompts = [{"prompt": prompt_messages(a, b), "answer": a + b} for a, b in train_problems]
    write_jsonl(samples_dir / "prompts.jsonl", prompts)  # what `trl-rpo generate --dataset_name` reads
    eval_rows = [{"prompt": prompt_messages(a, b), "answer": a + b} for a, b in eval_problems]
    write_jsonl(output_dir / "eval.jsonl", eval_rows)

    samples = generate_completions(
        Dataset.from_list(prompts),
        model=model,
        output_dir=samples_dir,
        num_generations=cli.num_generations,
        temperature=cli.temperature,
        top_k=cli.top_k or None,
        max_new_tokens=cli.max_new_tokens,
        batch_size=cli.batch_size,
        seed=cli.seed,
        dtype=DTYPE,
    )
    scored = score_completions(samples, addition_reward)
    rows = scored.select_columns(TRAIN_COLUMNS).to_list()
    write_jsonl(output_dir / "train.jsonl", rows)

    print_reward_distribution(rows)
    if len(rows) < len(samples):
        print(f"  dropped: {len(samples) - len(rows)} empty answers of {len(samples)}")
    print("\nThe same samples and rewards from the command line:")
    for command in cli_commands(cli, model, samples_dir):
        print("  " + shlex.join(command))
    print(f"\nWrote {output_dir / 'train.jsonl'} and {output_dir / 'eval.jsonl'} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
