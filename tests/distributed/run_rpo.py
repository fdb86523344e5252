"""Launched by tests/test_distributed.py under `accelerate launch`: trains RPO on a tiny model and writes, per rank,
what the test compares (targets, reference log-probs, logged losses, what the target pass did on the rank) to
`<output_dir>/rank<k>.json`."""

import gc
import json
import os
import sys
import weakref

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoModelForCausalLM


sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import reward_rows

from trl_rpo import DROConfig, DROTrainer, RPOConfig, RPOTrainer


def force_fsdp_on_cpu() -> None:
    """accelerate 1.15 turns FSDP on only for accelerator devices; on this CPU-only machine the launcher's FSDP
    settings (env `FSDP_*`) are read into a plugin and then ignored. Keep them: the state becomes FSDP over gloo,
    and the real FSDP2 code paths (accelerate's `fsdp2_prepare_model`, `fully_shard`, DTensor parameters) run."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    real_init, plugins = AcceleratorState.__init__, []

    def init(self, *args, fsdp_plugin=None, **kwargs):
        real_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if not plugins:  # the first state made: its plugin, configured by the launcher's env, is the run's
            plugins.append(fsdp_plugin or FullyShardedDataParallelPlugin())
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugins[0]

    AcceleratorState.__init__ = init


def main(model_dir: str, output_dir: str, extra: str):
    torch.set_num_threads(1)
    options = json.loads(extra)
    if options.pop("force_fsdp_on_cpu", False):
        force_fsdp_on_cpu()
    options_garbage = options.pop("garbage_weights_on_other_ranks", False)
    dro = options.pop("trainer", "rpo") == "dro"
    peft_config = None
    if options.pop("lora", False):
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    num_prompts = options.pop("num_prompts", 4)
    config_class, trainer_class = (DROConfig, DROTrainer) if dro else (RPOConfig, RPOTrainer)
    args = config_class(
        output_dir=output_dir,
        report_to="none",
        per_device_train_batch_size=options.pop("per_device_train_batch_size", 4),
        max_steps=options.pop("max_steps", 2),
        logging_steps=1,
        learning_rate=1e-2,
        save_strategy="no",
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        **options,
    )
    from transformers.integrations.fsdp import is_fsdp_enabled

    ram_efficient = is_fsdp_enabled()  # as `from_pretrained` sees it: ranks > 0 then need rank 0's weights
    model = model_dir
    if options_garbage:
        # What `fsdp_cpu_ram_efficient_loading` promises to fix: ranks > 0 hold no real weights until the model is
        # prepared (transformers 5.24 on CPU loads them anyway, so they are overwritten here).
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        if PartialState().process_index > 0:
            with torch.no_grad():
                for param in model.parameters():
                    param.normal_()
    dataset = Dataset.from_dict(reward_rows(num_prompts))
    trainer = trainer_class(model, args=args, train_dataset=dataset, peft_config=peft_config)
    record = {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "target": list(trainer.train_dataset["reward_z" if dro else "target"]),
        "ref_logps": list(trainer.train_dataset["ref_logps"]),
        "rows": len(trainer.train_dataset),
        "target_pass": trainer.target_pass_log["train"],  # this rank's cache status and rows it scored itself
        "fsdp2": trainer.accelerator.is_fsdp2,
        "fsdp_ram_efficient_loading": ram_efficient,
        "dtensor_params": type(next(trainer.model.parameters())).__name__ == "DTensor",
    }
    trainer.train()
    record["losses"] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    trainer.save_model(os.path.join(output_dir, "final"))
    state = PartialState()
    with open(os.path.join(output_dir, f"rank{state.process_index}.json"), "w") as f:
        json.dump(record, f)
    holds = {"model": weakref.ref(trainer.model)}
    if torch.distributed.is_initialized():
        holds["group"] = weakref.ref(torch.distributed.group.WORLD)
    trainer.end()  # as `trl-rpo` ends a run; the trainer goes with this frame
    return output_dir, state.process_index, holds


if __name__ == "__main__":
    output_dir, rank, holds = main(*sys.argv[1:4])
    gc.collect()
    # What is still alive once the trainer is gone, and would be torn down during interpreter shutdown (a process
    # group there can abort the process): the test reads it.
    with open(os.path.join(output_dir, f"exit{rank}.json"), "w") as f:
        json.dump({name: ref() is not None for name, ref in holds.items()}, f)
