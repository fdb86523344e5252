"""Build the demo's data: the model answers its own training prompts, the task's reward scores every answer.

Draws disjoint train and held-out eval addition problems, samples several completions per train prompt from the
model itself (temperature sampling, batched), scores every answer with `task.reward` and writes conversational
JSONL: `train.jsonl` (`prompt`, `completion`, `reward`, `answer`) and `eval.jsonl` (`prompt`, `answer`). The files
shipped in `data/` come from the defaults (48 prompts x 6 answers = 288 rows; about 1 min on 2 CPU cores).

    python examples/smollm2_demo/generate_data.py [--model PATH_OR_ID] [--output_dir examples/smollm2_demo/data]
        [--num_train_prompts 48] [--completions_per_prompt 6] [--num_eval 40] [--temperature 0.7] [--seed 0]
"""

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however the script is started

from generation import default_model, generate, load_model_and_tokenizer
from task import make_problems, prompt_messages, reward
from transformers import set_seed


DATA_DIR = Path(__file__).resolve().parent / "data"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder or hub id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--output_dir", default=str(DATA_DIR))
    parser.add_argument("--num_train_prompts", type=int, default=48)
    parser.add_argument("--completions_per_prompt", type=int, default=6)
    parser.add_argument("--num_eval", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64, help="sequences generated together")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def sample_train_rows(model, tokenizer, problems, cli) -> list[dict]:
    prompts = [prompt_messages(a, b) for a, b in problems]
    samples = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cli.max_new_tokens,
        temperature=cli.temperature,
        num_return_sequences=cli.completions_per_prompt,
        batch_size=cli.batch_size,
    )
    rows = []
    for i, (prompt, (a, b)) in enumerate(zip(prompts, problems, strict=True)):
        completions = samples[i * cli.completions_per_prompt : (i + 1) * cli.completions_per_prompt]
        rows += [
            {
                "prompt": prompt,
                "completion": [{"role": "assistant", "content": completion}],
                "reward": reward(completion, a + b),
                "answer": a + b,
            }
            for completion in completions
        ]
    return rows


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
    set_seed(cli.seed)
    model, tokenizer = load_model_and_tokenizer(cli.model or default_model())
    eval_problems = make_problems(cli.num_eval, seed=cli.seed + 1)
    train_problems = make_problems(cli.num_train_prompts, seed=cli.seed, exclude=set(eval_problems))

    rows = sample_train_rows(model, tokenizer, train_problems, cli)
    output_dir = Path(cli.output_dir)
    write_jsonl(output_dir / "train.jsonl", rows)
    eval_rows = [{"prompt": prompt_messages(a, b), "answer": a + b} for a, b in eval_problems]
    write_jsonl(output_dir / "eval.jsonl", eval_rows)

    print_reward_distribution(rows)
    print(f"Wrote {output_dir / 'train.jsonl'} and {output_dir / 'eval.jsonl'} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
