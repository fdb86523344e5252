"""Seconds per optimizer step of RPO against a plain PyTorch floor, KTOTrainer (with and without precomputed reference
log-probs) and SFTTrainer, on one model, data set and batch shape, interleaved in one process; plus the cost of RPO's
target pass and of its partition maths.

    python benchmarks/throughput.py [--layers 4] [--hidden 256] [--vocab 32000] [--batch 8] [--seq 129]
                                    [--warmup 2] [--rounds 5] [--steps-per-turn 2] [--threads 2] [--no-memory]
    python benchmarks/throughput.py --quick      # a smoke run in a few seconds (tiny model, no memory subprocesses)

Timing: every method trains in its own thread, but a baton lets only one run at a time: a method runs
`--steps-per-turn` optimizer steps, hands over to the next (round-robin), and waits for its next turn. So the
methods share the machine's slow and fast moments alike. Peak memory: each method runs again alone, in its own
subprocess (`ru_maxrss`, like memory.py). The table goes to stdout, the numbers to
`benchmarks/results/throughput_<cpu|cuda>.json`. See README.md.

`--workload variable`: useful (non-pad) tokens per second on rows of heavy-tailed lengths, for the floor (padded
batches), RPO padded in random order, with `train_sampling_strategy="group_by_length"`, with `padding_free=True`,
with both, and KTOTrainer; plus RPO's target pass padded vs padding-free, and "target pass + one epoch" end to end.

    python benchmarks/throughput.py --workload variable [--prompts 16] [--completions 4] [--length-scale 1.0]
                                    [--epochs 1] [--batch 8] [--no-memory]      # --quick works here too

Lengths (tokens, drawn per prompt and per completion with a fixed seed, then rounded and clipped):
prompt ~ LogNormal(median 64, σ 0.8) clipped to [8, 512]; completion (EOS included) ~ LogNormal(median 128, σ 0.8)
clipped to [4, 768]; `--completions` completions per prompt, each with its own length, reward ~ N(0, 1) and KTO label
(reward > 0). `--length-scale` multiplies the medians and the bounds. This is an ASSUMED shape, modelled on
UltraFeedback-like preference data (prompts from a few dozen to several hundred tokens, completions up to a thousand
or more); it is not fitted to any data set. `max_length` is set to the longest possible row (prompt bound + completion
bound), so nothing is truncated. Every method's timed region is whole epochs (one warm-up epoch discarded, then
`--epochs` epochs split into interleaved turns), so every method processes the same rows: tokens/s = useful tokens of
the timed epochs / the sum of that method's step periods. The numbers go to
`benchmarks/results/throughput_variable_<cpu|cuda>.json`.
"""

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = {
    "floor": "plain PyTorch floor",
    "rpo": "RPOTrainer",
    "kto": "KTOTrainer",
    "kto_precomputed": "KTOTrainer, precompute_ref_log_probs=True",
    "sft": "SFTTrainer (completion-only loss)",
}
# --workload variable: the methods, the RPOConfig options of each RPO variant, and the assumed length distributions.
VARIABLE_METHODS = {
    "floor": "plain PyTorch floor (padded)",
    "rpo": "RPOTrainer, padded, random order",
    "rpo_grouped": "RPOTrainer, group_by_length",
    "rpo_padding_free": "RPOTrainer, padding_free",
    "rpo_padding_free_grouped": "RPOTrainer, padding_free + group_by_length",
    "kto": "KTOTrainer",
}
RPO_VARIANTS = {
    "rpo": {},
    "rpo_grouped": {"train_sampling_strategy": "group_by_length"},
    "rpo_padding_free": {"padding_free": True},
    "rpo_padding_free_grouped": {"padding_free": True, "train_sampling_strategy": "group_by_length"},
}
PROMPT_LENGTHS = {"median": 64, "sigma": 0.8, "low": 8, "high": 512}
COMPLETION_LENGTHS = {"median": 128, "sigma": 0.8, "low": 4, "high": 768}  # EOS included
ASSUMED_SHAPE = (
    "assumed log-normal shape modelled on UltraFeedback-like data (prompts from a few dozen to several hundred "
    "tokens, completions up to a thousand or more), not fitted to a data set"
)
# Characters that no merge of `trl_rpo.testing.build_tokenizer` involves: one token each, so drawn lengths are exact.
ONE_TOKEN_CHARS = list("jkvxzc ")
MB = 1024**2
WORDS = "the a is of to and what how why answer question good bad yes no maybe sum plus minus equals".split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000, help="model vocabulary (the tokenizer uses the first 320 ids)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=129, help="tokens per row: prompt ≈ 3/4, completion + EOS ≈ 1/4")
    p.add_argument("--prompts", type=int, default=16, help="prompts in the data set, 4 completions each")
    p.add_argument("--warmup", type=int, default=2, help="steps per method, run first and discarded")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-turn", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--methods", default=None, help="default: every method of the workload")
    p.add_argument("--target-pass-repeats", type=int, default=3)
    p.add_argument("--partition-rows", type=int, default=1_000_000)
    p.add_argument("--partition-groups", type=int, default=100_000)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-method memory subprocesses")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model and data, 1 round, no memory")
    p.add_argument("--output", default=None, help="JSON path (default: results/throughput_<cpu|cuda>.json)")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)  # internal: one method, peak RSS
    p.add_argument("--workload", choices=["fixed", "variable"], default="fixed", help="see the module docstring")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the trainers' `bf16=True`); fp32 otherwise")
    p.add_argument("--attention", default="sdpa", help="attn_implementation of every model (e.g. flash_attention_2)")
    p.add_argument("--completions", type=int, default=4, help="variable workload: completions per prompt")
    p.add_argument("--length-scale", type=float, default=1.0, help="variable workload: × length medians and bounds")
    p.add_argument("--epochs", type=int, default=1, help="variable workload: timed epochs (after one warm-up epoch)")
    args = p.parse_args(argv)
    variable = args.workload == "variable"
    if args.quick:
        args.layers, args.hidden, args.vocab, args.batch, args.seq, args.prompts = 1, 32, 512, 4, 33, 2
        args.warmup, args.rounds, args.steps_per_turn, args.memory = 1, 1, 1, False
        args.target_pass_repeats, args.partition_rows, args.partition_groups = 1, 10_000, 1_000
        if variable:
            args.length_scale = min(args.length_scale, 0.25)
    if variable:  # the longest possible row: nothing is truncated
        args.seq = sum(length_bounds(spec, args.length_scale)[2] for spec in (PROMPT_LENGTHS, COMPLETION_LENGTHS))
    known = VARIABLE_METHODS if variable else METHODS
    args.methods = [m for m in (args.methods or ",".join(known)).split(",") if m]
    unknown = set(args.methods) - set(known)
    needed = ["floor", "rpo"] if variable else ["floor"]  # the ratios' references
    if unknown or not set(needed) <= set(args.methods):
        p.error(f"--methods: choose among {list(known)}, {needed} included (got {args.methods})")
    return args


