"""The on-disk cache of reference log-probs, and the key that says whose log-probs they are.

ℓ_ref depends on the reference weights, their dtype, the autocast dtype, the attention implementation, the model
config, the token ids (tokenizer, chat template and text) and the truncation length. The key covers each of them:
the token ids and the weights are digested, not named, so a cache can never answer for another model or another
tokenisation. The weights digest works on every layout a reference can have when the key is made: a plain module,
ZeRO-3 partitions (each parameter gathered in turn, including `zero.Init` placeholders that hold no local data) and
FSDP2 DTensors (each gathered with `full_tensor`). Sharded layouts make it a collective: every rank calls it.

Per tensor the digest reads the name, shape and dtype, the sum and absolute sum of every chunk of 4M elements (float32
reductions, at memory speed) and 1024 evenly spaced values: any change to the weights that training, a merge or a
different checkpoint makes changes it, at the cost of one read of the weights (no hashing of every byte; 12× faster
than TRL's `hash_module` on SmolLM2-135M cut to 2 layers). Reductions in another thread count may round differently:
the worst case is a cache miss, never another model's values.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator

import torch
from torch import nn


CACHE_VERSION = "trl_rpo-reference-logps-v2"
_SAMPLE = 1024
_CHUNK = 1 << 22
_CONFIG_IGNORED = ("_name_or_path", "transformers_version", "_commit_hash")


def _tensor_checksum(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    sums = []  # float32 reductions run at memory speed; one pair per chunk, so that swapping two chunks shows
    for chunk in flat.split(_CHUNK):
        chunk = chunk.float()  # a copy of one chunk at most (bf16, or quantized integer storage read as numbers)
        sums.append(torch.stack([chunk.sum(), torch.linalg.vector_norm(chunk, 1)]))
    sums = torch.stack(sums)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step][:_SAMPLE].to(device="cpu", dtype=torch.float64)
    return sums.cpu().numpy().tobytes() + sample.numpy().tobytes()


def _gathered(name: str, param: torch.Tensor) -> Iterator[torch.Tensor]:
    if hasattr(param, "ds_id"):  # ZeRO-3: the full tensor exists only inside this collective context
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield param.data
        return
    full_tensor = getattr(param, "full_tensor", None)  # FSDP2 DTensor
    yield full_tensor() if callable(full_tensor) else param


def weights_digest(model: nn.Module, include: Callable[[str, nn.Parameter], bool] | None = None) -> str:
    """Digest of the parameters of `model` (those for which `include(name, param)` holds), sharded or not."""
    h = hashlib.blake2b(digest_size=16)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if include is not None and not include(name, param):
            continue
        shape = tuple(getattr(param, "ds_shape", None) or param.shape)
        h.update(f"{name}|{shape}|{param.dtype}|".encode())
        for tensor in _gathered(name, param):
            h.update(_tensor_checksum(tensor))
    return h.hexdigest()


def config_digest(config) -> str:
    """Digest of a `transformers` config, without the fields that name where it came from."""
    values = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_IGNORED}
    return hashlib.blake2b(json.dumps(values, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def cache_key(**parts) -> str:
    """The cache file name for these parts (all JSON-serialisable), with `CACHE_VERSION`."""
    payload = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()


def load(path: str) -> dict[str, torch.Tensor] | None:
    if not os.path.exists(path):
        return None
    return torch.load(path, weights_only=True)


def save(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically: to a temporary file in the same folder, then rename, so a reader never sees half a file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(tensors, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
