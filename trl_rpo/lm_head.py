"""A cheaper fused LM head for CPU and MPS, swapped into TRL's for the duration of a forward.

TRL's fused LM head (`fused_lm_head=True`, `trl.trainer.utils`) computes per-token log-probs without materialising
the full logits. On CUDA/XPU it projects only the positions that predict a label; on CPU and MPS it projects every
position (fixed tile shapes, for Neuron's compiler) and its tiled log-prob function falls back to several plain-torch
passes per tile, recomputing the projection in backward. For RPO, whose loss needs only the completion tokens'
log-probs, that multiplies the step time on CPU (measured, with the TRL release, in `docs/upstream_lm_head.md`;
`benchmarks/throughput.py` measures it again). This module restores the
labelled-positions projection there, computes small enough heads with one `log_softmax`, and asks only for the
outputs the caller needs. It reads two private TRL names (`_use_triton`, `_ChunkedLogProbFunction`); the seam is
pinned by `tests/test_trl_seam.py`. A draft of the upstream issue is in `docs/upstream_lm_head.md`.

Where a TRL release has no `_use_triton` switch it projects only the labelled positions everywhere, and where its
tiled function is a Triton kernel that is `None` without Triton (PyTorch's CPU wheels), this module's plain head is
the only one that runs on CPU, whatever the size; which releases do what: `docs/trl_seam.md`.
"""

import contextlib

import torch
import trl.trainer.utils as trl_utils


# Above this many logits (completion tokens x vocabulary; 256 MB in fp32) the CPU head goes back to TRL's tiles.
_PLAIN_HEAD_MAX_LOGITS = 2**26


class CompletionHeadOffAccelerator:
    """Stands in for TRL's `_ChunkedLogProbFunction` inside `completion_only_lm_head()` (same `apply` signature).

    On CPU and MPS, TRL's tiled log-prob function falls back to several plain-torch passes per tile and recomputes
    the projection in backward: slower than a plain PyTorch step on its own (docs/upstream_lm_head.md). When the logits
    of the completion tokens are small enough to hold, they are computed once here (projection, TRL's scale /
    softcap / temperature transform, one `log_softmax` kept for backward) and the entropy and mean logit are read
    from them without gradient. On accelerators, or for larger batches, TRL's function runs. Either way only the
    outputs in `keep` are computed (when set): KTO's set-up asks for the mean logit, which RPO never logs, and the
    reference pass needs no entropy.
    """

    chunked = trl_utils._ChunkedLogProbFunction  # TRL's own; None on releases whose kernel needs Triton, without it
    keep: tuple[str, ...] | None = None

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        if cls.keep is not None:
            outputs = tuple(name for name in outputs if name in cls.keep)
        too_big = hidden.shape[0] * weight.shape[0] > _PLAIN_HEAD_MAX_LOGITS
        trl_head = (
            hidden.device.type not in ("cpu", "mps") or too_big or {"log_sum_sq_probs", "is_top1"} & set(outputs)
        )
        if trl_head and cls.chunked is not None:
            return cls.chunked.apply(
                hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs
            )
        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature  # TRL's order: scale, softcap, temperature
        log_probs = logits.log_softmax(-1)
        token_logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1) if "entropy" in outputs else None
            mean_logits = logits.mean(-1) if "mean_logits" in outputs else None
        return token_logps, entropy, None, mean_logits, None


@contextlib.contextmanager
def completion_only_lm_head(with_entropy: bool):
    """Make TRL's fused LM head cheap on CPU and MPS, with the same results.

    1. It projects only the labelled (completion) positions on CUDA/XPU but every position elsewhere (fixed tile
       shapes, for Neuron's compiler): on CPU/MPS that multiplies the head's work by sequence/completion length for
       nothing (several times RPO's step time, docs/upstream_lm_head.md), so it is switched to the labelled positions.
    2. Its log-prob function is replaced there by `CompletionHeadOffAccelerator` (see its docstring).
    3. Everywhere, only the log-probs (and the entropy, if `with_entropy`) are computed.
    """
    original = getattr(trl_utils, "_use_triton", None)  # None: a release that compacts on every device
    if original is not None:
        trl_utils._use_triton = lambda device: original(device) or device.type in ("cpu", "mps")
    trl_utils._ChunkedLogProbFunction = CompletionHeadOffAccelerator
    CompletionHeadOffAccelerator.keep = ("log_probs", "entropy") if with_entropy else ("log_probs",)
    try:
        yield
    finally:
        if original is not None:
            trl_utils._use_triton = original
        trl_utils._ChunkedLogProbFunction = CompletionHeadOffAccelerator.chunked
        CompletionHeadOffAccelerator.keep = None
