"""The TRL internals RPOTrainer relies on. If TRL moves one of these seams, this file fails first and says which.

RPOTrainer and DROTrainer subclass `trl.KTOTrainer` (trl 1.15 to 1.16, the range in pyproject.toml; CI runs this
file and the trainer tests on both ends) and override or call the methods below; `KTOTrainer.__init__` must still
call them the way they expect. The one seam that differs between the two releases is the fused LM head's.
"""

import inspect

import pytest
import torch
import trl
import trl.trainer.utils as trl_utils
from packaging.version import Version
from transformers import Trainer
from trl import KTOTrainer
from trl.data_utils import _tokenize, common_prefix_length
from trl.trainer.utils import pad, use_adapter  # noqa: F401


TRL_1_16 = Version(trl.__version__) >= Version("1.16.0")


def test_trl_version_is_the_tested_range():
    assert Version("1.15.0") <= Version(trl.__version__) < Version("1.17.0")


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
        ("_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
        ("compute_ref_log_probs", ["self", "model", "inputs"]),
        ("_compute_loss", ["self", "model", "inputs", "return_outputs"]),
        ("_set_signature_columns_if_needed", ["self"]),
        ("evaluate", ["self", "eval_dataset", "ignore_keys", "metric_key_prefix"]),
    ],
)
def test_overridden_and_called_methods_keep_their_signature(method, parameters):
    assert list(inspect.signature(getattr(KTOTrainer, method)).parameters) == parameters


def test_init_still_routes_through_our_hooks():
    source = inspect.getsource(KTOTrainer.__init__)
    # the KL machinery is switched off through this attribute (RPOTrainer makes it a constant False property)
    assert "self.calculate_KL = calculate_kl" in source
    assert "if self.calculate_KL and args.per_device_train_batch_size <= 1" in source
    # datasets are prepared, then the target pass runs through the reference-log-prob precompute hook
    assert 'self._prepare_dataset(train_dataset, processing_class, args, "train")' in source
    assert "self.train_dataset = self._precompute_ref_logps(" in source
    assert "self._precompute_model_hash = hash_module(self.ref_model or self.model)" in source
    assert "self._precompute_engine = None" in source
    assert "add_fused_lm_head(" in source
    # image rows: KTOTrainer skips `_prepare_dataset` for them; RPOTrainer makes this attribute a constant False
    assert "self._is_vision_dataset = " in source
    assert "if not self._is_vision_dataset:" in source


def test_compute_ref_log_probs_returns_summed_logps():
    source = inspect.getsource(KTOTrainer.compute_ref_log_probs)
    assert ".sum(-1)" in source
    assert "use_adapter(" in source


def test_helpers_we_reuse_behave_as_expected(tokenizer):
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert _tokenize(tokenizer, "1 + 1 =")["input_ids"] == tokenizer("1 + 1 =")["input_ids"]


def test_evaluation_loop_takes_metric_key_prefix():
    assert "metric_key_prefix" in inspect.signature(Trainer.evaluation_loop).parameters


def test_cli_helpers_we_reuse():
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.commands.training import _subtract_subsequence

    assert _subtract_subsequence(["--a", "1", "--n", "2", "--b"], ["--n", "2"]) == ["--a", "1", "--b"]
    resolved = resolve_accelerate_config_argument(["--accelerate_config", "zero3", "--num_processes", "2"])
    assert resolved[0] == "--config_file"
    assert resolved[1].endswith("zero3.yaml")
    assert resolved[2:] == ["--num_processes", "2"]


