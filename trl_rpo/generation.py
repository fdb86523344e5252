"""Sample completions for RPO: N samples per prompt from a model, batched, sharded across processes, resumable.

[`generate_completions`] (the `trl-rpo generate` command) is the first step of the path from prompts and a reward to
a trained model: generate → [`~trl_rpo.score_completions`] (`trl-rpo score`) → [`RPOTrainer`]. It writes, in
`output_dir`:

- `shards/rank-<k>.jsonl`: the rows of process k, appended and flushed after every batch, so an interrupted run
  resumes where it stopped (a prompt whose samples are all in a shard is not generated again);
- `generation_config.json`: the sampling settings, recorded when the run starts; a resumed run must use the same;
- `completions.jsonl`: every row, ordered by prompt then sample, written at the end: each prompt row's columns plus
  `completion`, `prompt_index`, `sample_index` and `finished` (False when the sample reached `max_new_tokens` before
  an end-of-sequence token). `RPOTrainer` reads it once a `reward` column is added.

RPO's Monte-Carlo partition estimator (`partition_estimator="monte_carlo"`) assumes the completions of a prompt are
samples of the reference policy π_ref, i.e. of the model generating them, at temperature 1 and with no top-p/top-k
truncation. Other settings sample from another distribution; the empirical estimator (`"empirical"`, the default)
makes no assumption on where the completions come from and is then the one to use.
"""

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import parse_flag_from_env
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    set_seed,
)
from trl.trainer.utils import pad

from .data import describe_rows, prompt_key, prompt_rows, prompts_digest, render_prompt_ids
from .files import write_json, write_text
from .version import __version__


logger = get_logger(__name__)

BACKENDS = ("transformers", "vllm")
COMPLETIONS_FILE = "completions.jsonl"
GENERATION_CONFIG_FILE = "generation_config.json"
SHARDS_FOLDER = "shards"
# What a resumed run must share with the run that wrote the output folder.
RESUME_KEYS = (
    "model", "revision", "adapter", "dtype", "temperature", "top_p", "top_k", "max_new_tokens", "num_generations",
    "seed", "backend", "num_prompts", "prompts_digest",
)  # fmt: skip


