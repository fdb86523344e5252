"""The LoRA walkthrough notebook, executed end to end with nbclient on a tiny offline model (≈ 20 s).

Its `parameters` cell is swapped for one that builds a random tiny Llama and uses a handful of prompts, so this checks
the plumbing (sampling, dataset, RPOTrainer with LoRA, save, reload, comparison), not the reward gain: the committed
outputs of the SmolLM2 run carry that, and the last test reads them.
"""

import ast
import json
import math
import os
import textwrap
from pathlib import Path

import nbformat
from nbclient import NotebookClient


NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "rpo_lora_walkthrough.ipynb"
SUMMARY_MARKER = "RPO_SUMMARY "


def parameters_cell(notebook) -> nbformat.NotebookNode:
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged `parameters`"
    assert cells[0].cell_type == "code"
    return cells[0]


def assigned_names(source: str) -> set[str]:
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def stdout_of(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.output_type == "stream" and output.name == "stdout"
    )


def summary_of(notebook) -> dict:
    lines = [line for line in stdout_of(notebook).splitlines() if line.startswith(SUMMARY_MARKER)]
    assert len(lines) == 1, f"expected one `{SUMMARY_MARKER.strip()}` line in the outputs, got {len(lines)}"
    return json.loads(lines[0].removeprefix(SUMMARY_MARKER))


def test_walkthrough_runs_end_to_end_on_a_tiny_model(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = parameters_cell(notebook)
    output_dir = tmp_path / "adapter"
    tiny_parameters = textwrap.dedent(
        f"""\
        from trl_rpo.testing import save_tiny_causal_lm

        MODEL_ID = save_tiny_causal_lm({str(tmp_path / "tiny-llama")!r})
        NUM_TRAIN_PROMPTS = 4
        NUM_EVAL_PROMPTS = 2
        COMPLETIONS_PER_PROMPT = 2
        MAX_NEW_TOKENS = 8
        MAX_STEPS = 2
        OUTPUT_DIR = {str(output_dir)!r}
        """
    )
    # A parameter added to the notebook but not here would make the run fail with a NameError far from its cause.
    assert assigned_names(tiny_parameters) == assigned_names(cell.source)
    cell.source = tiny_parameters

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),  # the reference log-probs cache stays in tmp_path
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    # Per-cell timeout; the kernel runs in tmp_path, where relative paths a user might put in the notebook land.
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback

    stdout = stdout_of(notebook)
    summary = summary_of(notebook)
    assert summary["model_id"] == str(tmp_path / "tiny-llama")
    assert summary["train_rows"] == 4 * 2
    assert summary["train_steps"] == 2
    assert summary["losses"], "no training loss was logged"
    assert all(math.isfinite(loss) and loss >= 0 for loss in summary["losses"])
    for name in ("base", "rpo_lora"):
        assert 0.0 <= summary["eval"][name]["mean_reward"] <= 1.0
        assert 0.0 <= summary["eval"][name]["one_word_rate"] <= 1.0

    # The comparison table and the reload check (the cell asserts the reloaded logits match) were printed.
    for printed in ["mean reward", "one-word rate", "base (adapter off)", "RPO + LoRA", "reloaded vs. trained"]:
        assert printed in stdout

    # The saved artefact is a LoRA adapter on the attention projections of the model it was trained from.
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert "adapter_model.safetensors" in summary["output_files"]
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["base_model_name_or_path"] == summary["model_id"]
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(adapter_config["target_modules"])
    assert "trl-rpo" in (output_dir / "README.md").read_text()  # the model card RPOTrainer writes


def test_committed_notebook_shows_the_smollm2_run():
    """Readers see the results of the default run: its outputs are committed, and they show the reward going up."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    defaults = parameters_cell(notebook).source
    assert "smollm2_folder()" in defaults
    summary = summary_of(notebook)
    assert "smollm2-135m-instruct" in summary["model_id"]
    max_steps = next(line for line in defaults.splitlines() if line.startswith("MAX_STEPS"))
    assert summary["train_steps"] == int(max_steps.split("=")[1].split("#")[0])
    assert summary["eval"]["rpo_lora"]["mean_reward"] > summary["eval"]["base"]["mean_reward"]