def test_fused_head_compaction_switch():
    """TRL 1.16 scores every position on CPU unless this module-level switch says otherwise (RPO flips it there);
    TRL 1.15 has no switch and scores only the labelled positions on every device."""

    fused_head = inspect.getsource(trl_utils.add_fused_lm_head)
    if TRL_1_16:
        assert callable(trl_utils._use_triton)
        assert "compact = _use_triton(hidden_states.device)" in fused_head
        assert issubclass(trl_utils._ChunkedLogProbFunction, torch.autograd.Function)
    else:
        assert not hasattr(trl_utils, "_use_triton")
        assert "hidden_states[mask]" in fused_head
        # a Triton kernel, None where Triton is not installed: RPO's own head is then the only one on CPU
        chunked = trl_utils._ChunkedLogProbFunction
        assert chunked is None or issubclass(chunked, torch.autograd.Function)
    # ... and RPO replaces its log-prob function, which it looks up in this module at call time
    assert "_ChunkedLogProbFunction.apply(" in fused_head


class _NaiveHead:
    """The head's maths written out in float64: scale, softcap, temperature, then log-softmax over the vocabulary."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        logits = (hidden @ weight.T + bias) * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        log_probs = (logits / temperature).log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return log_probs.gather(-1, targets[:, None]).squeeze(-1), entropy, None, (logits / temperature).mean(-1), None


def _references():
    # TRL's own tiled function where this TRL has one (always on 1.16; on 1.15 only with Triton)
    return [_NaiveHead] + [f for f in [trl_utils._ChunkedLogProbFunction] if f is not None]


@pytest.mark.parametrize(("softcap", "logit_scale", "temperature"), [(None, 1.0, 1.0), (3.0, 0.5, 0.7)])
def test_cpu_head_matches_trl_chunked_function(softcap, logit_scale, temperature):
    """RPO's CPU head gives TRL's log-probs, entropy, mean logit and gradients (vocabulary spans several TRL tiles),
    and those of the head's maths written out."""
    import torch

    from trl_rpo.lm_head import CompletionHeadOffAccelerator

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(5000, 16, generator=generator, dtype=torch.float64)
    bias = torch.randn(5000, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 5000, (37,), generator=generator)
    outputs = ("log_probs", "entropy", "mean_logits")

    def run(function) -> list[torch.Tensor]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        log_probs, entropy, _, mean_logits, _ = function.apply(
            h, w, bias, targets, temperature, 1024, softcap, logit_scale, outputs
        )
        (log_probs * torch.linspace(-1, 2, 37, dtype=log_probs.dtype)).sum().backward()
        return [log_probs.double(), entropy.double(), mean_logits.double(), h.grad, w.grad]

    ours = run(CompletionHeadOffAccelerator)
    names = ["log_probs", "entropy", "mean_logits", "d hidden", "d weight"]
    for reference in _references():
        for name, expected, got in zip(names, run(reference), ours, strict=True):
            # TRL accumulates its statistics in float32: agreement to float32 rounding, far below a wrong transform
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=5e-5, msg=f"{name} vs {reference.__name__}")


def test_cpu_head_context_computes_only_what_rpo_reads_and_restores_trl():
    """Inside RPO's context TRL's module sees RPO's head, which skips the mean logit (never logged) and, for the
    reference pass, the entropy; on exit TRL's own function is back."""

    from trl_rpo.lm_head import CompletionHeadOffAccelerator, completion_only_lm_head

    trl_function = trl_utils._ChunkedLogProbFunction
    args = (torch.randn(5, 8), torch.randn(50, 8), None, torch.randint(0, 50, (5,)), 1.0, 1024, None, 1.0)
    every_output = ("log_probs", "entropy", "mean_logits")
    for with_entropy in (True, False):
        with completion_only_lm_head(with_entropy):
            log_probs, entropy, _, mean_logits, _ = trl_utils._ChunkedLogProbFunction.apply(*args, every_output)
        assert trl_utils._ChunkedLogProbFunction is trl_function
        assert log_probs.shape == (5,)
        assert (entropy is not None) == with_entropy
        assert mean_logits is None
    # outside the context the stand-in computes whatever it is asked again (the equivalence test relies on it)
    assert CompletionHeadOffAccelerator.apply(*args, every_output)[3] is not None
