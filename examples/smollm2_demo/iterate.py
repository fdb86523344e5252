"""Iterative RPO on the demo's task (`make demo-iterate`): SmolLM2-135M-Instruct, rounds of sample → score → train.

Each round samples `--num_generations` answers per training prompt from the current policy (temperature 1: the
Monte-Carlo partition is then consistent, since the round's reference is the policy that sampled), scores them with
`task.addition_reward`, trains a LoRA adapter with the demo's settings (`train.py`), merges it, and scores samples of
the merged policy on the held-out prompts. The prompts are those of the shipped data (`data/train.jsonl`,
`data/eval.jsonl`), after a system prompt asking for one short sentence, and answers may run to 96 new tokens: the
answers finish (the table says how many reached the limit), so the reward reads a whole answer, not the last number
of a cut one. Prints the per-round table and writes it, with every round's data and model, to `--output_dir`; a
rerun resumes after the last finished round.

    python examples/smollm2_demo/iterate.py [--rounds 3] [--num_generations 6] [--max_steps 40] [--beta 0.5]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however the script is started

import torch
from datasets import Dataset
from generation import default_model
from task import addition_reward
from train import DATA_DIR, lora_config, read_jsonl
from transformers import AutoConfig

from trl_rpo import RPOConfig, iterate_rpo
from trl_rpo.iterate import rounds_table


# Without it a third of SmolLM2's answers run past 128 tokens (benchmarks/frontier.py found the same).
SYSTEM = "Answer in one short sentence."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--output_dir", default="outputs/smollm2-iterate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num_generations", type=int, default=6, help="answers per training prompt per round")
    parser.add_argument("--eval_num_generations", type=int, default=2, help="answers per held-out prompt")
    parser.add_argument("--num_train_prompts", type=int, default=None, help="default: all 48")
    parser.add_argument("--num_eval", type=int, default=None, help="default: all 40")
    parser.add_argument("--max_steps", type=int, default=40, help="per round")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.5, help="τ of every round")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--system", default=SYSTEM, help="system prompt before each question ('' for none)")
    parser.add_argument("--num_threads", type=int, default=None)
    return parser.parse_args(argv)


def prompts_of(path: Path, limit: int | None, system: str = SYSTEM) -> Dataset:
    """The distinct prompts of a shipped file, with their `answer` (what the reward function reads)."""
    rows = {}
    for row in read_jsonl(path):
        prompt = ([{"role": "system", "content": system}] if system else []) + row["prompt"]
        rows.setdefault(json.dumps(prompt), {"prompt": prompt, "answer": row["answer"]})
    rows = list(rows.values())[:limit]
    return Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})


def main(argv: list[str] | None = None) -> list:
    cli = parse_args(argv)
    start = time.time()
    if cli.num_threads:
        torch.set_num_threads(cli.num_threads)
    model = cli.model or default_model()
    args = RPOConfig(
        output_dir=cli.output_dir, max_steps=cli.max_steps, per_device_train_batch_size=cli.batch_size,
        learning_rate=cli.learning_rate, lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, cli.max_steps // 10), beta=cli.beta, logps_aggregation="sum",
        activation_checkpointing=False, logging_steps=10, save_strategy="no", report_to="none", seed=0,
    )  # fmt: skip
    num_layers = AutoConfig.from_pretrained(model).num_hidden_layers
    results = iterate_rpo(
        model,
        prompts_of(DATA_DIR / "train.jsonl", cli.num_train_prompts, cli.system),
        args,
        rounds=cli.rounds,
        reward_funcs=[addition_reward],
        num_generations=cli.num_generations,
        eval_prompts=prompts_of(DATA_DIR / "eval.jsonl", cli.num_eval, cli.system),
        eval_num_generations=cli.eval_num_generations,
        peft_config=lora_config(16, num_layers, 10),
        generation_kwargs={"max_new_tokens": cli.max_new_tokens, "batch_size": 16},
    )
    print("\n" + rounds_table(results))
    print(f"\nEvery round's samples, scores and model in {cli.output_dir} ({time.time() - start:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
