"""What the trainers log, gathered per batch and reduced per logging step, in the objectives' neutral terms (a row's
aim, the prompt's baseline — logged as `target` and `value`, see docs/metrics.md). No trainer is imported: the
trainer records each batch and asks for the summary when it logs."""

import collections

import torch
from accelerate import Accelerator

from .losses import pairwise_ranking_counts
from .objectives import RowValues


RECENT_STEPS = 10  # the training steps whose movement `recent_moves` keeps (RPO's end-of-training check reads it)


class BatchMetrics:
    """Per-batch metrics of training and evaluation: one gather of a (rows, 10) table and one of the group keys per
    step (two syncs, whatever the metric count), reduced to means at each log. `rewards/accuracies` counts the
    within-prompt pairs whose implicit rewards are ordered like their rewards: per batch in training, over the
    whole split in evaluation (pairs that do not share a batch count too)."""

    def __init__(self, accelerator: Accelerator, beta: float, tp_size: int = 1):
        self.accelerator = accelerator
        self.beta = beta
        self.tp_size = tp_size
        self.values: dict[str, dict[str, list[float]]] = {"train": collections.defaultdict(list),
                                                          "eval": collections.defaultdict(list)}  # fmt: skip
        self.pair_counts = {"train": [0.0, 0.0], "eval": [0.0, 0.0]}
        # mean log-ratio² and aim² of the last training steps: how far the policy moved, against how far it is asked
        self.recent_moves: collections.deque[tuple[float, float]] = collections.deque(maxlen=RECENT_STEPS)
        self.eval_rows: list[torch.Tensor] = []  # (log-ratio, reward, group) of rows evaluated since the last log
        self.total_train_tokens = 0

    def record(
        self,
        mode: str,
        batch: dict[str, torch.Tensor],
        policy_logps: torch.Tensor,
        row: RowValues,
        entropy: torch.Tensor,
        completion_tokens: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        columns = [policy_logps, batch["ref_logps"], row.aim, row.baseline, row.log_ratios, row.residuals]
        columns += [batch["reward"], entropy, completion_tokens, tokens]
        table = self.accelerator.gather_for_metrics(torch.stack([c.float() for c in columns], dim=1)).cpu()
        groups = self.accelerator.gather_for_metrics(batch["group_key"]).cpu()
        policy, ref, aim, baseline, log_ratio, residual, reward, entropy, completion_tokens, tokens = table.unbind(1)
        values = self.values[mode]
        for key, column in [("logps/policy", policy), ("logps/ref", ref), ("log_ratio", log_ratio), ("kl", log_ratio)]:
            values[key].append(column.mean().item())
        values["target"].append(aim.mean().item())
        values["value"].append(baseline.mean().item())
        values["rewards/implicit"].append(self.beta * log_ratio.mean().item())
        values["_residual_sq"].append(residual.pow(2).mean().item())
        values["entropy"].append((entropy.sum() / completion_tokens.sum().clamp(min=1)).item())
        if mode == "eval":  # ranked over the whole split at `summary`, not only pairs that share a batch
            self.eval_rows.append(torch.stack([log_ratio.double(), reward.double(), groups.double()], dim=1))
        else:
            self.recent_moves.append((log_ratio.pow(2).mean().item(), aim.pow(2).mean().item()))
            agree, pairs = pairwise_ranking_counts(log_ratio, reward, groups)  # τ > 0: same order as τ·log-ratio
            self.pair_counts[mode][0] += agree.item()
            self.pair_counts[mode][1] += pairs.item()
            self.total_train_tokens += int(tokens.sum().item()) // self.tp_size
        values["num_tokens"] = [self.total_train_tokens]

    def summary(self, mode: str) -> dict[str, float]:
        """The means since the last summary of `mode`, then cleared."""
        metrics = {key: sum(val) / len(val) for key, val in self.values[mode].items() if val}
        if "_residual_sq" in metrics:  # the root of the mean square, not a mean of per-batch roots
            metrics["residual_rms"] = metrics.pop("_residual_sq") ** 0.5
        if mode == "eval" and self.eval_rows:
            log_ratio, reward, groups = torch.cat(self.eval_rows).unbind(1)
            agree, pairs = pairwise_ranking_counts(log_ratio, reward, groups)
            self.pair_counts["eval"] = [agree.item(), pairs.item()]
            self.eval_rows = []
        agree, pairs = self.pair_counts[mode]
        if pairs > 0:
            metrics["rewards/accuracies"] = agree / pairs
        self.values[mode].clear()
        self.pair_counts[mode] = [0.0, 0.0]
        return metrics
