"""Tiny offline models and tokenizers, built in-process, for the test suite and the quick-start demo.

Nothing here touches the Hugging Face Hub: the tokenizer is a byte-level BPE trained on a generated corpus (so
every string round-trips), the models are random `transformers` configs. Private: not part of the public API.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast, set_seed


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


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A lossless byte-level BPE tokenizer with ChatML specials; `<|im_end|>` is EOS, `<|endoftext|>` pads."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
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
    model = build_causal_lm(tokenizer, **kwargs)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)
