"""Distributed correctness on CPU (SPEC §5): 2 processes over gloo, and DeepSpeed ZeRO-2/3, through the shipped
accelerate configs. V̂(x) needs every completion of a prompt, so the targets must be identical on every rank and
identical to a 1-process run; the first-step loss on the same global batch must match too.

Each run has a `datasets` cache of its own, and each rank reports what its target pass did: a cache miss and the
rows it scored itself, so the sharded reference pass and its gather ran in every multi-process test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "run_rpo.py"
DIGEST = ROOT / "tests" / "distributed" / "zero3_digest.py"
CONFIGS = ROOT / "recipes" / "accelerate_configs"


def _run(model_dir, output_dir, *, config=None, env=None, cache=None, script=SCRIPT, **options) -> list[dict]:
    """Run `script` in 1 process (no `config`) or 2 (`accelerate launch --config_file config`), with the `datasets`
    cache `cache` (default: a new folder in `output_dir`), and return the per-rank records."""
    command = [sys.executable]
    if config is not None:
        command += ["-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
        command += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29517"]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    command += [str(script)]
    command += [model_dir, str(output_dir), json.dumps(options)] if script == SCRIPT else [str(output_dir), *model_dir]
    cache = str(cache or Path(output_dir) / "hf_datasets_cache")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    full_env |= {"HF_DATASETS_CACHE": cache, **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(path.read_text()) for path in sorted(Path(output_dir).glob("rank*.json"))]
    for rank, record in enumerate(records if script == SCRIPT else []):  # what outlived the trainer on each rank
        record["alive_after_end"] = json.loads((Path(output_dir) / f"exit{rank}.json").read_text())
    return records


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory) -> dict:
    (record,) = _run(model_dir, tmp_path_factory.mktemp("single"), per_device_train_batch_size=8)
    assert record["world_size"] == 1
    assert record["target_pass"] == {"cache": "miss", "rows_scored_here": record["rows"]}
    return record


def _assert_same_targets(records: list[dict], single: dict) -> None:
    # every rank ran the reference on its own shard (a miss in a fresh cache), and the shards cover every row
    assert all(r["target_pass"]["cache"] == "miss" for r in records)
    scored = [r["target_pass"]["rows_scored_here"] for r in records]
    assert all(n > 0 for n in scored)
    assert sum(scored) >= records[0]["rows"]
    for record in records:
        assert record["target"] == records[0]["target"]  # bit-identical on every rank
        torch.testing.assert_close(torch.tensor(record["target"]), torch.tensor(single["target"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            torch.tensor(record["ref_logps"]), torch.tensor(single["ref_logps"]), rtol=0, atol=1e-5
        )


@pytest.mark.slow
def test_two_processes_ddp_match_one_process(model_dir, single, tmp_path):
    records = _run(model_dir, tmp_path, config="multi_cpu.yaml", env={"ACCELERATE_USE_CPU": "true"})
    assert len(records) == 2
    assert {r["world_size"] for r in records} == {2}
    assert records[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    _assert_same_targets(records, single)
    # 2 × 4 rows per step, sequential sampling: the same 8 rows as the 1-process batch of 8
    assert records[0]["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # nothing outside the trainer holds the model once it is gone (torch's DDP keeps its own hold on the group)
    assert all(not r["alive_after_end"]["model"] for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_on_cpu_matches_one_process(model_dir, single, tmp_path, config):
    import deepspeed  # noqa: F401  (installed by `make install`; a missing install must fail, not skip)

    records = _run(model_dir, tmp_path, config=config, env={"DS_ACCELERATOR": "cpu"})
    assert len(records) == 2
    assert records[0]["distributed_type"] == "DistributedType.DEEPSPEED"
    _assert_same_targets(records, single)  # ZeRO-3: the target pass ran on the sharded initial policy
    assert records[0]["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # DeepSpeed holds every model it prepared in module-level state; `RPOTrainer.end` drops those holds, so the model
    # and the process group its ZeRO-3 parameters hold go with the trainer, before interpreter shutdown (where a
    # gloo group aborted a rank about once in twenty exits)
    assert all(r["alive_after_end"] == {"model": False, "group": False} for r in records)


@pytest.mark.slow
def test_dro_two_processes_match_one_process(model_dir, tmp_path_factory):
    """DRO's value network is wrapped for DDP: 2 processes × 4 rows take the same two steps as 1 process × 8 rows.

    24 rows, so both steps see the same 8 rows in both runs (no wrap-around of the last, uneven batch)."""
    options = {"trainer": "dro", "num_prompts": 8}
    (single,) = _run(model_dir, tmp_path_factory.mktemp("dro1"), per_device_train_batch_size=8, **options)
    records = _run(
        model_dir, tmp_path_factory.mktemp("dro2"), config="multi_cpu.yaml", env={"ACCELERATE_USE_CPU": "true"},
        **options,
    )  # fmt: skip
    assert {r["world_size"] for r in records} == {2}
    _assert_same_targets(records, single)  # the normalised rewards and reference log-probs
    assert records[0]["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
    assert records[0]["losses"][1] == pytest.approx(single["losses"][1], rel=1e-4)  # after one joint update


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_fsdp2_on_cpu_matches_one_process(model_dir, single, tmp_path, lora):
    """FSDP2 through the shipped config (per-layer wrap, `fsdp_cpu_ram_efficient_loading`), forced on for CPU in the
    launched script (accelerate 1.15 enables FSDP on accelerators only). Rank 1's copy of the weights is random noise,
    as with ram-efficient loading before preparation: the target pass must run on the policy sharded from rank 0's
    weights (LoRA: adapter disabled) to give one process's targets; training then reuses that sharding (DTensor
    parameters) and takes the same first step."""
    options = {"force_fsdp_on_cpu": True, "lora": lora, "garbage_weights_on_other_ranks": True}
    records = _run(model_dir, tmp_path, config="fsdp2.yaml", env={"ACCELERATE_USE_CPU": "true"}, **options)
    assert len(records) == 2
    assert all(r["fsdp2"] and r["fsdp_ram_efficient_loading"] for r in records)
    _assert_same_targets(records, single)
    assert all(r["dtensor_params"] for r in records)  # sharded before the target pass, and kept so
    if not lora:  # LoRA's first step differs from full fine-tuning's; its targets do not
        assert records[0]["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
    assert all(not r["alive_after_end"]["model"] for r in records)


@pytest.mark.slow
def test_zero3_two_models_one_cache_get_their_own_values(model_dir, other_model_dir, single, tmp_path):
    """Under ZeRO-3, a second model of the same architecture with the same data and cache folder is a cache miss
    and gets its own reference log-probs (those of a 1-process run of that model)."""
    import deepspeed  # noqa: F401

    cache = tmp_path / "shared_cache"
    ds = {"config": "zero3.yaml", "env": {"DS_ACCELERATOR": "cpu"}, "cache": cache, "max_steps": 1}
    first = _run(model_dir, tmp_path / "a", **ds)
    second = _run(other_model_dir, tmp_path / "b", **ds)
    (single_b,) = _run(other_model_dir, tmp_path / "b1", per_device_train_batch_size=8, max_steps=1)
    assert {r["target_pass"]["cache"] for r in first + second} == {"miss"}
    _assert_same_targets(second, single_b)
    assert second[0]["ref_logps"] != first[0]["ref_logps"]
    again = _run(model_dir, tmp_path / "a2", **ds)
    assert {r["target_pass"]["cache"] for r in again} == {"hit"}
    assert again[0]["ref_logps"] == first[0]["ref_logps"]


@pytest.mark.slow
def test_weights_digest_under_zero3_init_placeholders(model_dir, other_model_dir, tmp_path):
    """`zero.Init` leaves each rank empty placeholders (a hash of them sees only dtypes). The digest gathers every
    weight: it tells the two models apart and equals the digest of the same model loaded in one process."""
    import deepspeed  # noqa: F401

    from trl_rpo.reference_cache import weights_digest

    records = _run(
        [model_dir, other_model_dir], tmp_path, config="zero3.yaml", env={"DS_ACCELERATOR": "cpu"}, script=DIGEST
    )
    assert len(records) == 2
    assert all(r["placeholders"] == [True, True] for r in records)
    expected = [weights_digest(AutoModelForCausalLM.from_pretrained(d)) for d in (model_dir, other_model_dir)]
    assert all(r["digests"] == expected for r in records)
    assert expected[0] != expected[1]
