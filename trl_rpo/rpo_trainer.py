import textwrap

from accelerate.logging import get_logger

from .objectives import RPOObjective
from .rewarded_trainer import RewardedCompletionsTrainer
from .rpo_config import RPOConfig


logger = get_logger(__name__)

_MOVED_WARNING = 0.05  # log-ratio RMS below 5 % of the target RMS at the end of training: the policy did not move


class RPOTrainer(RewardedCompletionsTrainer):
    """
    Trainer for Reward Partitioning Optimization (RPO), from [Value-Free Policy Optimization via Reward
    Partitioning](https://huggingface.co/papers/2506.13702) (Faye, Azzag and Lebbah, 2025). Not TRL's former
    `rpo_alpha`, NVIDIA's Reward-aware PO or Relative PO.

    RPO learns from unpaired `(prompt, completion, reward)` rows. Before training, one no-grad pass of the frozen
    reference gives ℓ_ref = log π_ref(y|x) for every row; with the rewards r (normalised, see
    [`RPOConfig.reward_normalization`]) it gives, per prompt x, V̂(x) = τ·log Σ_j π_ref(y_j|x)·exp(r_j/τ) over all the
    prompt's rows, and a per-row target t = (r − V̂(x))/τ. Training then regresses the log-ratio onto it:
    loss = ½·mean((log π_θ(y|x) − ℓ_ref − t)²), one policy forward per row and no reference forward.

    A drop-in replacement for [`~trl.KTOTrainer`]: the same constructor, the same reference options (explicit
    `ref_model`; with PEFT and no `ref_model`, the base model with the adapter disabled; otherwise the initial
    policy, used for the target pass before any update so that no copy is kept), the same evaluation, logging and
    model-card behaviour.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from trl_rpo import RPOConfig, RPOTrainer

    >>> dataset = Dataset.from_dict({
    ...     "prompt": ["2 + 2 =", "2 + 2 =", "3 + 1 ="],
    ...     "completion": [" 4", " 5", " 4"],
    ...     "reward": [1.0, -1.0, 1.0],
    ... })
    >>> trainer = RPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=RPOConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    ```

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train: a model id or local path (loaded with `args.model_init_kwargs`), a model, or a PEFT
            model: a causal LM, an encoder-decoder (Flan-T5) or a vision-language model (LLaVA-style; the rows
            then carry `image`/`images`).
        ref_model ([`~transformers.PreTrainedModel`], *optional*):
            Frozen reference π_ref. If `None`: the base model with the adapter disabled under PEFT, else the initial
            policy (the targets are computed before the first update).
        args ([`RPOConfig`], *optional*):
            Configuration. Defaults to `RPOConfig("<model name>-RPO")`.
        data_collator (`DataCollator`, *optional*):
            Defaults to [`DataCollatorForRewardedCompletions`]. A custom collator must emit the same keys.
        train_dataset ([`~datasets.Dataset`]):
            Map-style dataset in one of the formats of `trl_rpo.data` (`reward`, KTO `label`, or paired
            `chosen`/`rejected`), standard or conversational. An [`~datasets.IterableDataset`] is refused: V̂(x) needs
            every completion of a prompt before training.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Evaluation split(s), same formats. Their targets use the training split's reward statistics.
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or [`~transformers.ProcessorMixin`], *optional*):
            Tokenizer, or the processor of a vision-language model. Loaded from the model's path if `None`; the EOS
            token pads when there is no pad token.
        compute_metrics (`Callable[[EvalPrediction], dict]`, *optional*):
            As in [`~trl.KTOTrainer`] (logits recomputed with an extra forward).
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Callbacks to add to the defaults.
        optimizers (`tuple`, *optional*, defaults to `(None, None)`):
            Optimizer and scheduler; AdamW with a linear schedule if not given.
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Quantisation for a model loaded from a string; combine with `peft_config` for QLoRA.
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration to wrap the model with.
    """

    _tag_names = ["trl", "rpo", "trl-rpo"]
    _name = "RPO"
    _config_class = RPOConfig  # the configuration class `args` must be (and the default's)
    _objective_class = RPOObjective  # its columns (ℓ_ref, t, V̂), their maths and the loss
    _paper = {
        "title": "Value-Free Policy Optimization via Reward Partitioning",
        "id": "2506.13702",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{faye2025rpo,
                title        = {{Value-Free Policy Optimization via Reward Partitioning}},
                author       = {Bilal Faye and Hanane Azzag and Mustapha Lebbah},
                year         = 2025,
                eprint       = {arXiv:2506.13702},
            }"""),
    }

    def train(self, *args, **kwargs):
        """[`~transformers.Trainer.train`], then a warning if the policy barely moved towards its targets."""
        output = super().train(*args, **kwargs)
        self._warn_if_barely_moved()
        return output

    def _warn_if_barely_moved(self) -> None:
        """A run that ends with log-ratios a few percent of its targets (in RMS, over the last steps) has not trained:
        typically a learning rate made for another setting (KTO's default 1e-6 on a LoRA adapter)."""
        recent = self.batch_metrics.recent_moves
        if not recent:
            return
        moved, asked = (sum(values) / len(values) for values in zip(*recent, strict=True))
        moved, asked = moved**0.5, asked**0.5
        if asked > 0 and moved < _MOVED_WARNING * asked:
            logger.warning(
                f"Training barely moved the policy: over its last {len(recent)} steps the log-ratios "
                f"log π_θ/π_ref have an RMS of {moved:.3g} against targets of {asked:.3g} (RMS), "
                f"{moved / asked:.1%} of the way. Raise `learning_rate` (LoRA adapters want ≈ 1e-4 to 1e-3; KTO's "
                "default 1e-6 is for full fine-tuning), train longer, or lower `beta` for larger targets; if the "
                "data's targets are mostly a level shared by each prompt's rows (see the warning at the start), "
                "change the partition estimate as it says."
            )
