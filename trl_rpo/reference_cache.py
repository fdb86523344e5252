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
from collections.abc import Callable, Iterator

import torch
from accelerate.logging import get_logger
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .files import atomic_path


logger = get_logger(__name__)

CACHE_VERSION = "trl_rpo-reference-logps-v3"  # v3: safetensors, validated on read
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


CACHE_SUFFIX = ".safetensors"


def load(path: str, num_rows: int) -> dict[str, torch.Tensor] | None:
    """The cached `sum_logps` and `num_tokens` of `num_rows` rows, or None when there is no file or it is damaged.

    The file is validated before use: a safetensors file of this cache version with exactly the two tensors, one
    value per row, finite log-prob sums that are at most 0 and whole, non-negative token counts. A file that fails
    (truncated, overwritten, from another program) is reported with the file and the reason and recomputed: a
    damaged cache costs one reference pass, never wrong targets.
    """
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except (SafetensorError, OSError, ValueError) as error:  # a cut or foreign header, unreadable bytes
        return _damaged(path, f"not a readable safetensors file ({type(error).__name__}: {error})")
    problem = _problem(tensors, metadata, num_rows)
    return _damaged(path, problem) if problem else tensors


def _problem(tensors: dict[str, torch.Tensor], metadata: dict[str, str], num_rows: int) -> str | None:
    if metadata.get("version") != CACHE_VERSION:
        return f"version {metadata.get('version')!r}, expected {CACHE_VERSION!r}"
    if sorted(tensors) != ["num_tokens", "sum_logps"]:
        return f"tensors {sorted(tensors)}, expected ['num_tokens', 'sum_logps']"
    for key, tensor in tensors.items():
        if tensor.shape != (num_rows,):
            return f"`{key}` has shape {tuple(tensor.shape)}, expected ({num_rows},): one value per row"
    sum_logps, num_tokens = tensors["sum_logps"], tensors["num_tokens"]
    if not (torch.isfinite(sum_logps).all() and (sum_logps <= 0).all()):
        return "`sum_logps` holds values that are not finite or above 0, which no log-probability sum can be"
    if not (torch.isfinite(num_tokens).all() and (num_tokens >= 0).all() and (num_tokens == num_tokens.round()).all()):
        return "`num_tokens` holds values that are not whole non-negative numbers, which no token count can be"
    return None


def _damaged(path: str, reason: str) -> None:
    logger.warning(f"The reference log-prob cache file {path} is damaged ({reason}): recomputing it.")


def save(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically: to a temporary file in the same folder, then rename, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"version": CACHE_VERSION})
