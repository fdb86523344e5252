"""`trl-rpo generate`: sample N completions per prompt for RPO (batched, sharded under accelerate, resumable).

```bash
trl-rpo generate --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name prompts.jsonl --output_dir samples \
    --num_generations 8 --max_completion_length 256
trl-rpo generate --accelerate_config multi_gpu --num_processes 4 --model_name_or_path ... --output_dir samples
```
"""

from dataclasses import dataclass, field

from accelerate import PartialState
from trl import TrlParser

from ..generation import COMPLETIONS_FILE, generate_completions
from .arguments import DatasetArguments, OutputArguments, SamplingArguments, require
from .launch import relaunch


@dataclass
class GenerateArguments(DatasetArguments, SamplingArguments, OutputArguments):
    """Arguments of `trl-rpo generate`: the prompts, the sampling settings, the model; see [`generate_completions`]
    for what each setting does."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model to sample from (id or folder): causal LM or encoder-decoder (required)."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Model revision on the Hub."})
    adapter_name_or_path: str | None = field(
        default=None, metadata={"help": "PEFT (LoRA) adapter folder applied to the model before sampling."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed of the sampling."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16."})
    backend: str = field(
        default="transformers",
        metadata={"help": "transformers, or vllm (one process, a CUDA GPU, `pip install vllm`; not tested here)."},
    )
    use_vllm: bool = field(default=False, metadata={"help": "GRPOConfig's name for `--backend vllm`."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


def make_parser() -> TrlParser:
    return TrlParser(
        (GenerateArguments,),
        prog="trl-rpo generate",
        allow_abbrev=False,
        description="Sample N completions per prompt for RPO: batched, sharded under accelerate, resumable.",
    )


def run(argv: list[str]) -> None:
    """`trl-rpo generate ARGS`; with `--accelerate_config NAME|PATH` it relaunches itself under `accelerate launch`."""
    parser = make_parser()
    if "--accelerate_config" in argv:
        relaunch(parser, argv, "generate")
        return
    (args,) = parser.parse_args_and_config(argv)
    require(args, "output_dir", "model_name_or_path")
    rows = generate_completions(
        args.load(),
        model=args.model_name_or_path,
        output_dir=args.output_dir,
        **args.sampling_kwargs(),
        seed=args.seed,
        adapter=args.adapter_name_or_path,
        revision=args.model_revision,
        dtype=args.dtype,
        backend="vllm" if args.use_vllm else args.backend,
        trust_remote_code=args.trust_remote_code,
    )
    state = PartialState()
    state.print(
        f"✅ {len(rows)} completions on {state.num_processes} process(es): {args.output_dir}/{COMPLETIONS_FILE}"
    )
    state.wait_for_everyone()  # every rank leaves together, then the group goes: no rank waits at exit for another
    state.destroy_process_group()