# ---------------------------------------------------------------------------------------------- data, model
def make_rows(tokenizer, num_prompts: int, seq: int) -> dict[str, list]:
    """`num_prompts` prompts × 4 completions; about 3/4 of `seq` tokens of prompt, the rest completion + EOS."""

    def text(rng, num_tokens):
        ids = tokenizer(" ".join(rng.choices(WORDS, k=num_tokens)), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:num_tokens]).strip()

    prompt_tokens = 3 * seq // 4
    rows = {"prompt": [], "completion": [], "reward": [], "label": []}
    for p in range(num_prompts):
        rng = random.Random(p)
        prompt = text(rng, prompt_tokens)
        for reward in (1.0, 0.5, -0.5, -1.0):
            rows["prompt"].append(prompt)
            rows["completion"].append(" " + text(rng, seq - prompt_tokens - 1))  # + EOS
            rows["reward"].append(reward + rng.uniform(-0.1, 0.1))
            rows["label"].append(reward > 0)
    return rows


def length_bounds(spec: dict, scale: float) -> tuple[int, int, int]:
    """(median, low, high) of a length distribution times `scale`; at least 2 tokens (a prompt token, and a completion
    token besides EOS)."""
    return tuple(max(2, round(spec[key] * scale)) for key in ("median", "low", "high"))


def draw_lengths(rng, spec: dict, scale: float, n: int):
    """`n` token counts ~ LogNormal(median, σ), rounded and clipped to [low, high]."""
    import numpy as np

    median, low, high = length_bounds(spec, scale)
    return np.clip(np.rint(rng.lognormal(np.log(median), spec["sigma"], n)), low, high).astype(np.int64)


