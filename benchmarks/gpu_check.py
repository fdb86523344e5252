"""GPU check: bf16 RPO training through `trl-rpo --accelerate_config <engine>`, with throughput printed.

Builds a randomly initialised ~200M-parameter Llama (no download) and synthetic rewarded rows, then runs the real
command a user runs, once per engine (`single_gpu`, and the sharded engines `fsdp2` and `zero3` on every visible GPU).
It checks what only an accelerator shows: that `RPOConfig` picks bf16 by itself, that the target pass and training
run on the device in bf16 with a finite, falling loss, that the sharded engines start from the same first loss as
one GPU (their target pass runs on the sharded policy: same targets, same first step up to bf16 noise), and how
fast. Results are printed as a table and written to `<output_dir>/gpu_check.json`; `benchmarks/results/` keeps the
ones recorded so far.

Then, unless `--no-throughput`, the variable-length workload of `benchmarks/throughput.py` in bf16 on a ~0.5B
Llama-shaped model (24 layers, 1024 wide, vocabulary 32,000; random weights): RPO padded, `group_by_length`,
`padding_free` and both, against KTOTrainer and the plain floor, useful tokens/s and peak GPU memory, once with sdpa
and once with flash-attention when `flash_attn` is installed. JSON: `<output_dir>/throughput_variable_*.json`.

    python benchmarks/gpu_check.py [--engines single_gpu,fsdp2,zero3] [--steps 40] [--batch 16]
                                   [--output_dir data/gpu-check] [--no-throughput]
"""

import argparse
import importlib.util
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trl_rpo import RPOConfig  # noqa: E402
from trl_rpo.testing import build_tokenizer  # noqa: E402


def build_model(output_dir: Path, hidden: int, layers: int) -> str:
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=32_000,  # a realistic LM-head cost; the tokenizer only uses the first ids
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)


def write_rows(path: Path, prompts: int, completions: int, words: int) -> None:
    rng = random.Random(0)
    vocabulary = "the a is of to and what how why answer question good bad yes no sum plus minus equals".split()
    with path.open("w") as f:
        for p in range(prompts):
            prompt = f"Question {p}: " + " ".join(rng.choices(vocabulary, k=words // 3))
            for _ in range(completions):
                row = {"prompt": prompt, "completion": " " + " ".join(rng.choices(vocabulary, k=words)),
                       "reward": rng.gauss(0, 1)}  # fmt: skip
                f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="data/gpu-check")
    parser.add_argument("--engines", default="single_gpu,fsdp2,zero3", help="accelerate configs to run, in order")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--words", type=int, default=150, help="completion length in words (~2 tokens each)")
    parser.add_argument("--allow_cpu", action="store_true", help="smoke-test the script itself without a GPU")
    parser.add_argument("--no-throughput", dest="throughput", action="store_false", help="skip the variable workload")
    parser.add_argument(
        "--throughput-quick", action="store_true", help="the variable workload's --quick (a smoke test)"
    )
    cli = parser.parse_args()
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (torch.cuda.is_available() or cli.allow_cpu):
        sys.exit("This check needs a CUDA GPU (or --allow_cpu for a smoke test of the script).")
    if cli.throughput:  # first: the variable-length numbers do not depend on the engines' check passing
        for attention in attentions():
            subprocess.run(throughput_command(out, attention, quick=cli.throughput_quick), cwd=ROOT, check=True)
    engines = [engine for engine in cli.engines.split(",") if engine]
    if engines:
        check_engines(cli, out, engines)


def check_engines(cli, out: Path, engines: list[str]) -> None:
    """`trl-rpo` through each accelerate config: bf16 by default, a falling loss, the same first loss everywhere."""
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    default_bf16 = RPOConfig(str(out / "probe")).bf16

    model_dir = build_model(out / "model", cli.hidden, cli.layers)
    write_rows(out / "rows.jsonl", prompts=cli.batch * cli.steps // 4 + 4, completions=4, words=cli.words)
    processes = max(1, torch.cuda.device_count())
    records = []
    for engine in engines:
        launch = ["--accelerate_config", engine, "--num_processes", str(1 if engine == "single_gpu" else processes)]
        command = [
            sys.executable, "-m", "trl_rpo", *launch, "--model_name_or_path", model_dir,
            "--dataset_name", str(out / "rows.jsonl"), "--output_dir", str(out / f"run-{engine}"),
            "--max_steps", str(cli.steps), "--per_device_train_batch_size", str(cli.batch), "--learning_rate", "1e-5",
            "--report_to", "none", "--logging_steps", str(max(1, cli.steps // 8)), "--save_strategy", "no",
            "--max_length", "1024", "--gradient_checkpointing", "false", "--cache_ref_log_probs", "false",
        ]  # fmt: skip
        records.append(run(command, engine, launch[-1], card, default_bf16, model_dir, cli))
    (out / "gpu_check.json").write_text(json.dumps(records, indent=2))
    print("| engine | processes | card | bf16 default | params | batch | s/step | tokens/s | setup + target pass (s) "
          "| loss first → last |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r['engine']} | {r['processes']} | {card} | {default_bf16} | {r['parameters'] / 1e6:.0f}M | "
            f"{cli.batch} | {r['seconds_per_step']:.3f} | {r['tokens_per_second']:,.0f} | "
            f"{r['setup_and_target_pass_seconds']:.1f} | {r['losses'][0]:.3f} → {r['losses'][-1]:.3f} |"
        )
    first = records[0]["losses"][0]
    for r in records[1:]:  # same data and initial weights: a different first loss means different targets
        if abs(r["losses"][0] - first) > 0.02 * abs(first):
            sys.exit(
                f"{r['engine']}: first loss {r['losses'][0]:.4f} differs from {records[0]['engine']}'s {first:.4f}"
            )


def attentions() -> list[str]:
    """sdpa, and flash-attention where its package is installed (the kernel padding-free batches are made for)."""
    return ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def throughput_command(out: Path, attention: str, quick: bool = False) -> list[str]:
    """The variable-length workload on a ~0.5B Llama in bf16: ~470M parameters with a 32,000 vocabulary; lengths twice
    the CPU defaults (prompts median 128 tokens up to 1,024, completions median 256 up to 1,536)."""
    size = ["--quick"] if quick else ["--layers", "24", "--hidden", "1024", "--vocab", "32000", "--prompts", "64"]
    return [
        sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--workload", "variable", *size,
        "--completions", "4", "--batch", "8", "--length-scale", "1" if quick else "2", "--bf16",
        "--attention", attention, "--output", str(out / f"throughput_variable_{attention}.json"),
    ]  # fmt: skip


def run(command: list[str], engine: str, processes: str, card: str, default_bf16: bool, model_dir: str, cli) -> dict:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{engine}:\n" + result.stderr[-5000:])
    logs = [json.loads(m.replace("'", '"')) for m in re.findall(r"^\{.*\}$", result.stdout, flags=re.MULTILINE)]
    steps = [log for log in logs if "loss" in log]
    runtime = float(next(log for log in logs if "train_runtime" in log)["train_runtime"])
    return {
        "engine": engine,
        "processes": int(processes),
        "card": card,
        "torch": torch.__version__,
        "bf16_by_default": default_bf16,
        "parameters": sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters()),
        "batch": cli.batch,
        "steps": cli.steps,
        "seconds_per_step": runtime / cli.steps,
        "tokens_per_second": float(steps[-1]["num_tokens"]) / runtime,
        "setup_and_target_pass_seconds": wall - runtime,
        "losses": [float(log["loss"]) for log in steps],
    }


if __name__ == "__main__":
    main()
