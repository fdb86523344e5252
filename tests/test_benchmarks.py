"""The throughput benchmark runs end to end (`--quick`) and writes a consistent JSON. No timing is asserted here:
the speed goals are the benchmark's business, not the tests'."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
METHODS = {"floor", "rpo", "kto", "kto_precomputed", "sft"}


def test_throughput_quick(tmp_path):
    output = tmp_path / "throughput.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--output", str(output)],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    result = json.loads(output.read_text())

    methods = result["methods"]
    assert set(methods) == METHODS
    settings = result["settings"]
    floor, kto = methods["floor"]["s_per_step_median"], methods["kto"]["s_per_step_median"]
    for name, m in methods.items():
        assert m["s_per_step_median"] > 0, name
        assert len(m["s_per_step_all"]) == settings["warmup"] + settings["rounds"] * settings["steps_per_turn"]
        assert math.isclose(m["ratio_to_floor"], m["s_per_step_median"] / floor), name
        assert math.isclose(m["ratio_to_kto"], m["s_per_step_median"] / kto), name

    target_pass = result["target_pass"]
    for key in ("rpo_target_pass", "no_grad_forward_full_logits", "no_grad_forward_completion_head"):
        assert target_pass[key]["s_median"] > 0, key
    assert math.isclose(
        target_pass["ratio_to_no_grad_forward_completion_head"],
        target_pass["rpo_target_pass"]["s_median"] / target_pass["no_grad_forward_completion_head"]["s_median"],
    )
    assert result["partition"]["rpo_targets_s_median"] > 0