def make_variable_rows(num_prompts: int, completions: int, scale: float = 1.0, seed: int = 0) -> dict[str, list]:
    """`num_prompts` prompts × `completions` completions of heavy-tailed lengths (see `PROMPT_LENGTHS`,
    `COMPLETION_LENGTHS`), in a shuffled order (KTO reads rows in order). Texts are made of `ONE_TOKEN_CHARS`, so a
    prompt tokenises to exactly `prompt_tokens` tokens and a completion plus EOS to `completion_tokens`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    text = lambda n: "".join(rng.choice(ONE_TOKEN_CHARS, n))  # noqa: E731
    prompt_tokens = np.repeat(draw_lengths(rng, PROMPT_LENGTHS, scale, num_prompts), completions)
    completion_tokens = draw_lengths(rng, COMPLETION_LENGTHS, scale, num_prompts * completions)
    prompts = np.repeat([text(n) for n in prompt_tokens[::completions]], completions)
    rewards = rng.normal(size=len(prompts))
    order = rng.permutation(len(prompts))
    return {
        "prompt": [str(prompts[i]) for i in order],
        "completion": [text(completion_tokens[i] - 1) for i in order],  # the tokenisers append EOS
        "reward": [float(rewards[i]) for i in order],
        "label": [bool(rewards[i] > 0) for i in order],
        "prompt_tokens": [int(prompt_tokens[i]) for i in order],
        "completion_tokens": [int(completion_tokens[i]) for i in order],
    }


def build_model(tokenizer, args):
    from transformers import AutoModelForCausalLM, LlamaConfig, set_seed

    set_seed(0)
    config = LlamaConfig(
        vocab_size=max(args.vocab, len(tokenizer)),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(256, 2 * args.seq),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=args.attention)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def common_args(args, out_dir: str, steps: int) -> dict:
    """The settings every trainer shares (and the floor mirrors)."""
    return {
        "output_dir": out_dir,
        "per_device_train_batch_size": args.batch,
        "max_steps": steps,
        "max_length": args.seq,
        "learning_rate": args.lr,
        "optim": "adamw_torch",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 1.0,
        "gradient_checkpointing": False,
        "bf16": args.bf16,
        "use_cpu": device().type == "cpu",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "logging_steps": 10**6,
        "save_strategy": "no",
        "seed": 0,
    }


# ------------------------------------------------------------------------------------------------ interleaving
class Baton:
    """Round-robin turns between threads: only the holder runs."""

    def __init__(self, names):
        self.order, self.index, self.cond = list(names), 0, threading.Condition()

    def wait(self, name):
        with self.cond:
            self.cond.wait_for(lambda: not self.order or self.order[self.index] == name)

    def pass_on(self, name, finished: bool = False):
        with self.cond:
            i = self.order.index(name)
            if finished:
                self.order.pop(i)
                self.index = i % len(self.order) if self.order else 0
            else:
                self.index = (i + 1) % len(self.order)
            self.cond.notify_all()


class Clock:
    """Per-method step clock. `step_s`: on_step_begin → on_step_end (forward, backward, optimizer step).
    `period_s`: from the end of the previous step (or the resumption of a turn) to the end of this one: also the
    data loading, collation and everything the training loop does between steps. The reported number."""

    def __init__(self, name, baton, turns, threads):
        self.name, self.baton, self.turns, self.threads = name, baton, list(turns), threads
        self.step_s, self.period_s, self._begin, self._last = [], [], None, None
        self._in_turn, self._turn = 0, 0

    def start(self):
        import torch

        torch.set_num_threads(self.threads)  # the thread count is per OS thread in OpenMP; set it here too
        self.baton.wait(self.name)
        self._last = time.perf_counter()

    def begin(self):
        self._begin = time.perf_counter()

    def end(self):
        now = time.perf_counter()
        self.step_s.append(now - self._begin)
        self.period_s.append(now - self._last)
        self._in_turn += 1
        if self._in_turn == self.turns[self._turn] and self._turn + 1 < len(self.turns):
            self._turn, self._in_turn = self._turn + 1, 0
            self.baton.pass_on(self.name)
            self.baton.wait(self.name)
        self._last = time.perf_counter()


def trainer_callback(clock):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.begin()

        def on_step_end(self, *_, **__):
            clock.end()

    return StepClock()


# --------------------------------------------------------------------------------------------- the methods
def completion_logps(model, batch):
    """Mean log-prob of the completion tokens per row, computing the LM head only at the positions that predict a
    completion token: hidden states → those positions → lm_head → log_softmax → gather."""
    import torch

    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    predicts = batch["completion_mask"][:, 1:].bool()  # position i predicts token i + 1
    selected = hidden[:, :-1][predicts]  # (completion tokens, hidden)
    labels = batch["input_ids"][:, 1:][predicts]
    token_logps = torch.log_softmax(model.lm_head(selected).float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    rows = torch.arange(predicts.size(0), device=predicts.device).unsqueeze(1).expand_as(predicts)[predicts]
    sums = torch.zeros(predicts.size(0), dtype=token_logps.dtype, device=predicts.device)
    sums = sums.index_add_(0, rows, token_logps)
    return sums / predicts.sum(-1).clamp(min=1)


def run_floor(model, dataset, collator, args, steps, clock):
    """One forward + backward + gradient clipping + AdamW step per batch; loss ½·mean((mean logp − const)²)."""
    import torch
    from torch.utils.data import DataLoader

    model.to(device())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=collator, num_workers=0)
    clock.start()
    done = 0
    while done < steps:
        for batch in loader:
            clock.begin()
            batch = {key: value.to(device()) for key, value in batch.items()}
            with torch.autocast(device().type, dtype=torch.bfloat16, enabled=args.bf16):
                logps = completion_logps(model, batch)
            loss = 0.5 * (logps - (batch["ref_logps"] + batch["target"])).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock.end()
            done += 1
            if done == steps:
                break


def build_trainers(names, tokenizer, rows, args, work_dir, steps, clocks):
    """Build every trainer (serially, before any timing). Returns {name: (trainer or floor state)}."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    from trl_rpo import RPOConfig, RPOTrainer

    built = {}
    base = lambda name: common_args(args, os.path.join(work_dir, name), steps)  # noqa: E731
    reward_data = Dataset.from_dict({k: rows[k] for k in ("prompt", "completion", "reward")})
    kto_data = Dataset.from_dict({k: rows[k] for k in ("prompt", "completion", "label")})
    sft_data = Dataset.from_dict({k: rows[k] for k in ("prompt", "completion")})
    cb = lambda name: [trainer_callback(clocks[name])] if name in clocks else []  # noqa: E731
    # RPO is always built: its prepared rows (tokens, targets) and collator feed the floor and the target pass.
    built["rpo"] = RPOTrainer(
        model=build_model(tokenizer, args),
        args=RPOConfig(**base("rpo")),
        train_dataset=reward_data,
        processing_class=tokenizer,
        callbacks=cb("rpo"),
    )
    for name in names:
        if name in RPO_VARIANTS and name != "rpo":
            built[name] = RPOTrainer(
                model=build_model(tokenizer, args),
                args=RPOConfig(**base(name), **RPO_VARIANTS[name]),
                train_dataset=reward_data,
                processing_class=tokenizer,
                callbacks=cb(name),
            )
        elif name in ("kto", "kto_precomputed"):
            precompute = name == "kto_precomputed"
            built[name] = KTOTrainer(
                model=build_model(tokenizer, args),
                # A model built in-process has no path to load KTO's default reference from: pass the same weights.
                # With precomputed log-probs KTO keeps no reference (it uses the policy before training).
                ref_model=None if precompute else build_model(tokenizer, args),
                args=KTOConfig(**base(name), precompute_ref_log_probs=precompute),
                train_dataset=kto_data,
                processing_class=tokenizer,
                callbacks=cb(name),
            )
        elif name == "sft":
            built[name] = SFTTrainer(
                model=build_model(tokenizer, args),
                args=SFTConfig(**base(name), completion_only_loss=True, packing=False),
                train_dataset=sft_data,
                processing_class=tokenizer,
                callbacks=cb(name),
            )
    return built


def floor_dataset(rpo):
    columns = ["prompt_ids", "completion_ids", "ref_logps", "target"]
    return rpo.train_dataset.select_columns(columns).with_format(None)


