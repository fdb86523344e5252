"""Launched by tests/test_distributed.py with 2 processes: loads tiny models under DeepSpeed ZeRO-3 `zero.Init` with
no persistence threshold, so every rank holds only empty placeholders of every weight, and writes, per rank, the
reference-cache weights digest of each model to `<output_dir>/rank<k>.json`."""

import gc
import json
import os
import sys
import weakref

import deepspeed
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from trl_rpo.reference_cache import weights_digest


def main(output_dir: str, *model_dirs: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    keep_alive = HfDeepSpeedConfig(config)  # from_pretrained now builds the models inside `zero.Init`
    record = {"placeholders": [], "digests": []}
    for model_dir in model_dirs:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        params = list(model.parameters())
        # what a naive hash would read: empty local tensors, with only their dtype to tell models apart
        record["placeholders"].append(all(hasattr(p, "ds_id") and p.numel() == 0 for p in params))
        record["digests"].append(weights_digest(model))
    with open(os.path.join(output_dir, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    # Leave as `trl-rpo` does: the ZeRO-3 parameters hold the process group, and a group left to interpreter shutdown
    # can abort it (a gloo thread frees a finished all-gather and needs the GIL), so drop them, then the group.
    world = weakref.ref(torch.distributed.group.WORLD)
    del keep_alive, model, params
    gc.collect()
    torch.distributed.barrier()
    deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's own references to the group
    gc.collect()
    if world() is not None:
        sys.exit("the process group is still referenced after the run: this process may abort at exit")


if __name__ == "__main__":
    main(*sys.argv[1:])
