"""`disable_dropout=True` switches off every dropout, functional ones included (T5's attention reads
`config.dropout_rate`, Llama's `config.attention_dropout`), so that at the first step the policy in training mode
gives exactly the stored reference log-probs: a logged log-ratio of 0."""

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from trl_rpo import RPOTrainer
from trl_rpo.modeling import disable_dropout
from trl_rpo.testing import build_causal_lm, build_seq2seq_lm, build_t5_tokenizer, build_tokenizer


@pytest.fixture(scope="module")
def t5_with_dropout(tmp_path_factory) -> str:
    """A tiny T5 keeping T5's default `dropout_rate=0.1`, which its attention applies with `nn.functional`."""
    tokenizer = build_t5_tokenizer()
    model = build_seq2seq_lm(tokenizer)
    assert model.config.dropout_rate == 0.1
    folder = tmp_path_factory.mktemp("t5-dropout")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama_with_attention_dropout(tmp_path_factory) -> str:
    tokenizer = build_tokenizer()
    model = build_causal_lm(tokenizer)
    model.config.attention_dropout = 0.1
    folder = tmp_path_factory.mktemp("llama-dropout")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _first_log_ratio(model_dir, make_args, dataset, disable: bool) -> float:
    # Sequential batches of the target pass's size: the first training batch holds the same rows, padded alike.
    args = make_args(max_steps=1, disable_dropout=disable, train_sampling_strategy="sequential", seed=1)
    trainer = RPOTrainer(model_dir, args=args, train_dataset=dataset)
    trainer.train()
    return trainer.state.log_history[0]["log_ratio"]


@pytest.mark.parametrize("fixture", ["t5_with_dropout", "llama_with_attention_dropout"])
def test_first_step_log_ratio_is_zero_only_without_dropout(request, fixture, make_args, reward_dataset):
    model_dir = request.getfixturevalue(fixture)
    assert _first_log_ratio(model_dir, make_args, reward_dataset, disable=True) == pytest.approx(0.0, abs=1e-6)
    # The same model with its dropout left on moves away from the reference at once: the model does have dropout.
    assert abs(_first_log_ratio(model_dir, make_args, reward_dataset, disable=False)) > 1e-3


def test_disable_dropout_names_the_functional_rates(t5_with_dropout, llama_with_attention_dropout):
    t5 = AutoModelForSeq2SeqLM.from_pretrained(t5_with_dropout)
    changed = disable_dropout(t5)
    assert "encoder.block.0.layer.0.SelfAttention.dropout" in changed  # a float, not an nn.Dropout
    assert all(
        not (isinstance(v, float) and v > 0) for m in t5.modules() for k, v in vars(m).items() if "dropout" in k
    )
    llama = AutoModelForCausalLM.from_pretrained(llama_with_attention_dropout)
    assert "model.layers.0.self_attn.attention_dropout" in disable_dropout(llama)