def tokens_per_row(dataset) -> float:
    return statistics.fmean(
        len(p) + len(c) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"], strict=True)
    )


def count_tokens(model, records: list):
    """Append (tokens computed, tokens not padding) for each forward of `model`'s decoder with gradients enabled: the
    training forwards, not the target pass nor KTO's no-grad KL and reference forwards. A padding-free batch has no
    attention mask: all its tokens are useful."""
    import torch

    def hook(_module, _args, kwargs):
        if torch.is_grad_enabled():
            ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
            records.append((ids.numel(), ids.numel() if mask is None else int(mask.sum())))

    return model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def run_interleaved(args, tokenizer, rows, work_dir, turns, also_build=(), token_records=None):
    """Train every method of `args.methods` in its own thread, one at a time, round-robin, `turns` steps per turn.
    Returns the clocks, the trainers (those of `also_build` too) and the floor's model; with `token_records` (a dict),
    fills it with each method's `count_tokens` records."""
    steps = sum(turns)
    baton = Baton(args.methods)
    clocks = {name: Clock(name, baton, turns, args.threads) for name in args.methods}
    names = list(dict.fromkeys([*args.methods, *also_build]))
    built = build_trainers(names, tokenizer, rows, args, work_dir, steps, clocks)
    rpo = built["rpo"]
    floor_model = build_model(tokenizer, args)
    if token_records is not None:
        for name in args.methods:
            count_tokens(floor_model if name == "floor" else built[name].model, token_records.setdefault(name, []))
    errors = {}

    def target(name):
        try:
            if name == "floor":
                run_floor(floor_model, floor_dataset(rpo), rpo.data_collator, args, steps, clocks[name])
            else:
                clocks[name].start()
                built[name].train()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
            errors[name] = e
        finally:
            baton.pass_on(name, finished=True)

    threads = [threading.Thread(target=target, args=(name,), name=name) for name in args.methods]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        name, error = next(iter(errors.items()))
        raise RuntimeError(f"method {name!r} failed") from error
    for name, clock in clocks.items():
        if len(clock.period_s) != steps:
            raise RuntimeError(f"{name}: {len(clock.period_s)} steps timed, {steps} expected")
    return clocks, built, floor_model


def time_steps(args, tokenizer, rows, work_dir) -> dict:
    """The fixed workload: per-step times of every method, interleaved; and the trainers."""
    turns = [args.warmup] + [args.steps_per_turn] * args.rounds
    steps = sum(turns)
    clocks, built, floor_model = run_interleaved(args, tokenizer, rows, work_dir, turns)
    results = {}
    for name, clock in clocks.items():
        kept = slice(args.warmup, None)
        results[name] = {
            "s_per_step_median": statistics.median(clock.period_s[kept]),
            "step_only_s_median": statistics.median(clock.step_s[kept]),
            "s_per_step_all": clock.period_s,
            "step_only_s_all": clock.step_s,
            "round_means": [
                statistics.fmean(clock.period_s[i : i + args.steps_per_turn])
                for i in range(args.warmup, steps, args.steps_per_turn)
            ],
        }
    return results, built, floor_model


