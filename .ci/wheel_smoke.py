"""Run by `make wheel-check` with the Python of a fresh virtual environment where only the built wheel (and torch) is
installed, from a folder outside the checkout: what `pip install trl-rpo` gives a user. It trains a tiny model for two
steps through the installed `trl-rpo` entry point, once in one process and once through a packaged accelerate config
(`--accelerate_config multi_cpu`: 2 processes over gloo), and fails loudly otherwise."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import trl_rpo
from trl_rpo.testing import save_tiny_causal_lm


def main() -> None:
    package = Path(trl_rpo.__file__).resolve().parent
    assert "site-packages" in package.parts, f"trl_rpo was imported from {package}, not from the installed wheel"
    assert (package / "accelerate_configs" / "zero3.yaml").is_file(), "the accelerate configs are not in the wheel"
    entry_point = Path(sys.executable).parent / "trl-rpo"
    work = Path(tempfile.mkdtemp())
    model_dir = save_tiny_causal_lm(work / "tiny-llama")
    rows = work / "rows.jsonl"
    with rows.open("w") as f:
        for p in range(8):
            for c in range(3):
                row = {"prompt": f"{p} + 1 =", "completion": f" {p + c}", "reward": float(c == 1)}
                f.write(json.dumps(row) + "\n")
    common = ["--model_name_or_path", model_dir, "--dataset_name", str(rows), "--max_steps", "2", "--report_to",
              "none", "--per_device_train_batch_size", "4", "--save_strategy", "no"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf"), "CUDA_VISIBLE_DEVICES": ""}
    env |= {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores: no thread oversubscription
    runs = {
        "one process": lambda: [str(entry_point), *common, "--output_dir", str(work / "single")],
        "accelerate multi_cpu": lambda: [str(entry_point), "--accelerate_config", "multi_cpu", "--num_processes", "2",
                                         "--main_process_port", str(_free_port()), *common, "--output_dir",
                                         str(work / "multi")],
    }  # fmt: skip
    for name, command in runs.items():
        print(f"{name}: {_run(name, command, work, env)}", flush=True)
    for folder in ("single", "multi"):
        assert (work / folder / "model.safetensors").is_file(), f"no model saved in {folder}"
        assert "trl-rpo" in (work / folder / "README.md").read_text(), f"no RPO model card in {folder}"
    print(f"wheel check passed: trl_rpo {trl_rpo.__version__} from {package}")


def _free_port() -> int:
    # A fixed port can be held by a process a previous step left behind: ask the OS for an unused one.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(name: str, command, work: Path, env: dict, timeout: int = 300) -> str:
    """Run `command()` once and return its last line of output. A run that does not end within `timeout` is a bug
    (every rank must exit by itself): it is killed with its whole process group, and CI fails with its output."""
    process = subprocess.Popen(command(), cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher's workers too, or their pipes never close
        output, _ = process.communicate()
        sys.exit(f"{name}: trl-rpo did not exit within {timeout} s; its last output:\n{output[-3000:]}")
    if process.returncode != 0:
        sys.exit(f"{name}: trl-rpo failed\n{output[-4000:]}")
    return output.strip().splitlines()[-1]


if __name__ == "__main__":
    main()
