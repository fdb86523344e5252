"""Drop-in proof: TRL's own `trl/scripts/kto.py`, with only the two class names swapped (and imported from
trl_rpo instead of trl), trains RPO end to end on a local tiny model and a local dataset with a `reward` column."""

import difflib
import json
import os
import re
import subprocess
import sys
from importlib.resources import files

import pytest


def _swap_to_rpo(source: str) -> str:
    source = source.replace("KTOTrainer", "RPOTrainer").replace("KTOConfig", "RPOConfig")

    def move_import(match: re.Match) -> str:
        indent, names = match.group(1), [n.strip() for n in match.group(2).split(",")]
        ours = [n for n in names if n in ("RPOConfig", "RPOTrainer")]
        theirs = [n for n in names if n not in ours]
        return f"{indent}from trl_rpo import {', '.join(ours)}\n{indent}from trl import {', '.join(theirs)}"

    return re.sub(r"^( *)from trl import (.*RPO(?:Config|Trainer).*)$", move_import, source, flags=re.MULTILINE)


@pytest.mark.slow
def test_trl_kto_script_with_swapped_class_names_trains_rpo(model_dir, tmp_path):
    original = files("trl.scripts").joinpath("kto.py").read_text()
    swapped = _swap_to_rpo(original)
    changed = [
        line
        for line in difflib.unified_diff(original.splitlines(), swapped.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed, "nothing was swapped: did TRL rename its script?"
    # every removed line named a KTO class; every added line names an RPO class or is the rest of a trl import
    assert all("KTO" in line for line in changed if line.startswith("-")), changed
    assert all("RPO" in line or "from trl import" in line for line in changed if line.startswith("+")), changed
    script = tmp_path / "rpo.py"
    script.write_text(swapped)

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [
        {"prompt": f"{a} + {a} =", "completion": f" {a + a + d}", "reward": 1.0 - abs(d)}
        for a in range(4)
        for d in (-1, 0, 1)
    ]
    (data_dir / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    out = tmp_path / "out"
    command = [
        sys.executable, str(script), "--model_name_or_path", model_dir, "--dataset_name", str(data_dir),
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
        "--logging_steps", "1", "--beta", "2.0",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training completed" in result.stdout
    assert (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "RPO" in card
    assert "2506.13702" in card