# --------------------------------------------------------------------------------- target pass, partition
def time_target_pass(rpo, args) -> dict:
    """RPO's reference pass (`trainer.target_pass.reference_logps`) over the training rows vs plain no-grad forwards
    over the same batches, interleaved."""
    import torch
    from torch.utils.data import DataLoader

    dataset = rpo.train_dataset.select_columns(["prompt_ids", "completion_ids"])
    model = rpo.model

    def plain(head: bool):
        loader = DataLoader(dataset, batch_size=args.batch, collate_fn=rpo.data_collator, shuffle=False)
        model.eval()
        with torch.no_grad():
            for batch in loader:
                if head:  # the floor's computation: LM head only where completion tokens are predicted
                    completion_logps(model, batch)
                else:  # the model's own forward: full logits, nothing else
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        model.train()

    candidates = {
        "rpo_target_pass": lambda: rpo.target_pass.reference_logps(dataset, "benchmark", args.batch, rpo.model),
        "no_grad_forward_full_logits": lambda: plain(head=False),
        "no_grad_forward_completion_head": lambda: plain(head=True),
    }
    times = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up
        fn()
    for _ in range(args.target_pass_repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out = {name: {"s_median": statistics.median(t), "s_all": t} for name, t in times.items()}
    out["rows"] = len(dataset)
    out["batch"] = args.batch
    for ref in ("no_grad_forward_full_logits", "no_grad_forward_completion_head"):
        out[f"ratio_to_{ref}"] = out["rpo_target_pass"]["s_median"] / out[ref]["s_median"]
    return out


def time_partition(args) -> dict:
    """`normalize_rewards` + `rpo_targets` on `--partition-rows` rows in `--partition-groups` prompts."""
    import torch

    from trl_rpo.losses import normalize_rewards, rpo_targets

    g = torch.Generator().manual_seed(0)
    n, k = args.partition_rows, args.partition_groups
    group_ids = torch.randint(-(2**62), 2**62, (k,), generator=g)[torch.randint(0, k, (n,), generator=g)]
    completion_ids = torch.randint(-(2**62), 2**62, (n,), generator=g)
    ref_logps = -torch.rand(n, generator=g, dtype=torch.float64) * 50
    rewards = torch.randn(n, generator=g, dtype=torch.float64)
    targets_s, total_s = [], []
    for i in range(4):
        t0 = time.perf_counter()
        normed, _ = normalize_rewards(rewards, group_ids, mode="global")
        t1 = time.perf_counter()
        rpo_targets(ref_logps, normed, group_ids, completion_ids, beta=5.0)
        t2 = time.perf_counter()
        if i:  # the first is a warm-up
            targets_s.append(t2 - t1)
            total_s.append(t2 - t0)
    return {
        "rows": n,
        "groups": k,
        "rpo_targets_s_median": statistics.median(targets_s),
        "normalize_and_targets_s_median": statistics.median(total_s),
    }


# ------------------------------------------------------------------------------------------ variable workload
def epoch_turns(batches: int, epochs: int, per_turn: int) -> list[int]:
    """One warm-up epoch as the first turn, then `epochs` epochs in turns of `per_turn` steps (the last maybe fewer):
    every method's timed steps then cover the same rows, whatever order its sampler draws them in."""
    timed = epochs * batches
    return [batches] + [per_turn] * (timed // per_turn) + ([timed % per_turn] if timed % per_turn else [])


def time_epochs(args, tokenizer, rows, work_dir):
    """Useful tokens/s of every method over whole epochs, interleaved; and the trainers (the padding-free RPO one is
    always built: the target pass compares it with the padded one)."""
    num_rows, batches = len(rows["prompt"]), -(-len(rows["prompt"]) // args.batch)
    turns = epoch_turns(batches, args.epochs, args.steps_per_turn)
    records = {}
    clocks, built, floor_model = run_interleaved(
        args, tokenizer, rows, work_dir, turns, also_build=["rpo_padding_free"], token_records=records
    )
    for name, trainer in built.items():
        if len(trainer.train_dataset) != num_rows:  # a dropped row would make the token counts differ
            raise RuntimeError(f"{name} kept {len(trainer.train_dataset)} of {num_rows} rows")
    epoch_tokens = int(sum(built["rpo"].train_dataset[built["rpo"].args.length_column_name]))
    results = {}
    for name, clock in clocks.items():
        if len(records[name]) != sum(turns):
            raise RuntimeError(f"{name}: {len(records[name])} training forwards counted, {sum(turns)} expected")
        computed, useful = (sum(column) for column in zip(*records[name][batches:], strict=True))
        seconds = sum(clock.period_s[batches:])
        results[name] = {
            "tokens_per_s": args.epochs * epoch_tokens / seconds,
            "epoch_s": seconds / args.epochs,
            "useful_tokens_timed": useful,  # measured at the decoder's input: equal for all when no row is lost
            "computed_tokens_timed": computed,
            "padding_share": 1 - useful / computed,
            "s_per_step_all": clock.period_s,
            "step_only_s_all": clock.step_s,
        }
    return results, built, floor_model, epoch_tokens, batches


def time_target_passes(built, args) -> dict:
    """RPO's reference pass over every row, interleaved: padded batches of rows in dataset order (how the pass ran
    before it sorted, and how KTOTrainer's precompute runs), padded batches longest first (the default now), and
    padding-free batches; and the tokens each computes."""
    import numpy as np

    trainers = {"padded_in_order": built["rpo"], "padded": built["rpo"], "padding_free": built["rpo_padding_free"]}
    in_order = lambda dataset, start, stop: np.arange(stop - start)  # noqa: E731

    def run(key, trainer):
        target_pass = trainer.target_pass
        if key == "padded_in_order":
            target_pass._scoring_order = in_order  # this instance only, for this pass
        try:
            target_pass.reference_logps(trainer.train_dataset, "benchmark", args.batch, trainer.model)
        finally:
            target_pass.__dict__.pop("_scoring_order", None)

    times = {key: [] for key in trainers}
    for key, trainer in trainers.items():  # warm-up
        run(key, trainer)
    for _ in range(args.target_pass_repeats):
        for key, trainer in trainers.items():
            start = time.perf_counter()
            run(key, trainer)
            times[key].append(time.perf_counter() - start)
    lengths = np.asarray(built["rpo"].train_dataset[built["rpo"].args.length_column_name])
    useful = int(lengths.sum())

    def padded(order):  # tokens of padded batches of `args.batch` rows taken in this order
        return sum(len(b) * int(b.max()) for b in np.split(order, range(args.batch, len(order), args.batch)))

    computed = {"padded_in_order": padded(lengths), "padded": padded(np.sort(lengths)[::-1]), "padding_free": useful}
    out = {
        key: {
            "s_median": statistics.median(t),
            "s_all": t,
            "computed_tokens": computed[key],
            "padding_share": 1 - useful / computed[key],
        }
        for key, t in times.items()
    }
    out |= {"rows": len(lengths), "batch": args.batch, "useful_tokens": useful}
    out["speedup_padding_free"] = out["padded_in_order"]["s_median"] / out["padding_free"]["s_median"]
    out["speedup_longest_first"] = out["padded_in_order"]["s_median"] / out["padded"]["s_median"]
    return out


def variable_ratios(methods: dict, target_pass: dict, epoch_tokens: int) -> dict:
    """Ratios to padded RPO (and of the RPO variants to KTO), end to end with each variant's target pass; the goal."""
    for name, m in methods.items():
        if name in RPO_VARIANTS:
            own_pass = "padding_free" if RPO_VARIANTS[name].get("padding_free") else "padded"
            m["target_pass_s"] = target_pass[own_pass]["s_median"]
            m["end_to_end_tokens_per_s"] = epoch_tokens / (m["target_pass_s"] + m["epoch_s"])
        else:  # KTO computes reference log-probs inside its steps; the floor reads RPO's stored targets
            m["end_to_end_tokens_per_s"] = m["tokens_per_s"] if name == "kto" else None
    rpo, kto = methods["rpo"], methods.get("kto")
    for name, m in methods.items():
        m["ratio_to_rpo"] = m["tokens_per_s"] / rpo["tokens_per_s"]
        m["end_to_end_ratio_to_rpo"] = (
            m["end_to_end_tokens_per_s"] / rpo["end_to_end_tokens_per_s"] if m["end_to_end_tokens_per_s"] else None
        )
        rpo_vs_kto = kto is not None and name in RPO_VARIANTS
        m["ratio_to_kto"] = m["tokens_per_s"] / kto["tokens_per_s"] if rpo_vs_kto else None
        m["end_to_end_ratio_to_kto"] = (
            m["end_to_end_tokens_per_s"] / kto["end_to_end_tokens_per_s"] if rpo_vs_kto else None
        )
    # The padded path as it was before this benchmark's options: random-order batches, target pass in row order.
    before = epoch_tokens / (rpo["epoch_s"] + target_pass["padded_in_order"]["s_median"])
    for name, m in methods.items():
        e2e = m["end_to_end_tokens_per_s"]
        m["end_to_end_ratio_to_padded_in_order"] = e2e / before if e2e and name in RPO_VARIANTS else None
    best = max((name for name in methods if name in RPO_VARIANTS), key=lambda n: methods[n]["end_to_end_tokens_per_s"])
    return {
        "target": "best RPO option >= 1.3x the padded path's useful tokens/s (random-order batches, target pass in "
        "row order), target pass included",
        "padded_in_order_end_to_end_tokens_per_s": before,
        "best_rpo_option": best,
        "end_to_end_ratio_to_padded_in_order": methods[best]["end_to_end_ratio_to_padded_in_order"],
        "end_to_end_ratio_to_rpo": methods[best]["end_to_end_ratio_to_rpo"],
        "training_only_ratio_to_rpo": methods[best]["ratio_to_rpo"],
        "met": methods[best]["end_to_end_ratio_to_padded_in_order"] >= 1.3,
    }


def scaled(spec: dict, scale: float) -> dict:
    return {**dict(zip(("median", "low", "high"), length_bounds(spec, scale), strict=True)), "sigma": spec["sigma"]}


def length_summary(lengths) -> dict:
    import numpy as np

    lengths = np.asarray(lengths)
    quantiles = np.percentile(lengths, [50, 90, 99]).tolist()
    return {"min": int(lengths.min()), "p50": quantiles[0], "p90": quantiles[1], "p99": quantiles[2],
            "max": int(lengths.max()), "mean": float(lengths.mean())}  # fmt: skip


def variable_workload(args, tokenizer) -> dict:
    """Settings, per-method numbers, target pass and goal of `--workload variable`."""
    import datasets

    rows = make_variable_rows(args.prompts, args.completions, args.length_scale)
    with tempfile.TemporaryDirectory() as work_dir:
        datasets.config.HF_DATASETS_CACHE = os.path.join(work_dir, "hf")
        methods, built, floor_model, epoch_tokens, batches = time_epochs(args, tokenizer, rows, work_dir)
        target_pass = time_target_passes(built, args)
        parameters = sum(p.numel() for p in floor_model.parameters())
        del built, floor_model
    memory = measure_memory(args) if args.memory else {}
    for name in methods:
        methods[name] |= memory.get(name, {})
    goal = variable_ratios(methods, target_pass, epoch_tokens)
    settings = {
        **{k: getattr(args, k) for k in ("layers", "hidden", "vocab", "batch", "prompts", "completions", "epochs")},
        **{k: getattr(args, k) for k in ("steps_per_turn", "threads", "lr", "quick", "length_scale")},
        "parameters": parameters,
        "rows": len(rows["prompt"]),
        "max_length": args.seq,
        "warmup_epochs": 1,
        "batches_per_epoch": batches,
        "useful_tokens_per_epoch": epoch_tokens,
        "lengths": {
            "shape": ASSUMED_SHAPE,
            "seed": 0,
            "prompt": {**scaled(PROMPT_LENGTHS, args.length_scale), "drawn": length_summary(rows["prompt_tokens"])},
            "completion": {
                **scaled(COMPLETION_LENGTHS, args.length_scale),
                "eos_included": True,
                "drawn": length_summary(rows["completion_tokens"]),
            },
            "row": length_summary(
                [p + c for p, c in zip(rows["prompt_tokens"], rows["completion_tokens"], strict=True)]
            ),
        },
        "orders": "floor, rpo, rpo_padding_free: reshuffled each epoch; *_grouped: LengthGroupedSampler; kto: "
        "sequential (KTO's default, which its KL term requires) over the once-shuffled rows",
        "dtype": "bfloat16 autocast" if args.bf16 else "float32",
        "attention": args.attention,
        "device": str(device()),
        "gradient_checkpointing": False,
    }
    return {"workload": "variable", "settings": settings, "methods": methods, "target_pass": target_pass, "goal": goal}


def print_variable_table(result: dict) -> None:
    s, lengths = result["settings"], result["settings"]["lengths"]
    prompt, completion = lengths["prompt"], lengths["completion"]
    print(
        f"\nVariable-length workload ({lengths['shape']}): prompt tokens ~ LogNormal(median {prompt['median']}, "
        f"σ {prompt['sigma']}) clipped to [{prompt['low']}, {prompt['high']}], completion tokens (EOS included) ~ "
        f"LogNormal(median {completion['median']}, σ {completion['sigma']}) clipped to [{completion['low']}, "
        f"{completion['high']}]; seed {lengths['seed']}; {s['prompts']} prompts × {s['completions']} completions = "
        f"{s['rows']} rows, row tokens {lengths['row']['min']}–{lengths['row']['max']} (mean "
        f"{lengths['row']['mean']:.0f}); max_length {s['max_length']} (no truncation). {s['layers']}-layer, "
        f"{s['hidden']}-wide Llama, vocab {s['vocab']}, {s['parameters']:,} parameters; batch {s['batch']}; "
        f"{s['dtype']}, {s['attention']} attention, {s['device']}, {s['threads']} thread(s); 1 warm-up epoch, then "
        f"{s['epochs']} timed epoch(s) = "
        f"{s['epochs'] * s['useful_tokens_per_epoch']:,} useful tokens per method, in interleaved turns of "
        f"{s['steps_per_turn']} steps\n"
    )
    print("| method | useful tokens/s | ratio to padded RPO | ratio to KTO | end-to-end tokens/s with target pass "
          "| peak MB (GPU allocated, else RSS) | padding share |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for name, m in result["methods"].items():
        e2e = fmt(m["end_to_end_tokens_per_s"], ",.0f")
        if name in RPO_VARIANTS:
            e2e += f" ({m['end_to_end_ratio_to_rpo']:.2f}× RPO, {fmt(m['end_to_end_ratio_to_kto'], '.2f')}× KTO)"
        print(
            f"| {VARIABLE_METHODS[name]} | {m['tokens_per_s']:,.0f} | {m['ratio_to_rpo']:.2f} | "
            f"{fmt(m['ratio_to_kto'], '.2f')} | {e2e} | {fmt(m.get('peak_gpu_mb') or m.get('peak_rss_mb'), ',.0f')} | "
            f"{m['padding_share']:.1%} |"
        )
    tp, goal = result["target_pass"], result["goal"]
    share = lambda key: f"padding share {tp[key]['padding_share']:.1%}"  # noqa: E731
    print(
        f"\nTarget pass over {tp['rows']} rows (batch {tp['batch']}): padded, rows in order "
        f"{tp['padded_in_order']['s_median']:.3f} s ({share('padded_in_order')}); padded, longest first (the "
        f"default) {tp['padded']['s_median']:.3f} s ({share('padded')}, speed-up {tp['speedup_longest_first']:.2f}×); "
        f"padding-free {tp['padding_free']['s_median']:.3f} s (speed-up {tp['speedup_padding_free']:.2f}×). KTO has "
        "no separate pass (it computes reference log-probs inside its steps): its end-to-end number is its training "
        "number."
    )
    print(
        f"Goal ({goal['target']}): the padded path as it was: {goal['padded_in_order_end_to_end_tokens_per_s']:,.0f} "
        f"tokens/s end to end; best {goal['best_rpo_option']} at {goal['end_to_end_ratio_to_padded_in_order']:.2f}× "
        f"that ({goal['end_to_end_ratio_to_rpo']:.2f}× padded RPO with the longest-first pass; "
        f"{goal['training_only_ratio_to_rpo']:.2f}× in training alone): {'MET' if goal['met'] else 'NOT MET'}"
    )


# ----------------------------------------------------------------------------------------------- memory
def memory_worker(args) -> dict:
    """Run one method alone (warm-up + one turn; for the variable workload one epoch, so every method meets the widest
    batch) and report its peak RSS (`VmHWM`) and that minus the RSS after the imports. Not `ru_maxrss`: Linux
    carries it over from the parent through fork + exec, so a child would report the parent's peak (here, five models
    at once)."""
    import torch
    import trl  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import trl_rpo  # noqa: F401
    from trl_rpo.testing import build_tokenizer

    def rss(field="VmRSS"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))

    torch.set_num_threads(args.threads)
    baseline = rss()
    name = args.memory_worker
    args.methods = [name] if name == "floor" else ["floor", name]
    args.rounds, args.steps_per_turn = 1, args.steps_per_turn
    tokenizer = build_tokenizer()
    if args.workload == "variable":
        rows = make_variable_rows(args.prompts, args.completions, args.length_scale)
        turns = [-(-len(rows["prompt"]) // args.batch)]
    else:
        rows = make_rows(tokenizer, args.prompts, args.seq)
        turns = [args.warmup + args.steps_per_turn]
    with tempfile.TemporaryDirectory() as work_dir:
        import datasets

        datasets.config.HF_DATASETS_CACHE = os.path.join(work_dir, "hf")
        # Only the measured method builds a model: RPO's prepared rows need an RPOTrainer, so for the floor and the
        # others the RPO model is dropped right after its target pass, before anything is measured below.
        baton = Baton([name])
        clock = Clock(name, baton, turns, args.threads)
        built = build_trainers(
            [] if name in ("floor", "rpo") else [name], tokenizer, rows, args, work_dir, turns[0], {name: clock}
        )
        rpo = built["rpo"]
        if name == "floor":
            data, collator = floor_dataset(rpo), rpo.data_collator
            del built["rpo"], rpo
            import gc

            gc.collect()
            clock.start()
            run_floor(build_model(tokenizer, args), data, collator, args, turns[0], clock)
        else:
            if name != "rpo":
                del built["rpo"], rpo
            clock.start()
            built[name].train()
    peak = rss("VmHWM")
    return {
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / MB if torch.cuda.is_available() else None,
        "peak_rss_mb": peak / MB,
        "baseline_rss_mb": baseline / MB,
        "peak_minus_imports_mb": (peak - baseline) / MB,
    }


def measure_memory(args) -> dict:
    out = {}
    for name in args.methods:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", name, "--output", path]
        for flag in ("layers", "hidden", "vocab", "batch", "seq", "prompts", "warmup", "threads"):
            cmd += [f"--{flag}", str(getattr(args, flag))]
        cmd += ["--steps-per-turn", str(args.steps_per_turn), "--lr", str(args.lr), "--attention", args.attention]
        cmd += ["--bf16"] if args.bf16 else []
        if args.workload == "variable":
            cmd += ["--workload", "variable", "--completions", str(args.completions)]
            cmd += ["--length-scale", str(args.length_scale)]
        subprocess.run(cmd, check=True)
        with open(path) as f:
            out[name] = json.load(f)
        os.unlink(path)
    return out


# ---------------------------------------------------------------------------------------------------- main
def ratios(times: dict) -> dict:
    floor, kto = times["floor"]["s_per_step_median"], times.get("kto", {}).get("s_per_step_median")
    out = {}
    for name, t in times.items():
        rounds = zip(t["round_means"], times["floor"]["round_means"], strict=True)
        out[name] = {
            "ratio_to_floor": t["s_per_step_median"] / floor,
            "ratio_to_kto": t["s_per_step_median"] / kto if kto else None,
            # each round's mean over the floor's same round, then the median: a check on the headline ratio
            "ratio_to_floor_per_round_median": statistics.median(a / b for a, b in rounds),
        }
    return out


def print_table(result: dict) -> None:
    s = result["settings"]
    print(
        f"\n{s['layers']}-layer, {s['hidden']}-wide Llama, vocab {s['vocab']}, {s['parameters']:,} parameters; batch "
        f"{s['batch']} rows × {s['tokens_per_row_mean']:.1f} tokens (RPO's tokenisation); fp32, CPU, "
        f"{s['threads']} threads; gradient checkpointing off; AdamW lr {s['lr']}; median of "
        f"{s['rounds'] * s['steps_per_turn']} steps per method after {s['warmup']} warm-up steps, "
        f"{s['rounds']} interleaved rounds\n"
    )
    print("| method | s/step (median) | ratio to floor | ratio to KTO | peak MB | ratio to floor, per round |")
    print("|---|---|---|---|---|---|")
    for name, t in result["methods"].items():
        kto = t["ratio_to_kto"]
        mem = t.get("peak_rss_mb")
        print(
            f"| {METHODS[name]} | {t['s_per_step_median']:.3f} | {t['ratio_to_floor']:.2f} | "
            f"{'-' if kto is None else f'{kto:.2f}'} | {'-' if mem is None else f'{mem:,.0f}'} | "
            f"{t['ratio_to_floor_per_round_median']:.2f} |"
        )
    tp = result["target_pass"]
    print(
        f"\nTarget pass over {tp['rows']} rows (batch {tp['batch']}): RPO {tp['rpo_target_pass']['s_median']:.3f} s; "
        f"no-grad forward with full logits {tp['no_grad_forward_full_logits']['s_median']:.3f} s "
        f"(ratio {tp['ratio_to_no_grad_forward_full_logits']:.2f}); no-grad forward with the LM head at completion "
        f"positions only {tp['no_grad_forward_completion_head']['s_median']:.3f} s "
        f"(ratio {tp['ratio_to_no_grad_forward_completion_head']:.2f})"
    )
    pt = result["partition"]
    print(
        f"Partition maths, {pt['rows']:,} rows / {pt['groups']:,} prompts: rpo_targets "
        f"{pt['rpo_targets_s_median']:.3f} s, normalize_rewards + rpo_targets "
        f"{pt['normalize_and_targets_s_median']:.3f} s"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_worker:
        result = memory_worker(args)
        with open(args.output, "w") as f:
            json.dump(result, f)
        return result

    import datasets

    from trl_rpo.testing import build_tokenizer

    tokenizer = build_tokenizer()
    if args.workload == "variable":
        return main_variable(args, tokenizer)
    rows = make_rows(tokenizer, args.prompts, args.seq)
    with tempfile.TemporaryDirectory() as work_dir:
        datasets.config.HF_DATASETS_CACHE = os.path.join(work_dir, "hf")  # no reference log-probs from a cache
        times, built, floor_model = time_steps(args, tokenizer, rows, work_dir)
        target_pass = time_target_pass(built["rpo"], args)
        settings = {
            **{k: getattr(args, k) for k in ("layers", "hidden", "vocab", "batch", "seq", "prompts", "warmup")},
            **{k: getattr(args, k) for k in ("rounds", "steps_per_turn", "threads", "lr", "quick")},
            "parameters": sum(p.numel() for p in floor_model.parameters()),
            "tokens_per_row_mean": tokens_per_row(built["rpo"].train_dataset),
            "rows": len(rows["prompt"]),
            "dtype": "float32",
            "gradient_checkpointing": False,
            "optimizer": "AdamW (torch, foreach), weight decay 0, constant lr, grad-norm clipping 1.0",
            "floor_head": "hidden states -> completion positions -> lm_head -> log_softmax -> gather",
        }
        del built, floor_model
    partition = time_partition(args)
    memory = measure_memory(args) if args.memory else {}
    methods = {}
    for name, r in ratios(times).items():
        methods[name] = {**times[name], **r, **memory.get(name, {})}
    result = {
        **environment(),
        "settings": settings,
        "methods": methods,
        "target_pass": target_pass,
        "partition": partition,
    }
    print_table(result)
    write_result(result, args, "throughput")
    return result


def main_variable(args, tokenizer) -> dict:
    result = {**environment(), **variable_workload(args, tokenizer)}
    print_variable_table(result)
    write_result(result, args, "throughput_variable")
    return result


def environment() -> dict:
    import datasets
    import torch
    import transformers
    import trl

    return {
        "date": str(date.today()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "datasets": datasets.__version__,
        },
    }


def write_result(result: dict, args, stem: str) -> None:
    """`--output`, else `results/<stem>_<cpu|cuda>.json`; a `--quick` run without `--output` writes to the temp dir."""
    import torch

    output = args.output or os.path.join(RESULTS_DIR, f"{stem}_{'cuda' if torch.cuda.is_available() else 'cpu'}.json")
    if args.quick and args.output is None:
        output = os.path.join(tempfile.gettempdir(), f"{stem}_quick.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
