"""Start-up of `RPOTrainer` at scale: time to the first step, split by phase, and memory above the loaded model and
the memory-mapped dataset, on a tiny model on CPU.

    python benchmarks/scale.py [--workloads short,long] [--short-prompts 100000] [--completions 10]
                               [--long-rows 50000] [--batch 256] [--output benchmarks/results/scale_cpu.json]

Workloads (synthetic arithmetic-like text, generated and saved with `save_to_disk` before the measurement, then
loaded memory-mapped in a fresh process, as a user's `load_from_disk` / `load_dataset` split would be):

- `short`: `--short-prompts` prompts × `--completions` completions (default 1M rows of ~18 tokens);
- `long`: `--long-rows` rows of ~300 tokens (~100-token prompts, ~200-token completions; 10 per prompt).

Each workload runs in its own subprocess. It loads the tiny model (the tests' 2-layer, 32-wide Llama, built offline)
and the dataset, takes that resident memory as the baseline, then builds `RPOTrainer` and trains one step, while a
thread samples the resident memory every 20 ms. The phases are timed by wrapping the trainer's own methods: reading
and tokenising (the batched `Dataset.map`), the reference pass (collation and forward), the partition maths
(`normalize_rewards` + `rpo_targets`), column writing (`add_column` of the target columns), the rest (validation
scans, the cache key's weight and token digests, writing the cache file: the cache is on, as by default, and
misses) and the first training step. A bare no-grad forward over the same rows, batched and pre-collated,
gives the time of the reference forward alone. See README.md for the table and how to read it.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import date


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scale_cpu.json")
MB = 1024**2


def rss(field: str = "VmRSS") -> int:
    """Resident memory in bytes; `RssAnon`: its anonymous part (heap, tensors), without the file pages of
    memory-mapped Arrow files, which the kernel can drop and read again."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


PHASE = ["other"]  # the phase running now, set by the timers: the sampler books each peak to it
TARGET_PASS = [None]  # the trainer's target pass, once built: its `phase` names the target pass's phases
TARGET_PASS_PHASES = {"reference": "reference_pass", "maths": "partition_maths", "columns": "column_writing"}