@dataclass(frozen=True)
class SamplingSettings:
    """What determines the samples; recorded in `generation_config.json` and compared when a run resumes."""

    model: str
    revision: str | None
    adapter: str | None
    dtype: str
    temperature: float
    top_p: float
    top_k: int | None
    max_new_tokens: int
    num_generations: int
    seed: int
    backend: str

    def __post_init__(self):
        checks = {
            "num_generations": self.num_generations >= 1,
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k is None or self.top_k >= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(
                    f"`{name}={getattr(self, name)!r}` is invalid: use num_generations >= 1, temperature > 0, "
                    "0 < top_p <= 1, top_k >= 1 (or None: no top-k), max_new_tokens >= 1."
                )
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend={self.backend!r}` is unknown: use one of {list(BACKENDS)}.")

    @property
    def samples_reference(self) -> bool:
        """Whether the samples follow the model's own distribution (what the Monte-Carlo estimator assumes)."""
        return self.temperature == 1 and self.top_p == 1 and self.top_k is None


def generate_completions(
    dataset: Dataset,
    model: str,
    output_dir: str | os.PathLike,
    *,
    num_generations: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    adapter: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    backend: str = "transformers",
    trust_remote_code: bool = False,
) -> Dataset:
    r"""
    Sample `num_generations` completions per prompt from `model` and return them as `prompt`/`completion` rows.

    Under `accelerate launch` the pending prompts are split into contiguous shares, one per process; each process
    appends its rows to `<output_dir>/shards/rank-<k>.jsonl` after every batch. Calling again with the same
    `output_dir` resumes: prompts whose samples are all in the shards are skipped (a partly written prompt is
    sampled again), and a call with other settings or other prompts is refused. At the end the main process writes
    `<output_dir>/completions.jsonl` (rows ordered by `prompt_index`, then `sample_index`) next to
    `<output_dir>/generation_config.json`, which records the settings.

    The samples follow exactly the settings given here: the sampling defaults a model ships in its own
    `generation_config.json` (e.g. a temperature of 0.7, top-k 20 or a repetition penalty) are not applied.

    > [!WARNING]
    > RPO's Monte-Carlo partition estimator (`RPOConfig(partition_estimator="monte_carlo")`) is consistent only when
    > the completions are samples of the reference policy: generated by the model you will train from, at
    > `temperature=1`, `top_p=1` and `top_k=None`. Other settings (warned about) sample another distribution; then
    > train with the empirical estimator (`"empirical"`, the default), which does not assume where completions come
    > from.

    Args:
        dataset ([`~datasets.Dataset`]):
            The prompts: a `prompt` column (strings, or conversational lists of `{"role", "content"}` messages, which
            get the tokenizer's chat template with the generation prompt, as `RPOTrainer` renders them). A dataset in
            one of `RPOTrainer`'s formats (`prompt`/`completion`/`reward`, `label`, `completions`/`rewards`, paired
            `chosen`/`rejected` with or without `prompt`) gives its distinct prompts, in order of first appearance.
            Every other column of a prompt row (e.g. a reference answer for a reward function) is copied onto each
            of its generated rows; from a trainer-format dataset, only the columns that are the same on all rows of
            a prompt are, as the others describe completions. `tools` and `chat_template_kwargs` columns go to the
            chat template, as in TRL.
        model (`str`):
            Model id or local folder: a causal language model, or an encoder-decoder model (e.g. Flan-T5). Its
            tokenizer is loaded from the same place.
        output_dir (`str` or `os.PathLike`):
            Folder for the shards, `completions.jsonl` and `generation_config.json`; reuse it to resume.
        num_generations (`int`, *optional*, defaults to `4`):
            Completions sampled per prompt.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; 1 samples the model's distribution.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling mass; 1 keeps every token.
        top_k (`int` or `None`, *optional*, defaults to `None`):
            Keep only the k most likely tokens at each step; `None` keeps every token.
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Longest completion, in tokens. A completion cut there has no EOS; their count is logged, and `RPOTrainer`
            appends an EOS to standard completions, so choose a length that lets most samples finish.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per `generate` call, per process (each gives `num_generations` sequences). Not part of the
            recorded settings: a run may resume with another batch size.
        seed (`int`, *optional*, defaults to `0`):
            Each batch is seeded from `seed` and the index of its first prompt, so a run is reproducible for a given
            number of processes and batch size.
        adapter (`str`, *optional*):
            A PEFT (LoRA) adapter folder applied to `model` before sampling, e.g. the output of an RPO LoRA run.
        revision (`str`, *optional*):
            Model revision (branch, tag or commit) on the Hub.
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weights dtype: `"auto"` (the checkpoint's), `"float32"`, `"bfloat16"` or `"float16"`.
        backend (`str`, *optional*, defaults to `"transformers"`):
            `"transformers"` (batched `model.generate`, left padding) or `"vllm"` (one process, a CUDA GPU and the
            `vllm` package; not tested by this project's CI).
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow custom model code from the Hub.

    Returns:
        [`~datasets.Dataset`]: the rows of `completions.jsonl`: the prompt row's columns, `completion` (a string, or
        `[{"role": "assistant", "content": ...}]` for conversational prompts), `prompt_index`, `sample_index` and
        `finished` (whether the sample ended with an end-of-sequence token rather than at `max_new_tokens`).

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from trl_rpo import generate_completions
    >>> prompts = Dataset.from_dict({"prompt": ["2 + 2 =", "3 + 5 ="], "answer": ["4", "8"]})
    >>> samples = generate_completions(prompts, model="Qwen/Qwen2.5-0.5B", output_dir="samples", max_new_tokens=8)
    >>> samples.column_names
    ['prompt', 'answer', 'completion', 'prompt_index', 'sample_index', 'finished']
    ```
    """
    settings = SamplingSettings(
        model=os.path.abspath(model) if os.path.isdir(model) else model,
        revision=revision,
        adapter=os.path.abspath(adapter) if adapter and os.path.isdir(adapter) else adapter,
        dtype=dtype,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=top_k or None,  # 0 means "no top-k" to transformers and vLLM
        max_new_tokens=max_new_tokens,
        num_generations=num_generations,
        seed=seed,
        backend=backend,
    )
    if batch_size < 1:
        raise ValueError(f"`batch_size={batch_size}` is invalid: use a positive number of prompts per batch.")
    state = process_state()
    if backend == "vllm":
        _check_vllm(state)
    prompts = prompt_rows(dataset)
    _warn_unless_reference_samples(settings)
    output_dir = Path(output_dir)
    record = {**asdict(settings), "num_prompts": len(prompts), "prompts_digest": prompts_digest(prompts)}
    _check_resumable(output_dir, record)
    pending = [i for i in range(len(prompts)) if i not in _complete_groups(output_dir, prompts, num_generations)]
    state.wait_for_everyone()  # every process has read the shards before any appends to them
    if state.is_main_process:
        _write_generation_config(output_dir, record)
        logger.info(
            f"{len(pending)} of {len(prompts)} prompts left to sample in {output_dir} "
            f"({len(prompts) - len(pending)} already sampled)."
        )
    with state.split_between_processes(pending) as share:
        if share:
            _generate_share(prompts, share, settings, output_dir, batch_size, trust_remote_code, state)
    state.wait_for_everyone()
    if state.is_main_process:
        _merge_shards(output_dir, prompts, num_generations)
    state.wait_for_everyone()
    return Dataset.from_json(str(output_dir / COMPLETIONS_FILE))


def _warn_unless_reference_samples(settings: SamplingSettings) -> None:
    if not settings.samples_reference:
        logger.warning(
            f"Sampling with temperature={settings.temperature}, top_p={settings.top_p}, top_k={settings.top_k}: the "
            "completions come from a different distribution than the model's own (π_ref at temperature 1, no top-p/"
            "top-k truncation), so RPO's Monte-Carlo partition estimator (partition_estimator='monte_carlo') is not "
            "consistent on them. Train with partition_estimator='empirical' (the default), or sample at "
            "temperature=1, top_p=1, top_k=None."
        )


def process_state() -> PartialState:
    """
    accelerate's state of this process. On a machine without GPU, processes started by `accelerate launch` form one
    (gloo) group only when `ACCELERATE_USE_CPU=true`, which accelerate's `AcceleratorState` and the trainers read and
    `PartialState` alone does not: read it here too, and refuse to let each process sample every prompt.
    """
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise RuntimeError(
            f"accelerate launched {launched} processes, but they do not form one group ({state.num_processes} seen), "
            "so each would sample every prompt. On a machine without GPU, set ACCELERATE_USE_CPU=true (e.g. "
            "`ACCELERATE_USE_CPU=true trl-rpo generate --accelerate_config multi_cpu ...`)."
        )
    return state


# ------------------------------------------------------------------------------------------ output folder, resume
def _check_resumable(output_dir: Path, record: dict) -> None:
    path = output_dir / GENERATION_CONFIG_FILE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        recorded = error
    if not isinstance(recorded, dict):
        raise ValueError(
            f"The generation record {path} is damaged ({recorded}), so nothing says which settings made the samples "
            f"in {output_dir}. Restore the file, or move {output_dir} away to sample again."
        )
    differing = [key for key in RESUME_KEYS if recorded.get(key) != record[key]]
    if differing:
        described = "; ".join(
            "different prompts"
            if key == "prompts_digest"
            else f"{key}={recorded.get(key)!r} there, {record[key]!r} now"
            for key in differing
        )
        raise ValueError(
            f"{output_dir} holds a generation run with other settings ({described}). Resume it with the same settings "
            "and prompts, or pass another `output_dir` to start a new run."
        )


def _write_generation_config(output_dir: Path, record: dict) -> None:

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / GENERATION_CONFIG_FILE
    if not path.is_file():
        write_json(path, {**record, "trl_rpo_version": __version__})


def _shard_lines(shard: Path, prompt_keys: list[str], num_generations: int):
    """The rows of a shard, in order. A line cut by an interruption, or one that is not a sample of these prompts
    (damaged bytes, another program's output), is skipped and counted: its prompt is sampled again."""
    damaged = 0
    for line in shard.read_bytes().splitlines():
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if _is_sample(row, prompt_keys, num_generations):
            yield row
        elif line.strip():
            damaged += 1
    if damaged:
        logger.warning(
            f"Skipped {damaged} damaged line(s) of {shard} (not JSON, or not a sample of these prompts): the prompts "
            "they belonged to are sampled again."
        )


def _is_sample(row, prompt_keys: list[str], num_generations: int) -> bool:
    if not isinstance(row, dict) or "completion" not in row or not isinstance(row.get("finished"), bool):
        return False
    index, sample = row.get("prompt_index"), row.get("sample_index")
    if not (isinstance(index, int) and isinstance(sample, int)):
        return False
    return 0 <= index < len(prompt_keys) and 0 <= sample < num_generations and prompt_key(row) == prompt_keys[index]


def _complete_groups(output_dir: Path, prompts: list[dict], num_generations: int) -> dict[int, list[dict]]:
    """
    The rows of each prompt whose samples are all in the shards. A prompt's samples are written together, in order, so
    a complete group is a run of consecutive rows with sample indices 0 … n-1; the rows a cut write left behind form a
    shorter run, and that prompt is sampled again (its new rows come later in the same shard).
    """
    keys = [prompt_key(row) for row in prompts]
    complete: dict[int, list[dict]] = {}
    for shard in sorted((output_dir / SHARDS_FOLDER).glob("*.jsonl")):
        run: list[dict] = []
        for row in _shard_lines(shard, keys, num_generations):
            if run and (row["prompt_index"], row["sample_index"]) != (run[0]["prompt_index"], len(run)):
                run = []
            if run or row["sample_index"] == 0:
                run.append(row)
            if len(run) == num_generations:
                complete.setdefault(run[0]["prompt_index"], run)
                run = []
    return complete


def _merge_shards(output_dir: Path, prompts: list[dict], num_generations: int) -> None:
    num_prompts = len(prompts)
    complete = _complete_groups(output_dir, prompts, num_generations)
    missing = [i for i in range(num_prompts) if i not in complete]
    if missing:
        raise RuntimeError(f"Prompts {describe_rows(missing)} have no complete samples in {output_dir / 'shards'}.")
    lines = (json.dumps(row, ensure_ascii=False) + "\n" for i in range(num_prompts) for row in complete[i])
    write_text(output_dir / COMPLETIONS_FILE, "".join(lines))
    logger.info(f"Wrote {num_prompts * num_generations} rows to {output_dir / COMPLETIONS_FILE}.")


def _open_shard(output_dir: Path, rank: int):
    """This process's shard, opened for appending after cutting a line an interruption left unfinished."""
    path = output_dir / SHARDS_FOLDER / f"rank-{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as file:
                file.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- sampling
def _generate_share(
    prompts: list[dict],
    share: list[int],
    settings: SamplingSettings,
    output_dir: Path,
    batch_size: int,
    trust_remote_code: bool,
    state: PartialState,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(
        settings.model, revision=settings.revision, trust_remote_code=trust_remote_code
    )
    conversational = isinstance(prompts[0]["prompt"], list)
    if conversational and tokenizer.chat_template is None:
        raise ValueError(
            f"The prompts are conversational but the tokenizer of {settings.model} has no chat template. Set one "
            "(`tokenizer.chat_template = ...`, saved with the model), or give the prompts as strings."
        )
    sample = (_vllm_sampler if settings.backend == "vllm" else _transformers_sampler)(
        settings, tokenizer, trust_remote_code, state.device
    )
    truncated = 0
    with (
        _open_shard(output_dir, state.process_index) as shard,
        tqdm(total=len(share), desc="Generating", unit="prompt", disable=not state.is_local_main_process) as progress,
    ):
        for start in range(0, len(share), batch_size):
            indices = share[start : start + batch_size]
            rows = [prompts[i] for i in indices]
            sequences = sample(
                [render_prompt_ids(tokenizer, row) for row in rows], _batch_seed(settings.seed, indices[0])
            )
            truncated += sum(not finished for _, finished in sequences)
            texts = tokenizer.batch_decode([ids for ids, _ in sequences], skip_special_tokens=True)
            finished = [done for _, done in sequences]
            lines = _output_lines(rows, indices, texts, finished, settings.num_generations, conversational)
            shard.write("".join(lines))
            shard.flush()  # what is written survives an interruption: a resumed run skips these prompts
            progress.update(len(indices))
    if truncated:
        logger.warning(
            f"{truncated} of {len(share) * settings.num_generations} samples of process {state.process_index} reached "
            f"max_new_tokens={settings.max_new_tokens} before an end-of-sequence token. RPOTrainer trains them as "
            "finished answers (it appends EOS, or the chat template ends the turn): raise max_new_tokens, or filter "
            "them out.",
            main_process_only=False,
        )


def _batch_seed(seed: int, first_prompt: int) -> int:
    """A seed per batch that depends on the run's seed and on where the batch starts, not on the process."""
    digest = hashlib.blake2b(f"{seed}:{first_prompt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _output_lines(
    rows: list[dict], indices: list[int], texts: list[str], finished: list[bool], n: int, conversational: bool
) -> list[str]:
    lines = []
    for position, (row, prompt_index) in enumerate(zip(rows, indices, strict=True)):
        for sample_index in range(n):
            text, done = texts[position * n + sample_index], finished[position * n + sample_index]
            completion = [{"role": "assistant", "content": text}] if conversational else text
            out = {**row, "completion": completion, "prompt_index": prompt_index, "sample_index": sample_index}
            out["finished"] = done
            lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    return lines


def _load_model(settings: SamplingSettings, trust_remote_code: bool) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(
        settings.model, revision=settings.revision, trust_remote_code=trust_remote_code
    )
    auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto_class.from_pretrained(
        settings.model, revision=settings.revision, dtype=settings.dtype, trust_remote_code=trust_remote_code
    )
    if settings.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, settings.adapter).merge_and_unload()  # merged: plain, faster forward
    return model.eval()


def _eos_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos)


def _transformers_sampler(settings: SamplingSettings, tokenizer, trust_remote_code: bool, device):
    """A function `(prompt ids, seed) -> [(completion ids, finished)]`, `num_generations` per prompt, in order."""
    model = _load_model(settings, trust_remote_code).to(device)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    encoder_decoder = model.config.is_encoder_decoder
    # A fresh configuration, not the model's: its sampling defaults (temperature, top-k, repetition penalty, …) would
    # change the distribution the recorded settings describe. `top_k=0` switches off transformers' default of 50.
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k or 0,
        max_new_tokens=settings.max_new_tokens,
        num_return_sequences=settings.num_generations,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=model.generation_config.bos_token_id,
        decoder_start_token_id=model.generation_config.decoder_start_token_id,
    )
    model.generation_config = generation_config  # so `generate` does not fill unset values from the model's

    def sample(prompt_ids: list[list[int]], seed: int) -> list[tuple[list[int], bool]]:
        # Causal models continue the prompt, so it is padded on the left; an encoder reads it whole (right padding).
        side = "right" if encoder_decoder else "left"
        input_ids = pad([torch.tensor(ids) for ids in prompt_ids], padding_value=pad_id, padding_side=side)
        mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], padding_value=0, padding_side=side)
        set_seed(seed)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device))
        new_tokens = output[:, 1:] if encoder_decoder else output[:, input_ids.shape[1] :]  # 1: decoder start token
        return [_until_eos(ids, eos_ids) for ids in new_tokens.tolist()]

    return sample


