import itertools
import os
import textwrap

import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModel, TrainerCallback
from trl.trainer.utils import get_config_model_id

from .dro_config import DROConfig
from .files import atomic_path, write_json
from .modeling import disable_dropout
from .objectives import DROObjective, RowValues
from .rewarded_trainer import RewardedCompletionsTrainer


VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_CONFIG_FILE = "value_head_config.json"


class ValueNetwork(nn.Module):
    """V_φ(x): a zero-initialised linear head on given prompt features, or on a backbone of its own (mean-pooled)."""

    def __init__(self, hidden_size: int, backbone: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)  # V_φ = 0 at step 0, whatever the backbone says
        nn.init.zeros_(self.head.bias)

    def forward(self, features=None, input_ids=None, attention_mask=None) -> torch.Tensor:
        if self.backbone is not None:
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            features = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(features.to(self.head.weight.dtype)).squeeze(-1)


class _ZeroValueGrads(TrainerCallback):
    """`Trainer` zeroes the gradients of its model only: clear the value network's after each optimizer step."""

    def __init__(self, trainer: "DROTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.value_model.zero_grad(set_to_none=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.value_model.zero_grad(set_to_none=True)


class DROTrainer(RewardedCompletionsTrainer):
    """
    Trainer for the Direct Reward Optimisation baseline (DRO-V) of [Offline Regularised Reinforcement Learning for
    Large Language Models Alignment](https://huggingface.co/papers/2405.19107) (Richemond et al., 2024).

    DRO learns from the same unpaired `(prompt, completion, reward)` rows as [`RPOTrainer`] and minimises, jointly
    over the policy π_θ and a value network V_φ, loss = ½·mean((r − V_φ(x) − τ·(log π_θ(y|x) − ℓ_ref))²), with ℓ_ref
    the stored reference log-probs and r the normalised rewards, both computed exactly as for RPO. V_φ is a
    zero-initialised linear head on the policy's own hidden state at the last prompt token (`value_model_type=
    "shared"`) or on a separate model (`"separate"`); see [`DROConfig`]. Its parameters are trained in an optimizer
    parameter group of their own (`value_learning_rate`), clipped together with the policy's by `max_grad_norm`,
    and saved as `value_head.safetensors` (with `value_head_config.json`) next to the policy in every checkpoint
    and in `save_model()`'s directory. The value network is available as `trainer.value_model`.

    The constructor, data formats, reference options, evaluation and logging are those of [`RPOTrainer`] (both build
    on one base; neither reads the other's options or columns). The logged
    `value` is the mean V_φ(x), `target` the mean (r − V_φ(x))/τ (the log-ratio that would zero the residual) and
    `residual_rms` the root mean square of r − V_φ(x) − τ·log-ratio.
    """

    _tag_names = ["trl", "dro", "trl-rpo"]
    _name = "DRO"
    _paper = {
        "title": "Offline Regularised Reinforcement Learning for Large Language Models Alignment",
        "id": "2405.19107",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{richemond2024offline,
                title        = {{Offline Regularised Reinforcement Learning for Large Language Models Alignment}},
                author       = {Pierre Harvey Richemond and Yunhao Tang and Daniel Guo and Daniele Calandriello and
                                Mohammad Gheshlaghi Azar and Rafael Rafailov and Bernardo Avila Pires and
                                Eugene Tarassov and Lucas Spangher and Will Ellsworth and Aliaksei Severyn and
                                Jonathan Mallinson and Lior Shani and Gil Shamir and Rishabh Joshi and Tianqi Liu and
                                Remi Munos and Bilal Piot},
                year         = 2024,
                eprint       = {arXiv:2405.19107},
            }"""),
    }
    _config_class = DROConfig
    _objective_class = DROObjective  # ℓ_ref and the normalised reward: V_φ is learnt, nothing else is stored

    def __init__(self, model, ref_model=None, args: DROConfig | None = None, *positional, **kwargs):
        self._hidden_states = None
        super().__init__(model, ref_model, args, *positional, **kwargs)  # checks `args` against `_config_class`
        args = self.args
        self.value_model = self._build_value_model(model).to(self.accelerator.device)
        if args.disable_dropout:
            disable_dropout(self.value_model)
        if self.accelerator.num_processes > 1:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise NotImplementedError("DROTrainer's value network does not support DeepSpeed or FSDP yet.")
            self.value_model = self.accelerator.prepare_model(self.value_model)
        self.add_callback(_ZeroValueGrads(self))
        if self.optimizer is not None:  # passed through `optimizers`
            known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            if any(id(p) not in known for p in self.value_model.parameters() if p.requires_grad):
                raise ValueError(
                    "The optimizer passed in `optimizers` does not hold the value network's parameters. Build the "
                    "trainer without `optimizers`, or add a param group for `trainer.value_model.parameters()`."
                )

    # ------------------------------------------------------------------------------------- value network
    def _build_value_model(self, model) -> ValueNetwork:
        if self.args.value_model_type == "separate":
            path = self.args.value_model_name_or_path
            if path is None:
                path = model if isinstance(model, str) else get_config_model_id(model.config)
            trust = self.args.trust_remote_code
            backbone = AutoModel.from_pretrained(path, trust_remote_code=trust)
            if getattr(backbone.config, "is_encoder_decoder", False):
                backbone = backbone.get_encoder()
            hidden_size = AutoConfig.from_pretrained(path, trust_remote_code=trust).get_text_config().hidden_size
            return ValueNetwork(hidden_size, backbone)
        if not self.is_encoder_decoder:
            # The fused LM head returns log-probs only: catch the backbone's last hidden state on its way out.
            policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
            policy.base_model.register_forward_hook(self._keep_hidden_states)
        return ValueNetwork(self.model.config.get_text_config().hidden_size)

    def _keep_hidden_states(self, module, args, output) -> None:
        self._hidden_states = output.last_hidden_state

    def _values(self, batch, outputs) -> torch.Tensor:
        """V_φ(x) of each row, from the prompt tokens only."""
        prompt_ids, prompt_mask = self.layout.prompt_inputs(batch)
        prompt_len = prompt_mask.sum(-1)
        if self.args.value_model_type == "separate":
            width = max(int(prompt_len.max()), 1)
            return self.value_model(input_ids=prompt_ids[:, :width], attention_mask=prompt_mask[:, :width])
        if self.is_encoder_decoder:
            states = outputs.encoder_last_hidden_state
        else:
            states, self._hidden_states = self._hidden_states, None
        offset = states.size(1) - prompt_ids.size(1)  # prompt-learning PEFT prepends virtual tokens
        last = (prompt_len - 1).clamp(min=0) + offset
        return self.value_model(features=states[torch.arange(states.size(0), device=states.device), last])

    # -------------------------------------------------------------------------------------------- loss
    def _loss_from_logps(self, batch, policy_logps, outputs) -> tuple[torch.Tensor, RowValues]:
        self.value_model.train(self.model.training)
        return self.objective.loss(batch, policy_logps, self._values(batch, outputs))

    # ------------------------------------------------------------------------------- optimizer and grads
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if any(group.get("name") == "value" for group in optimizer.param_groups):
            return optimizer
        if self.args.rescale_policy_lr:
            for group in optimizer.param_groups:
                group["lr"] /= self.args.beta
        lr = self.args.learning_rate if self.args.value_learning_rate is None else self.args.value_learning_rate
        value_model = self.accelerator.unwrap_model(self.value_model)
        decay = set(self.get_decay_parameter_names(value_model))
        params = [(n, p) for n, p in value_model.named_parameters() if p.requires_grad]
        for weight_decay, chosen in [(self.args.weight_decay, True), (0.0, False)]:
            group = [p for n, p in params if (n in decay) == chosen]
            if group:
                optimizer.add_param_group({"params": group, "lr": lr, "weight_decay": weight_decay, "name": "value"})
        return optimizer

    def _clip_grad_norm(self, model):
        if self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        # One norm over the policy and the value network, as for a single model.
        parameters = itertools.chain(model.parameters(), self.value_model.parameters())
        return self.accelerator.clip_grad_norm_(parameters, self.args.max_grad_norm)

    # ----------------------------------------------------------------------------------------- saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.save_value_model(output_dir if output_dir is not None else self.args.output_dir)

    def save_value_model(self, output_dir: str) -> None:
        """Write the value network's weights (`value_head.safetensors`) and `value_head_config.json` to a folder."""
        os.makedirs(output_dir, exist_ok=True)
        value_model = self.accelerator.unwrap_model(self.value_model)
        with atomic_path(os.path.join(output_dir, VALUE_HEAD_FILE)) as tmp:
            save_model(value_model, str(tmp))
        config = {
            "value_model_type": self.args.value_model_type,
            "value_model_name_or_path": self.args.value_model_name_or_path,
            "hidden_size": value_model.head.in_features,
        }
        write_json(os.path.join(output_dir, VALUE_CONFIG_FILE), config)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, VALUE_HEAD_FILE)
        if os.path.exists(path):
            load_model(self.accelerator.unwrap_model(self.value_model), path, device=str(self.accelerator.device))