class PeakSampler:
    """The largest resident memory (all, and anonymous) seen by a thread polling /proc every `interval` seconds,
    overall and per phase."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.peak_anon, self._stop = interval, rss(), rss("RssAnon"), threading.Event()
        self.anon_by_phase: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            anon = rss("RssAnon")
            self.peak, self.peak_anon = max(self.peak, rss()), max(self.peak_anon, anon)
            inner = TARGET_PASS[0].phase if TARGET_PASS[0] is not None else None
            phase = TARGET_PASS_PHASES[inner] if inner else PHASE[0]
            self.anon_by_phase[phase] = max(self.anon_by_phase.get(phase, 0), anon)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak, self.peak_anon = max(self.peak, rss()), max(self.peak_anon, rss("RssAnon"))


# --------------------------------------------------------------------------------------------- the data
WORDS = "the a is of to and what how why answer question good bad yes no maybe sum plus minus equals".split()


def _text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 13 + (seed >> 3)) % len(WORDS)] for i in range(words))


def make_rows(batch, indices, prompt_words: int, completion_words: int, completions: int):
    prompts = [i // completions for i in indices]
    return {
        "prompt": [f"{p % 97} + {p % 89} = ? " + _text(p, prompt_words) for p in prompts],
        "completion": [" " + _text(i, completion_words) for i in indices],
        "reward": [((i * 2654435761) % 1000) / 1000.0 for i in indices],
    }


def build_dataset(folder: str, rows: int, prompt_words: int, completion_words: int, completions: int) -> None:
    from datasets import Dataset

    Dataset.from_dict({"i": list(range(rows))}).map(
        make_rows,
        batched=True,
        with_indices=True,
        remove_columns=["i"],
        fn_kwargs={"prompt_words": prompt_words, "completion_words": completion_words, "completions": completions},
    ).save_to_disk(folder)


# ------------------------------------------------------------------------------------------- the worker
@contextmanager
def timed(store: dict, key: str):
    start, outer = time.perf_counter(), PHASE[0]
    PHASE[0] = key
    try:
        yield
    finally:
        PHASE[0] = outer
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


def wrap(cls, name: str, store: dict, key: str) -> None:
    real = getattr(cls, name)

    def wrapper(*args, **kwargs):
        with timed(store, key):
            return real(*args, **kwargs)

    setattr(cls, name, wrapper)


def bare_forward(trainer, dataset, batch_size: int) -> float:
    """Seconds of no-grad forward alone (completion positions projected, as in the reference pass), the batches
    collated outside the clock."""
    import torch

    from trl_rpo.lm_head import completion_only_lm_head

    model, elapsed = trainer.model.eval(), 0.0
    with torch.no_grad(), completion_only_lm_head(False):
        for rows in dataset.select_columns(["prompt_ids", "completion_ids"]).iter(batch_size=batch_size):
            examples = [{"prompt_ids": p, "completion_ids": c} for p, c in zip(*rows.values(), strict=True)]
            batch = trainer.data_collator(examples)
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            start = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                  use_cache=False, fused_lm_head=True)  # fmt: skip
            elapsed += time.perf_counter() - start
    return elapsed


def worker(data_dir: str, batch_size: int, output: str, cache: bool = True) -> None:
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_rpo import RPOConfig, RPOTrainer
    from trl_rpo.target_pass import TargetPass
    from trl_rpo.testing import save_tiny_causal_lm

    torch.set_num_threads(1)
    model_dir = save_tiny_causal_lm(tempfile.mkdtemp())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_from_disk(data_dir)
    baseline, baseline_anon = rss(), rss("RssAnon")
    phases: dict[str, float] = {}
    # Tokenisation and the first step: KTOTrainer's dataset hook and Trainer's step. The target pass's phases: its
    # own log (`target_pass.seconds`), and its `phase` for the memory sampler.
    wrap(RPOTrainer, "_prepare_dataset", phases, "tokenise")
    wrap(RPOTrainer, "training_step", phases, "first_step")
    real_init = TargetPass.__init__

    def watched_init(self, *a, **k):
        real_init(self, *a, **k)
        TARGET_PASS[0] = self

    TargetPass.__init__ = watched_init
    args = RPOConfig(
        output_dir=tempfile.mkdtemp(), report_to="none", max_steps=1, per_device_train_batch_size=8,
        precompute_ref_batch_size=batch_size, save_strategy="no", bf16=False, disable_tqdm=True,
        dataloader_num_workers=0, cache_ref_log_probs=cache,  # on by default: a miss in a fresh cache
    )  # fmt: skip
    start = time.perf_counter()
    with PeakSampler() as sampler:
        trainer = RPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
    total = time.perf_counter() - start
    seconds = trainer.target_pass.seconds["train"]
    phases |= {"reference_pass": seconds["reference"], "partition_maths": seconds["maths"]}
    phases["column_writing"] = seconds["columns"]
    rows, tokens = len(trainer.train_dataset), int(sum(trainer.train_dataset["length"]))
    phases["other"] = total - sum(phases.values())
    forward = bare_forward(trainer, trainer.train_dataset, batch_size)
    result = {
        "rows": rows,
        "tokens": tokens,
        "mean_tokens_per_row": tokens / rows,
        "time_to_first_step_s": total,
        "phases_s": phases,
        "bare_reference_forward_s": forward,
        "not_forward_share": (total - forward) / total,
        "peak_rss_above_baseline_mb": (sampler.peak - baseline) / MB,
        "peak_anon_rss_above_baseline_mb": (sampler.peak_anon - baseline_anon) / MB,
        "peak_anon_rss_above_baseline_mb_by_phase": {
            k: (v - baseline_anon) / MB for k, v in sampler.anon_by_phase.items()
        },
        "cache_ref_log_probs": cache,
        "baseline_rss_mb": baseline / MB,
    }
    with open(output, "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------------------- the driver
WORKLOADS = {
    "short": lambda a: (a.short_prompts * a.completions, 2, 1, a.completions),
    "long": lambda a: (a.long_rows, 37, 74, 10),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="short,long")
    parser.add_argument("--short-prompts", type=int, default=100_000)
    parser.add_argument("--completions", type=int, default=10)
    parser.add_argument("--long-rows", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=256, help="precompute_ref_batch_size")
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--no-cache", action="store_true", help="cache_ref_log_probs=False (default: on, a miss)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2], args.worker[3] == "cache")
        return
    results = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        env["HF_DATASETS_CACHE"] = os.path.join(scratch, "hf")
        for name in args.workloads.split(","):
            rows, prompt_words, completion_words, completions = WORKLOADS[name](args)
            data_dir, output = os.path.join(scratch, name), os.path.join(scratch, f"{name}.json")
            build_dataset(data_dir, rows, prompt_words, completion_words, completions)
            cache = "no-cache" if args.no_cache else "cache"
            command = [sys.executable, __file__, "--worker", data_dir, str(args.batch), output, cache]
            subprocess.run(command, check=True, env=env)
            with open(output) as f:
                results[name] = json.load(f) | {"workload": name, "completions_per_prompt": completions}
    report = {
        "date": str(date.today()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "settings": vars(args) | {"threads": 1, "model": "tiny Llama (2 layers, 32 wide, vocab 320)"},
        "workloads": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print_table(results)


def print_table(results: dict) -> None:
    print("| workload | rows | tokens/row | to first step (s) | tokenise | reference pass | bare forward | maths | "
          "columns | rest | first step | not forward | peak RSS above baseline (MB) | anonymous (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p = r["phases_s"]
        print(
            f"| {name} | {r['rows']:,} | {r['mean_tokens_per_row']:.0f} | {r['time_to_first_step_s']:.1f} | "
            f"{p.get('tokenise', 0):.1f} | {p.get('reference_pass', 0):.1f} | {r['bare_reference_forward_s']:.1f} | "
            f"{p.get('partition_maths', 0):.2f} | {p.get('column_writing', 0):.2f} | {p.get('other', 0):.1f} | "
            f"{p.get('first_step', 0):.2f} | {100 * r['not_forward_share']:.0f} % | "
            f"{r['peak_rss_above_baseline_mb']:.0f} | {r['peak_anon_rss_above_baseline_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
