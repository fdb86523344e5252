"""`trl-rpo` (training): RPO from the command line or a YAML recipe, the way `trl kto` trains KTO.

```bash
trl-rpo --config recipes/flan-t5-small/rpo/config_full.yaml
trl-rpo --config recipes/flan-t5-small/rpo/config_full.yaml --learning_rate 5e-5 --output_dir data/my-run
trl-rpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name path/to/rows.jsonl --output_dir qwen-rpo
trl-rpo --accelerate_config multi_gpu --num_processes 4 --config recipes/flan-t5-large/rpo/config_full.yaml
accelerate launch --config_file recipes/accelerate_configs/zero3.yaml -m trl_rpo.cli --config ...
```

The arguments are the fields of [`RPOScriptArguments`], [`RPOConfig`], [`~trl.ModelConfig`] and
[`~trl.DatasetMixtureConfig`]; `trl-rpo --help` lists them. YAML keys set the defaults, command-line flags override
them, and an unknown key or flag is an error.
"""

import argparse
import gc
import os

from trl import DatasetMixtureConfig, ModelConfig, TrlParser, get_peft_config, get_quantization_config

from ..rpo_config import RPOConfig
from ..rpo_trainer import RPOTrainer
from .arguments import RPOScriptArguments, load_rpo_dataset, set_model_init_kwargs, split_of
from .launch import relaunch


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`HfArgumentParser`'s defaults in the option help, and the subcommand list kept as written."""


SUBCOMMANDS_HELP = """subcommands (each with its own --help):
  trl-rpo generate   sample N completions per prompt from a model (batched, resumable, multi-process)
  trl-rpo score      add a reward column from reward functions and/or a reward model
  trl-rpo iterate    rounds of generate → score → train, each round's policy the next one's reference
  trl-rpo [options]  train (this command; the options below)

add --traceback to see where an error was raised"""


def make_parser(prog: str | None = None) -> TrlParser:
    """The `trl-rpo` parser, over `RPOScriptArguments`, `RPOConfig`, `ModelConfig` and `DatasetMixtureConfig`."""
    return TrlParser(
        (RPOScriptArguments, RPOConfig, ModelConfig, DatasetMixtureConfig),
        prog=prog or "trl-rpo",
        allow_abbrev=False,  # a misspelled flag is an error, never a prefix match of another one
        description="Train a model with Reward Partitioning Optimization (RPO, Faye et al., arXiv 2506.13702) on\n"
        "(prompt, completion, reward) rows. Pass a YAML recipe with --config; flags override its keys.\n\n"
        + SUBCOMMANDS_HELP,
        formatter_class=_HelpFormatter,
    )


def run(argv: list[str]) -> None:
    """`trl-rpo ARGS`: parse and train; with `--accelerate_config NAME|PATH`, relaunch under `accelerate launch`."""
    parser = make_parser()
    if "--accelerate_config" in argv:
        relaunch(parser, argv)
    else:
        main(*parser.parse_args_and_config(argv))


def _hub_dataset_id(script_args: RPOScriptArguments, dataset_args: DatasetMixtureConfig) -> str | None:
    """The Hub id of the training data for the model card, or `None` for local data or a mixture of several."""
    paths = [d.path for d in dataset_args.datasets] if dataset_args.datasets else [script_args.dataset_name]
    if len(paths) != 1 or paths[0] is None or os.path.exists(paths[0]):
        return None
    return paths[0]


def main(
    script_args: RPOScriptArguments,
    training_args: RPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig,
) -> None:
    """Train with RPO, save the model (and its model card) to `output_dir`, and push it to the Hub if asked."""
    set_model_init_kwargs(training_args, model_args)

    # Dataset
    dataset = load_rpo_dataset(script_args, dataset_args)
    train_dataset = split_of(dataset, script_args.dataset_train_split, "dataset_train_split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = split_of(dataset, script_args.dataset_test_split, "dataset_test_split")

    # Training
    trainer = RPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    accelerator = trainer.accelerator
    how = f" ({accelerator.distributed_type.value})" if accelerator.num_processes > 1 else ""
    accelerator.print(f"✅ Training completed on {accelerator.num_processes} process(es){how}.")

    # Save (with a model card: KTOTrainer writes one only with a checkpoint) and push to the Hub
    trainer.save_model(training_args.output_dir)
    hub_id = training_args.hub_model_id
    model_name = hub_id.split("/")[-1] if hub_id else os.path.basename(os.path.normpath(training_args.output_dir))
    dataset_id = _hub_dataset_id(script_args, dataset_args)
    trainer.create_model_card(model_name=model_name, dataset_name=dataset_id)
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_id)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    trainer.end()  # every rank exits by itself
    del trainer  # its model may hold the process group (ZeRO-3, FSDP2): let both go before interpreter shutdown
    gc.collect()
