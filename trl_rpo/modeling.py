"""Model switches the trainer needs beyond TRL's: every dropout off, and bitsandbytes' CPU layout kept trainable."""

import contextlib
import sys
from collections.abc import Iterator

from torch import nn


# Float attributes that `transformers` modules pass to `nn.functional.dropout` (T5's `dropout`, Llama's
# `attention_dropout`, BART's `activation_dropout`, ...) or use to skip layers at random (`layerdrop`).
_STOCHASTIC_ATTRIBUTES = ("dropout", "layerdrop", "drop_path")


def disable_dropout(model: nn.Module) -> list[str]:
    """Make `model` deterministic in training mode: `p = 0` in every `nn.Dropout` (what TRL's
    `disable_dropout_in_model` does) and 0.0 in every float attribute used as a dropout rate by functional code,
    such as T5's attention (`config.dropout_rate`), which TRL's helper leaves at 10 %. Returns what it zeroed."""
    changed = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p:
            module.p = 0.0
            changed.append(f"{module_name}.p")
        for name, value in vars(module).items():
            stochastic = any(key in name for key in _STOCHASTIC_ATTRIBUTES)
            if stochastic and isinstance(value, float) and not isinstance(value, bool) and value > 0:
                setattr(module, name, 0.0)
                changed.append(f"{module_name}.{name}")
    return changed


@contextlib.contextmanager
def trainable_bnb_layout(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes 4-bit layers in a layout that can train while `model` runs in eval mode without grad.

    On CPUs with AVX-512 BF16, bitsandbytes (0.50) repacks a `Linear4bit` weight into an inference-only layout the
    first time the layer runs in eval mode on an input without grad, and keeps it: every later forward then returns
    outputs with no gradient path, so training after a reference pass or an evaluation silently stops (grad norm 0).
    The repack is skipped for layers in training mode, and `Linear4bit` uses its mode for nothing else (LoRA's
    dropout is a module of its own), so those layers are flagged as training for the duration.
    """
    bnb = sys.modules.get("bitsandbytes")  # loaded by `transformers` for a quantized model, never imported here
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)] if bnb is not None else []
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.training = mode
