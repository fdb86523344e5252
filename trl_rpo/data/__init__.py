"""Turn the dataset formats a TRL user has into tokenised RPO rows, refusing bad input early.

Accepted formats (standard strings or conversational message lists, extra columns ignored):

- `prompt, completion, reward`: a real-valued reward per row (a bool `reward` column counts as 1.0 / 0.0);
- `prompt, completions, rewards`: several scored completions per prompt (two lists of one length per row), exploded
  to one row per completion;
- `prompt, completion, label`: KTO's unpaired format, `label` True → reward 1.0, False → 0.0;
- `prompt?, chosen, rejected`: DPO's paired format, two rows per pair (chosen, then rejected), rewards from
  `score_chosen` / `score_rejected` when both are present, else 1.0 / 0.0; without `prompt`, the common prefix of the
  two conversations is the prompt (TRL's `extract_prompt`);
- any of the above with an `image` (one) or `images` (a list) column, for a vision-language model: the rows keep
  their images, whose tokens the processor puts in the prompt (conversational prompts get TRL's image placeholders
  before the first user message, as KTOTrainer does).

With `reward_columns` ([`RewardSpec`]) the reward of the unpaired and grouped formats is a weighted sum of several
columns, each optionally transformed (`log1p` for counts such as votes), before the trainer's reward normalisation.

The modules: `formats` (validation and rows), `tokenize` (token ids and keys; the prompt renderer sampling
shares), `prompts` (the prompts a model samples from), `columns` (Arrow column access) and `collator` (batches).
[`check_rows`] validates a split in one pass over its Arrow batches (no column is pulled into
Python lists, so it costs little at any size) and raises one `ValueError` naming the column, the rows and the fix.
[`reward_rows_batch`] and [`tokenize_batch`] then run inside one batched `Dataset.map`. Columns derived by a trainer
(token ids, keys, targets) are never trusted: they are dropped and recomputed with the current trainer's settings.
Every output row keeps `source_row`, the index of the row (or pair, or prompt of a group) in the dataset the user
passed, so that later errors and counts name the user's rows. [`DataCollatorForRewardedCompletions`] pads rows into
batches, from Python rows in training and from Arrow batches (no loop over rows) in the target pass.
"""

from .collator import (
    SHARED_ROW_COLUMNS,
    DataCollatorForRewardedCompletions,
    DataCollatorForRewardedImageCompletions,
    pack_rows,
)
from .columns import column_digest, column_numpy, describe_rows, list_lengths, token_ids_digest
from .formats import (
    DERIVED_COLUMNS,
    FORMATS_HELP,
    GROUPED_COLUMNS,
    IMAGE_COLUMNS,
    OBJECTIVE_COLUMNS,
    PAIRED_COLUMNS,
    PASSTHROUGH_COLUMNS,
    REWARD_TRANSFORMS,
    SCORE_COLUMNS,
    RewardSpec,
    RowFormat,
    check_rows,
    reward_rows_batch,
    to_reward_rows,
)
from .prompts import COMPLETION_COLUMNS, prompt_key, prompt_rows, prompts_digest
from .sampler import LengthGroupedSampler, PromptGroupedSampler
from .tokenize import ids_key, prepare_rows_batch, render_prompt_ids, tokenize_batch, tokenize_image_batch


__all__ = [
    "COMPLETION_COLUMNS",
    "DERIVED_COLUMNS",
    "FORMATS_HELP",
    "GROUPED_COLUMNS",
    "IMAGE_COLUMNS",
    "OBJECTIVE_COLUMNS",
    "PAIRED_COLUMNS",
    "PASSTHROUGH_COLUMNS",
    "REWARD_TRANSFORMS",
    "SCORE_COLUMNS",
    "SHARED_ROW_COLUMNS",
    "DataCollatorForRewardedCompletions",
    "DataCollatorForRewardedImageCompletions",
    "LengthGroupedSampler",
    "PromptGroupedSampler",
    "RewardSpec",
    "RowFormat",
    "check_rows",
    "column_digest",
    "column_numpy",
    "describe_rows",
    "ids_key",
    "list_lengths",
    "pack_rows",
    "prepare_rows_batch",
    "prompt_key",
    "prompt_rows",
    "prompts_digest",
    "render_prompt_ids",
    "reward_rows_batch",
    "to_reward_rows",
    "token_ids_digest",
    "tokenize_batch",
    "tokenize_image_batch",
]
