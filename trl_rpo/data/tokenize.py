"""Tokenisation of `(prompt, completion, reward)` rows for causal and encoder-decoder models, with the group and
completion keys that tie the rows of a prompt together and spot duplicate completions."""

import hashlib

import numpy as np
from trl.data_utils import _tokenize, common_prefix_length, prepare_multimodal_messages

from .formats import RowFormat, reward_rows_batch


def ids_key(*id_lists: list[int]) -> int:
    """A stable signed 64-bit key of token-id sequences (the group key of a tokenised prompt, or of a completion)."""
    h = hashlib.blake2b(digest_size=8)
    for ids in id_lists:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little", signed=True)


def _template_kwargs(rows: dict[str, list], i: int) -> dict:
    extra = dict(rows["chat_template_kwargs"][i] or {}) if "chat_template_kwargs" in rows else {}
    return {"tools": rows["tools"][i] if "tools" in rows else None, **extra}


def _encode_texts(processing_class, texts: list[str]) -> list[list[int]]:
    """`processing_class(text=texts)["input_ids"]`, each distinct text encoded once (rows of a prompt share it).

    With a fast tokenizer the Rust backend is called directly: the `transformers` wrapper builds a dict of lists per
    text, half of the tokenisation time on short rows. Its ids are checked against the wrapper's on the first text."""
    unique = list(dict.fromkeys(texts))
    backend = getattr(processing_class, "backend_tokenizer", None)
    encoded = None
    if backend is not None and unique:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encoded = [encoding.ids for encoding in encode(unique, add_special_tokens=True)]
        if encoded[0] != processing_class(text=unique[0])["input_ids"]:
            encoded = None
    if encoded is None:
        encoded = processing_class(text=unique)["input_ids"] if unique else []
    by_text = dict(zip(unique, encoded, strict=True))
    return [by_text[text] for text in texts]


def render_prompt_ids(processing_class, row: dict) -> list[int]:
    """A prompt's token ids as the trainers render it, one row (`prompt`, and `tools` / `chat_template_kwargs` when
    present): a string as the tokenizer encodes it, messages through the chat template with the generation prompt.
    Sampling renders prompts with it, so that its samples are the reference's."""
    if not isinstance(row["prompt"], list):
        return _tokenize(processing_class, row["prompt"])["input_ids"]
    template_kwargs = {"tools": row.get("tools"), **(row.get("chat_template_kwargs") or {})}
    return _tokenize(processing_class, row["prompt"], add_generation_prompt=True, **template_kwargs)["input_ids"]


def _tokenize_prompts(rows: dict[str, list], processing_class, conversational: bool) -> list[list[int]]:
    if not conversational:  # many rows share a prompt: each distinct text encoded once, on the fast path
        return _encode_texts(processing_class, rows["prompt"])
    columns = [c for c in ("tools", "chat_template_kwargs") if c in rows]
    return [
        render_prompt_ids(processing_class, {"prompt": prompt, **{c: rows[c][i] for c in columns}})
        for i, prompt in enumerate(rows["prompt"])
    ]


def tokenize_batch(rows: dict[str, list], processing_class, is_encoder_decoder: bool) -> dict[str, list]:
    """Tokenise a batch of RPO rows like TRL's KTOTrainer, adding `prompt_ids`, `completion_ids` (token ids), the
    `group_key` (the tokenised prompt's key: rows of one prompt share it) and the `completion_key` (the key of the
    prompt and completion tokens: duplicates share it).

    Causal models: the completion starts where the tokenisations of the prompt and of prompt + completion diverge
    (chat templates, BPE merges across the boundary); standard completions get the EOS token appended. Encoder-
    decoder models: the prompt feeds the encoder, and the completion (message contents joined) plus EOS is the
    decoder's target.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    rows = dict(rows)
    conversational = bool(rows["prompt"]) and isinstance(rows["prompt"][0], list)
    prompt_ids = _tokenize_prompts(rows, processing_class, conversational)
    if is_encoder_decoder:
        texts = rows["completion"]
        if conversational:
            texts = ["".join(message["content"] for message in messages) for messages in texts]
        eos = tokenizer.eos_token_id
        completion_ids = [ids if ids and ids[-1] == eos else [*ids, eos] for ids in _encode_texts(tokenizer, texts)]
    else:
        if conversational:
            full_ids = [
                _tokenize(processing_class, p + c, **_template_kwargs(rows, i))["input_ids"]
                for i, (p, c) in enumerate(zip(rows["prompt"], rows["completion"], strict=True))
            ]
        else:
            eos = tokenizer.eos_token
            rows["completion"] = [c if c.endswith(eos) else c + eos for c in rows["completion"]]
            texts = [p + c for p, c in zip(rows["prompt"], rows["completion"], strict=True)]
            full_ids = _encode_texts(processing_class, texts)
        cut = [common_prefix_length(p, f) for p, f in zip(prompt_ids, full_ids, strict=True)]
        completion_ids = [f[k:] for f, k in zip(full_ids, cut, strict=True)]
        keys_of = prompt_ids  # the whole tokenised prompt, so a boundary merge cannot split a group
        prompt_ids = [f[:k] for f, k in zip(full_ids, cut, strict=True)]
        return rows | _with_keys(prompt_ids, completion_ids, keys_of)
    return rows | _with_keys(prompt_ids, completion_ids, prompt_ids)


# Per-token ids some processors return beside `input_ids` to mark image tokens (Gemma 3, Qwen2.5-VL).
TEXT_SIDE_IMAGE_KEYS = ("token_type_ids", "mm_token_type_ids")


def _row_images(rows: dict[str, list]) -> list[list]:
    """Each row's images as a list (TRL's `image` column holds one, `images` a list; `None` is none)."""
    if "images" in rows:
        return [list(images or []) for images in rows["images"]]
    return [[] if image is None else [image] for image in rows["image"]]


def _image_digest(images: list) -> bytes:
    """The pixels (and sizes) of a row's images: rows with one prompt text but other images are other prompts."""
    h = hashlib.blake2b(digest_size=8)
    for image in images:
        pixels = np.asarray(image)
        h.update(np.asarray(pixels.shape, dtype=np.int64).tobytes())
        h.update(pixels.tobytes())
    return h.digest()


