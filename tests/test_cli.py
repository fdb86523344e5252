"""The `trl-rpo` command (`trl_rpo.cli`): help, an end-to-end run of the tiny CPU recipe, dataset loading and the
errors it raises before any model work."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

import trl_rpo
from trl_rpo.cli import cli, load_rpo_dataset, main, make_parser, rename_rpo_columns


ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes/tiny/rpo/config_cpu.yaml"


def _env(tmp_path: Path) -> dict[str, str]:
    cache = str(tmp_path / "hf_datasets_cache")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_CACHE": cache}


def parse(*args: str):
    return make_parser().parse_args_and_config(args=[*args, "--use_cpu", "true"])


def test_help_lists_the_rpo_options(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trl_rpo", "--help"],
        capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: trl-rpo")
    for option in (
        "beta",
        "logps_aggregation",
        "partition_estimator",
        "reward_normalization",
        "min_completions_per_prompt",
        "sparse_prompt_strategy",
        "prompt_column",
        "completion_column",
        "reward_column",
        "model_name_or_path",
        "lora_task_type",
    ):
        assert f"--{option}" in result.stdout, option
    help_text = " ".join(result.stdout.split())  # argparse wraps the help texts
    assert "Temperature τ of RPO" in help_text
    assert "renamed to `prompt` before training" in help_text
    for subcommand in ("generate", "score", "iterate"):  # the other commands are listed, as `trl --help` lists its
        assert f"trl-rpo {subcommand} " in result.stdout


def _tiny_run(
    model_dir, tmp_path, processes: int, port: int = 29531, accelerate_config: str = "multi_cpu"
) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [
        {"instruction": f"{a} + {a} =", "response": f" {a + a + d}", "reward": 1.0 - abs(d), "source": "test"}
        for a in range(4)
        for d in (-1, 0, 1)
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "trl_rpo", "--config", str(TINY_RECIPE), "--model_name_or_path", model_dir,
        "--dataset_name", str(data), "--prompt_column", "instruction", "--completion_column", "response",
        "--output_dir", str(out),
    ]  # fmt: skip
    env = _env(tmp_path)
    if processes == 2:  # relaunch through accelerate: 2 processes over gloo on this CPU-only machine
        command += ["--accelerate_config", accelerate_config, "--num_processes", "2", "--main_process_port", str(port)]
        if accelerate_config == "multi_cpu":
            env["ACCELERATE_USE_CPU"] = "true"
        else:  # DeepSpeed on this CPU-only machine: its CPU accelerator, with the recipe's `use_cpu` off
            command += ["--use_cpu", "false", "--mixed_precision", "no"]
            env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_tiny_recipe_trains_end_to_end(model_dir, tmp_path, processes):
    result = _tiny_run(model_dir, tmp_path, processes)
    out = tmp_path / "out"
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Training completed on {processes} process(es)" in result.stdout
    assert (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "RPO" in card
    assert "2506.13702" in card


@pytest.mark.slow
def test_a_two_process_run_exits_by_itself_every_time(model_dir, tmp_path):
    """Once in about seven launches a rank hung at exit in the gloo group's destructor (DDP's Reducer freed after
    the group, the other rank gone) or aborted. Six launches in a row, no retry: each exits 0 within its time limit,
    with the wrapped model freed before the group was destroyed on every rank."""
    for launch in range(6):
        result = _tiny_run(model_dir, tmp_path / str(launch), 2, port=29541 + launch)
        assert result.returncode == 0, f"launch {launch}: {result.stderr[-3000:]}"
        assert "Training completed on 2 process(es)" in result.stdout
        assert "still referenced when the process group is destroyed" not in result.stderr


@pytest.mark.slow
def test_a_zero3_run_trains_and_exits(model_dir, tmp_path):
    """`--accelerate_config zero3` (DeepSpeed's CPU accelerator here): trains, saves and every rank exits 0."""
    result = _tiny_run(model_dir, tmp_path, 2, port=29551, accelerate_config="zero3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training completed on 2 process(es) (DEEPSPEED)" in result.stdout  # not a plain two-process run
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("flag", ["--dataset_streaming", "--streaming"])
def test_streaming_is_refused(flag, tmp_path):
    args = parse("--dataset_name", "any/dataset", flag, "true", "--output_dir", str(tmp_path))
    with pytest.raises(ValueError, match="map-style dataset"):
        main(*args)


@pytest.mark.parametrize("module", ["trl_rpo", "trl_rpo.cli"])
@pytest.mark.filterwarnings("ignore:'trl_rpo.cli' found in sys.modules:RuntimeWarning")  # runpy, after our import
def test_python_dash_m_runs_the_command(module, tmp_path, monkeypatch, capsys):
    argv = ["trl-rpo", "--dataset_name", "any/dataset", "--dataset_streaming", "true", "--output_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*argv, "--use_cpu", "true"])
    with pytest.raises(SystemExit) as info:  # the console command: a user error is one line and exit status 2
        runpy.run_module(module, run_name="__main__")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "trl-rpo: error: " in err
    assert "map-style dataset" in err


def test_entry_point_is_cli():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"trl-rpo": "trl_rpo.cli:run"}
    with pytest.raises(SystemExit) as info:
        cli(["--help"])
    assert info.value.code == 0


def test_local_file_is_loaded_and_columns_renamed(tmp_path):
    script_args, _, _, dataset_args = parse("--config", str(TINY_RECIPE), "--output_dir", str(tmp_path))
    script_args.dataset_name = str(ROOT / script_args.dataset_name)
    dataset = load_rpo_dataset(script_args, dataset_args)
    assert list(dataset) == ["train"]
    assert dataset["train"].column_names == ["prompt", "completion", "reward"]
    assert dataset["train"][0] == {"prompt": "0 + 1 =", "completion": " 0", "reward": -0.5}


def test_unsupported_local_file_is_refused(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("0 + 1 = 1\n")
    script_args, _, _, dataset_args = parse("--dataset_name", str(path), "--output_dir", str(tmp_path))
    with pytest.raises(ValueError, match=r"\.jsonl"):
        load_rpo_dataset(script_args, dataset_args)


@pytest.mark.parametrize("name", ["data/rows.jsonl", "./my_data", "/no/such/folder", "data/scored/train"])
def test_a_dataset_path_that_does_not_exist_says_so(tmp_path, monkeypatch, name):
    """Not "cannot reach the Hub": the path is named with the folder it was looked for in."""
    monkeypatch.chdir(tmp_path)
    script_args, _, _, dataset_args = parse("--dataset_name", name, "--output_dir", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"'{name}': no such file or folder \\(looked in {tmp_path}\\)"):
        load_rpo_dataset(script_args, dataset_args)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["--dataset_name", "a/b/rows.jsonl", "--output_dir", "o"], "'a/b/rows.jsonl': no such file or folder"),
        (["score", "--dataset_name", "rows.jsonl"], "Missing required argument(s): --output_dir."),
    ],
)
def test_a_user_error_is_one_line_unless_a_traceback_is_asked_for(tmp_path, command, message):
    """`trl-rpo` as a user runs it: a path that does not exist, a missing option — one message, exit status 2; with
    `--traceback` the traceback is back."""
    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "trl_rpo", *command, *extra],
        capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    quiet, loud = run([]), run(["--traceback"])
    assert quiet.returncode == 2, quiet.stderr[-2000:]
    assert f"trl-rpo: error: {message}" in quiet.stderr.replace("`dataset_name` ", "")
    assert "Traceback" not in quiet.stderr
    assert loud.returncode == 1
    assert "Traceback" in loud.stderr


