"""Tiny offline models and tokenizers, built in-process, for the test suite and the quick-start demo.

Nothing here touches the Hugging Face Hub: the tokenizer is a byte-level BPE trained on a generated corpus (so
every string round-trips), the models are random `transformers` configs. Private: not part of the public API.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    set_seed,
)


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


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, output_dir: str | Path) -> str:
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)