def tokenize_image_batch(rows: dict[str, list], processor) -> dict[str, list]:
    """Tokenise a batch of RPO rows with images for a vision-language model, as [`tokenize_batch`] does for causal
    models, through the model's `processor`: the prompt ids hold the image tokens the processor expands for the
    row's images, and the completion starts where the tokenisations of the prompt and of prompt + completion
    diverge. Conversational prompts get TRL's image placeholders (`prepare_multimodal_messages`, as KTOTrainer);
    standard prompts carry the model's image token themselves. Adds `images` (a list per row) and the keys of
    [`tokenize_batch`]; the group key digests the images too."""
    rows = dict(rows)
    images = _row_images(rows)
    conversational = bool(rows["prompt"]) and isinstance(rows["prompt"][0], list)
    if conversational:

        def render(messages: list, i: int, **kwargs) -> str:
            messages = prepare_multimodal_messages(messages, images[i])
            return processor.apply_chat_template(messages, tokenize=False, **kwargs, **_template_kwargs(rows, i))

        pairs = enumerate(zip(rows["prompt"], rows["completion"], strict=True))
        texts = [(render(p, i, add_generation_prompt=True), render(p + c, i)) for i, (p, c) in pairs]
        prompt_texts, full_texts = [t[0] for t in texts], [t[1] for t in texts]
    else:
        eos = processor.tokenizer.eos_token
        prompt_texts = rows["prompt"]
        full_texts = [
            p + (c if c.endswith(eos) else c + eos) for p, c in zip(prompt_texts, rows["completion"], strict=True)
        ]

    def encode(text: str, row_images: list) -> list[int]:
        # A rendered chat template already holds its special tokens (TRL's collator does the same).
        encoded = processor(text=[text], images=row_images or None, add_special_tokens=not conversational)
        unsupported = sorted(set(encoded) & set(TEXT_SIDE_IMAGE_KEYS))
        if unsupported:
            raise ValueError(
                f"The processor ({type(processor).__name__}) marks image tokens in the text "
                f"({', '.join(unsupported)}), which trl_rpo does not carry into its batches yet: the model would read "
                "its images wrongly. "
                "Vision-language models whose processor returns only `input_ids`, `attention_mask` and image inputs "
                "(LLaVA-style) are supported; use KTOTrainer's on-the-fly path for this model, or open an issue."
            )
        return list(encoded["input_ids"][0])

    prompt_ids = [encode(text, row_images) for text, row_images in zip(prompt_texts, images, strict=True)]
    full_ids = [encode(text, row_images) for text, row_images in zip(full_texts, images, strict=True)]
    cut = [common_prefix_length(p, f) for p, f in zip(prompt_ids, full_ids, strict=True)]
    keys = [
        ids_key(p, np.frombuffer(_image_digest(i), dtype=np.int64)) for p, i in zip(prompt_ids, images, strict=True)
    ]
    rows.pop("image", None)
    return rows | {
        "images": images,
        "prompt_ids": [f[:k] for f, k in zip(full_ids, cut, strict=True)],
        "completion_ids": [f[k:] for f, k in zip(full_ids, cut, strict=True)],
        "group_key": keys,
        "completion_key": [ids_key([g], f[k:]) for g, f, k in zip(keys, full_ids, cut, strict=True)],
    }


def prepare_rows_batch(
    batch: dict[str, list],
    indices: list[int],
    row_format: RowFormat,
    processing_class,
    is_encoder_decoder: bool,
    with_images: bool = False,
) -> dict[str, list]:
    """[`reward_rows_batch`] then [`tokenize_batch`] (or [`tokenize_image_batch`]): user rows to tokenised RPO rows
    in one `Dataset.map`."""
    rows = reward_rows_batch(batch, indices, row_format)
    if with_images:
        return tokenize_image_batch(rows, processing_class)
    return tokenize_batch(rows, processing_class, is_encoder_decoder)


def _with_keys(prompt_ids, completion_ids, group_ids) -> dict[str, list]:
    keys: dict[int, int] = {}  # rows of one prompt share one list of ids: key it once
    group_keys = [keys[id(g)] if id(g) in keys else keys.setdefault(id(g), ids_key(g)) for g in group_ids]
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "group_key": group_keys,
        "completion_key": [ids_key([k], c) for k, c in zip(group_keys, completion_ids, strict=True)],
    }