def test_missing_eval_split_is_reported_before_model_work(tmp_path):
    args = parse(
        "--config", str(TINY_RECIPE), "--dataset_name", str(ROOT / "recipes/tiny/rpo/data.jsonl"),
        "--eval_strategy", "steps", "--output_dir", str(tmp_path),
    )  # fmt: skip
    with pytest.raises(ValueError, match="no split 'test'.*dataset_test_split"):
        main(*args)


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        ({"prompt": ["q"], "completion": ["a"], "reward": [1.0]}, "no column 'instruction'"),
        ({"instruction": ["q"], "prompt": ["q"], "completion": ["a"], "reward": [1.0]}, "already has a 'prompt'"),
    ],
)
def test_column_renaming_errors(columns, match, tmp_path):
    script_args, *_ = parse("--prompt_column", "instruction", "--output_dir", str(tmp_path))
    with pytest.raises(ValueError, match=match):
        rename_rpo_columns(DatasetDict({"train": Dataset.from_dict(columns)}), script_args)


def test_default_columns_are_left_alone(tmp_path):
    script_args, *_ = parse("--output_dir", str(tmp_path))
    dataset = DatasetDict({"train": Dataset.from_dict({"prompt": ["q"], "completion": ["a"], "label": [True]})})
    assert rename_rpo_columns(dataset, script_args) is dataset  # a KTO `label` dataset needs no `reward` column


def test_accelerate_config_names_resolve_to_the_packaged_files(tmp_path, monkeypatch):
    """`--accelerate_config zero3` finds the config shipped inside the package, from any working directory (as from
    an installed wheel); a `recipes/accelerate_configs/NAME.yaml` of the working directory wins."""
    from trl_rpo.cli import ACCELERATE_CONFIGS, resolve_accelerate_config

    monkeypatch.chdir(tmp_path)
    assert ACCELERATE_CONFIGS.parent == Path(trl_rpo.__file__).resolve().parent
    args = resolve_accelerate_config(["--accelerate_config", "zero3", "--num_processes", "2"])
    assert args[args.index("--config_file") + 1] == str(ACCELERATE_CONFIGS / "zero3.yaml")
    own = tmp_path / "recipes" / "accelerate_configs" / "zero3.yaml"
    own.parent.mkdir(parents=True)
    own.write_text((ACCELERATE_CONFIGS / "zero3.yaml").read_text())
    args = resolve_accelerate_config(["--accelerate_config", "zero3"])
    assert args[args.index("--config_file") + 1] == str(own)
