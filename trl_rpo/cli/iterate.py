"""`trl-rpo iterate`: iterative RPO. Each round samples from the current policy, scores, and trains with it as the
reference (Monte-Carlo partition); the per-round table is printed.

```bash
trl-rpo iterate --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name prompts.jsonl --output_dir qwen-iter \
    --reward_funcs rewards.py:exact_answer --rounds 3 --num_generations 8 --eval_dataset_name held_out.jsonl
```
"""

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from ..iterate import QUANTIZED_ROUNDS, iterate_rpo, rounds_table
from ..rpo_config import RPOConfig
from .arguments import DatasetArguments, RewardSourceArguments, SamplingArguments, require, set_model_init_kwargs


@dataclass
class IterateArguments(DatasetArguments, SamplingArguments, RewardSourceArguments):
    """
    Arguments of `trl-rpo iterate` besides `RPOConfig`'s (each round's training, `output_dir` included) and
    `ModelConfig`'s (the initial model, LoRA): the training prompts (read as `trl-rpo generate` reads them), the
    sampling settings (`trl-rpo generate`'s), the reward sources (`trl-rpo score`'s) and the rounds; see
    [`iterate_rpo`].
    """

    rounds: int = field(default=2, metadata={"help": "Rounds of sample → score → train."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Held-out prompts (a file or folder): each round's policy is scored on them."}
    )
    eval_num_generations: int = field(default=1, metadata={"help": "Samples per held-out prompt."})
    anchor_to_initial_reference: bool = field(
        default=False,
        metadata={"help": "Keep the initial model as every round's reference (empirical partition estimator)."},
    )


def make_parser() -> TrlParser:
    return TrlParser(
        (IterateArguments, RPOConfig, ModelConfig),
        prog="trl-rpo iterate",
        allow_abbrev=False,
        description=(
            "Iterative RPO: each round samples from the current policy, scores, and trains with it as the reference "
            "(Monte-Carlo partition). Prints the per-round table."
        ),
    )


def run(argv: list[str]) -> None:
    """`trl-rpo iterate ARGS`: run the rounds (one process) and print the per-round table."""
    args, training_args, model_args = make_parser().parse_args_and_config(argv)
    require(args, "dataset_name")
    require(model_args, "model_name_or_path")
    if get_quantization_config(model_args) is not None:
        raise ValueError(QUANTIZED_ROUNDS)
    set_model_init_kwargs(training_args, model_args)  # dtype, revision, attention: honoured by every round
    sampling = args.sampling_kwargs()
    eval_prompts = args.load(name=args.eval_dataset_name, split="train") if args.eval_dataset_name else None
    results = iterate_rpo(
        model_args.model_name_or_path,
        args.load(),
        training_args,
        rounds=args.rounds,
        reward_funcs=args.reward_funcs,
        reward_model=args.reward_model_name_or_path,
        reward_weights=args.reward_weights,
        num_generations=sampling.pop("num_generations"),
        eval_prompts=eval_prompts,
        eval_num_generations=args.eval_num_generations,
        peft_config=get_peft_config(model_args),
        anchor_to_initial_reference=args.anchor_to_initial_reference,
        generation_kwargs=sampling,
    )
    print(rounds_table(results))