def _until_eos(ids: list[int], eos_ids: list[int]) -> tuple[list[int], bool]:
    """The tokens before the first EOS, and whether there was one (else the sample hit `max_new_tokens`)."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position], True
    return ids, False


# ------------------------------------------------------------------------------------------------------- vLLM
VLLM_HELP = "Install vLLM (`pip install vllm`, on a machine with a CUDA GPU) or use backend='transformers'."


def _check_vllm(state: PartialState) -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"backend='vllm' needs the `vllm` package, which is not installed. {VLLM_HELP}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"backend='vllm' needs a CUDA GPU, and none is visible. {VLLM_HELP}")
    if state.num_processes > 1:
        raise ValueError(
            "backend='vllm' runs in one process (vLLM spreads a model over GPUs itself, with tensor parallelism). "
            "Run `trl-rpo generate --backend vllm` without accelerate, or use backend='transformers' to shard."
        )


def _vllm_sampler(settings: SamplingSettings, tokenizer, trust_remote_code: bool, device):
    """The vLLM version of [`_transformers_sampler`]: same prompt token ids, same settings. Not run by this project's
    tests (no GPU, no vLLM there)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=settings.model,
        revision=settings.revision,
        dtype=settings.dtype,
        seed=settings.seed,
        trust_remote_code=trust_remote_code,
        enable_lora=settings.adapter is not None,
        generation_config="vllm",  # vLLM's neutral defaults, not the model's own sampling settings
    )
    lora_request = None
    if settings.adapter:
        from vllm.lora.request import LoRARequest

        lora_request = LoRARequest("adapter", 1, settings.adapter)

    def sample(prompt_ids: list[list[int]], seed: int) -> list[tuple[list[int], bool]]:
        params = SamplingParams(
            n=settings.num_generations,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k or -1,  # -1: no top-k
            max_tokens=settings.max_new_tokens,
            seed=seed,
        )
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = llm.generate(requests, params, lora_request=lora_request, use_tqdm=False)
        return [(list(c.token_ids), c.finish_reason == "stop") for output in outputs for c in output.outputs]

    return sample
