"""`generate_completions` and `trl-rpo generate` (SPEC §7): N samples per prompt with the prompt's columns, the chat
template, exactly the recorded sampling settings, resume after an interruption, refusal of a resume with other
settings, the Monte-Carlo warning, encoder-decoder models, adapters, and 2 processes through `accelerate launch`."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin

import trl_rpo
from trl_rpo import generate_completions
from trl_rpo.cli import cli
from trl_rpo.data import prompt_rows


ROOT = Path(__file__).resolve().parents[1]
FAST = {"max_new_tokens": 4, "batch_size": 2}
PROMPTS = {
    "prompt": ["1 + 1 =", "2 + 2 =", "3 + 3 ="],
    "answer": ["2", "4", "6"],
    "meta": [{"id": 1}, {"id": 2}, {"id": 3}],
}


@pytest.fixture
def generate_calls(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(input_ids, output)` of every `model.generate` call from now on (one input row per prompt, left-padded)."""
    calls, real = [], GenerationMixin.generate

    def spy(self, *args, **kwargs):
        output = real(self, *args, **kwargs)
        calls.append((kwargs["input_ids"], output))
        return output

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


def _prompts_seen(calls, tokenizer) -> list[str]:
    return [tokenizer.decode(ids[ids != tokenizer.pad_token_id]) for batch, _ in calls for ids in batch]


def test_n_samples_per_prompt_carry_the_prompt_columns(model_dir, tmp_path):
    out = tmp_path / "out"
    rows = generate_completions(Dataset.from_dict(PROMPTS), model=model_dir, output_dir=out, num_generations=3, **FAST)
    assert rows.column_names == ["prompt", "answer", "meta", "completion", "prompt_index", "sample_index", "finished"]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(p, s) for p in range(3) for s in range(3)]
    for row in rows:
        for column in ("prompt", "answer", "meta"):
            assert row[column] == PROMPTS[column][row["prompt_index"]]
        assert isinstance(row["completion"], str)
    assert len(set(rows["completion"])) > 3  # sampled, not one greedy answer per prompt
    written = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert written == rows.to_list()


def test_finished_says_which_samples_ended_before_the_token_limit(model_dir, tmp_path, generate_calls):
    """`finished` is True exactly for the samples whose generated tokens hold an end-of-sequence token."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # A random tiny model rarely samples its one EOS token: every even token id ends a sequence here (a list of EOS
    # ids, as many chat models declare), so that both kinds of sample occur.
    eos_ids = list(range(0, model.config.vocab_size, 2))
    model.generation_config.eos_token_id = eos_ids
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "model")
    prompts = Dataset.from_dict({"prompt": [f"{i} + {i} =" for i in range(8)]})
    rows = generate_completions(
        prompts, model=str(tmp_path / "model"), output_dir=tmp_path / "out", num_generations=4, max_new_tokens=3,
        batch_size=8,
    )  # fmt: skip
    ((inputs, output),) = generate_calls
    new_tokens = output[:, inputs.shape[1] :]
    expected = torch.isin(new_tokens, torch.tensor(eos_ids)).any(-1).tolist()
    assert rows["finished"] == expected
    assert 0 < sum(expected) < len(expected)  # both kinds occur, so a constant column would fail


def test_settings_are_recorded(model_dir, tmp_path):
    out = tmp_path / "out"
    generate_completions(
        Dataset.from_dict(PROMPTS), model=model_dir, output_dir=out, num_generations=2, seed=7, top_k=5, **FAST
    )
    recorded = json.loads((out / "generation_config.json").read_text())
    expected = {
        "model": os.path.abspath(model_dir), "revision": None, "adapter": None, "dtype": "auto", "temperature": 1.0,
        "top_p": 1.0, "top_k": 5, "max_new_tokens": 4, "num_generations": 2, "seed": 7, "backend": "transformers",
        "num_prompts": 3, "trl_rpo_version": trl_rpo.__version__,
    }  # fmt: skip
    assert {key: recorded[key] for key in expected} == expected


def test_trainer_datasets_give_their_distinct_prompts(caplog):
    scored = Dataset.from_dict(
        {
            "prompt": ["a", "a", "b", "a"],
            "completion": [" x", " y", " z", " w"],
            "reward": [1.0, 0.0, 1.0, 0.5],
            "answer": ["A", "A", "B", "A"],  # one value per prompt: a prompt column
            "judge_note": ["ok", "bad", "ok", "meh"],  # differs within a prompt: a completion column
        }
    )
    assert prompt_rows(scored) == [{"prompt": "a", "answer": "A"}, {"prompt": "b", "answer": "B"}]
    assert "judge_note" in caplog.text
    labelled = Dataset.from_dict({"prompt": ["a", "b", "b"], "completion": ["1", "2", "3"], "label": [True] * 3})
    assert prompt_rows(labelled) == [{"prompt": "a"}, {"prompt": "b"}]
    user = [{"role": "user", "content": "hi"}]
    pairs = Dataset.from_dict(
        {
            "chosen": [[*user, {"role": "assistant", "content": "hello"}]] * 2,
            "rejected": [
                [*user, {"role": "assistant", "content": "go"}],
                [*user, {"role": "assistant", "content": "no"}],
            ],
        }
    )
    assert prompt_rows(pairs) == [{"prompt": user}]
    duplicated = Dataset.from_dict({"prompt": ["a", "a"]})  # a prompt-only dataset: every row is a prompt
    assert prompt_rows(duplicated) == [{"prompt": "a"}, {"prompt": "a"}]
    with pytest.raises(ValueError, match="no 'prompt' column.*--prompt_column"):
        prompt_rows(Dataset.from_dict({"question": ["a"]}))


def test_conversational_prompts_get_the_chat_template(model_dir, tmp_path, generate_calls):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    dataset = Dataset.from_dict({"prompt": [conversation], "completion": [[{"role": "assistant", "content": "4"}]]})
    rows = generate_completions(dataset, model=model_dir, output_dir=tmp_path / "out", num_generations=2, **FAST)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert _prompts_seen(generate_calls, tokenizer) == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    ]
    assert rows["prompt"] == [conversation] * 2
    for completion in rows["completion"]:
        assert len(completion) == 1
        assert completion[0]["role"] == "assistant"
        assert isinstance(completion[0]["content"], str)


def test_samples_follow_the_settings_not_the_models_defaults(model_dir, tmp_path, generate_calls):
    """At temperature 1 with no top-k, every token can be sampled: neither the model's own `generation_config.json`
    (top-k 1 here, which would make every sample the same) nor transformers' default top-k of 50 truncates."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.generation_config.do_sample = True
    model.generation_config.top_k = 1
    model.generation_config.temperature = 0.1
    folder = tmp_path / "model-with-defaults"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    prompt = "1 + 1 ="
    generate_completions(
        Dataset.from_dict({"prompt": [prompt]}), model=str(folder), output_dir=tmp_path / "out", num_generations=120,
        max_new_tokens=1,
    )  # fmt: skip
    ((_, output),) = generate_calls
    sampled = set(output[:, -1].tolist())
    with torch.no_grad():
        logits = model(**AutoTokenizer.from_pretrained(model_dir)(prompt, return_tensors="pt")).logits[0, -1]
    assert len(sampled) > 50  # about 100 distinct tokens in 120 draws from this near-uniform random model
    assert sampled - set(logits.topk(50).indices.tolist())


def test_an_interrupted_run_resumes_where_it_stopped(model_dir, tmp_path, generate_calls):
    prompts = Dataset.from_dict({"prompt": [f"{i} + {i} =" for i in range(5)]})
    out = tmp_path / "out"
    settings = {"model": model_dir, "output_dir": out, "num_generations": 2, **FAST}
    generate_completions(prompts, **settings)
    shard = out / "shards" / "rank-0.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    assert len(lines) == 10
    # Interrupted while writing prompt 2: its first sample is whole, its second cut mid-line; prompts 3-4 never came.
    shard.write_text("".join(lines[:5]) + lines[5][:20])
    (out / "completions.jsonl").unlink()
    generate_calls.clear()

    rows = generate_completions(prompts, **settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert _prompts_seen(generate_calls, tokenizer) == ["2 + 2 =", "3 + 3 =", "4 + 4 ="]  # not prompts 0 and 1
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(p, s) for p in range(5) for s in range(2)]
    assert shard.read_text().startswith("".join(lines[:5]))  # the kept rows were not rewritten
    assert rows.to_list()[:4] == [json.loads(line) for line in lines[:4]]

    generate_calls.clear()
    assert generate_completions(prompts, **settings).to_list() == rows.to_list()  # a finished run: nothing to do
    assert generate_calls == []


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "foreign rows"])
def test_a_damaged_shard_is_counted_and_its_prompts_sampled_again(model_dir, tmp_path, generate_calls, caplog, damage):
    """Shard lines that are not whole samples of these prompts — random bytes, a file cut mid-way, valid JSON of
    another run (a wrong prompt index, another prompt's text) — are never merged: they are counted in a warning that
    names the shard, and only their prompts are sampled again."""
    prompts = Dataset.from_dict({"prompt": [f"{i} + {i} =" for i in range(4)]})
    out = tmp_path / "out"
    settings = {"model": model_dir, "output_dir": out, "num_generations": 2, **FAST}
    first = generate_completions(prompts, **settings).to_list()
    shard = out / "shards" / "rank-0.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    if damage == "random bytes":  # prompt 1's two samples overwritten
        shard.write_bytes(b"".join(lines[:2]) + os.urandom(300) + b"\n" + b"".join(lines[4:]))
        resampled = ["1 + 1 ="]
    elif damage == "truncated":  # cut inside prompt 2's first sample
        shard.write_bytes(b"".join(lines[:4]) + lines[4][:25])
        resampled = ["2 + 2 =", "3 + 3 ="]
    else:  # prompt 3's rows claim another prompt's index, and another text under prompt 0's
        moved = [json.dumps({**json.loads(line), "prompt_index": 9}).encode() + b"\n" for line in lines[6:]]
        renamed = [json.dumps({**json.loads(line), "prompt": "7 + 7 ="}).encode() + b"\n" for line in lines[:2]]
        shard.write_bytes(b"".join(renamed + lines[2:6] + moved))
        resampled = ["0 + 0 =", "3 + 3 ="]
    (out / "completions.jsonl").unlink()
    generate_calls.clear()
    with caplog.at_level(logging.WARNING, logger="trl_rpo"):
        rows = generate_completions(prompts, **settings).to_list()
    assert f"damaged line(s) of {shard}" in caplog.text
    assert _prompts_seen(generate_calls, AutoTokenizer.from_pretrained(model_dir)) == resampled
    assert [(r["prompt"], r["prompt_index"], r["sample_index"]) for r in rows] == [
        (f"{p} + {p} =", p, s) for p in range(4) for s in range(2)
    ]
    kept = [p for p in range(4) if f"{p} + {p} =" not in resampled]
    assert [r for r in rows if r["prompt_index"] in kept] == [r for r in first if r["prompt_index"] in kept]


@pytest.mark.parametrize("damage", [b'{"temperature": 1.0, "see', b"\xff\xfe\x00 not text", b"[1, 2]"])
def test_a_damaged_record_stops_with_the_file_and_the_fix(model_dir, tmp_path, damage):
    settings = {"model": model_dir, "output_dir": tmp_path / "out", "num_generations": 2, **FAST}
    generate_completions(Dataset.from_dict(PROMPTS), **settings)
    record = tmp_path / "out" / "generation_config.json"
    record.write_bytes(damage)
    with pytest.raises(ValueError, match=f"generation record {record} is damaged.*Restore the file, or move"):
        generate_completions(Dataset.from_dict(PROMPTS), **settings)


@pytest.mark.parametrize(
    ("change", "named"),
    [({"temperature": 0.5}, "temperature=1.0 there, 0.5 now"), ({"num_generations": 3}, "num_generations=2 there")],
)
def test_resuming_with_other_settings_is_refused(model_dir, tmp_path, change, named):
    settings = {"model": model_dir, "output_dir": tmp_path / "out", "num_generations": 2, **FAST}
    generate_completions(Dataset.from_dict(PROMPTS), **settings)
    with pytest.raises(ValueError, match=named + ".*another `output_dir`"):
        generate_completions(Dataset.from_dict(PROMPTS), **{**settings, **change})
    with pytest.raises(ValueError, match="different prompts"):
        generate_completions(Dataset.from_dict({"prompt": ["other"]}), **settings)


@pytest.mark.parametrize(
    ("settings", "warned"),
    [({"temperature": 0.7}, True), ({"top_p": 0.9}, True), ({"top_k": 20}, True), ({}, False)],
)
def test_sampling_other_than_the_reference_is_warned_about(model_dir, tmp_path, caplog, settings, warned):
    with caplog.at_level(logging.WARNING):
        generate_completions(
            Dataset.from_dict({"prompt": ["1 + 1 ="]}), model=model_dir, output_dir=tmp_path / "out",
            num_generations=1, max_new_tokens=1, **settings,
        )  # fmt: skip
    messages = [r.getMessage() for r in caplog.records if "partition_estimator='monte_carlo'" in r.getMessage()]
    assert bool(messages) == warned
    if warned:
        assert "different distribution" in messages[0]
        assert "partition_estimator='empirical'" in messages[0]


def test_encoder_decoder_models_generate(t5_dir, tmp_path):
    rows = generate_completions(
        Dataset.from_dict(PROMPTS), model=t5_dir, output_dir=tmp_path / "out", num_generations=2, **FAST
    )
    assert len(rows) == 6
    assert all(isinstance(c, str) for c in rows["completion"])
    assert len(set(rows["completion"])) > 1


def test_an_adapter_changes_the_samples(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # zero at initialisation: a large update, so that the samples surely change
            torch.nn.init.normal_(param, std=1.0)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    settings = {"num_generations": 4, **FAST}
    base = generate_completions(Dataset.from_dict(PROMPTS), model=model_dir, output_dir=tmp_path / "a", **settings)
    tuned = generate_completions(
        Dataset.from_dict(PROMPTS), model=model_dir, output_dir=tmp_path / "b", adapter=str(adapter), **settings
    )
    assert base["completion"] != tuned["completion"]  # same seed, other weights
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text())["adapter"] == str(adapter)


def test_vllm_backend_without_vllm_or_gpu_says_what_to_do(model_dir, tmp_path):
    with pytest.raises((ImportError, RuntimeError), match="vllm.*backend='transformers'"):
        generate_completions(Dataset.from_dict(PROMPTS), model=model_dir, output_dir=tmp_path / "out", backend="vllm")
    data = _write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    with pytest.raises((ImportError, RuntimeError), match="vllm.*backend='transformers'"):  # GRPOConfig's name
        cli(["generate", "--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir",
             str(tmp_path / "cli"), "--use_vllm"])  # fmt: skip


def _write_jsonl(path: Path, columns: dict[str, list]) -> Path:
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_generate_command(model_dir, tmp_path, capsys):
    level_before = logging.getLogger("trl_rpo").level
    data = _write_jsonl(tmp_path / "questions.jsonl", {"question": PROMPTS["prompt"], "answer": PROMPTS["answer"]})
    config = tmp_path / "generate.yaml"
    config.write_text(f"model_name_or_path: {model_dir}\nnum_generations: 2\nmax_completion_length: 3\n")
    out = tmp_path / "out"
    cli(["generate", "--config", str(config), "--dataset_name", str(data), "--prompt_column", "question",
         "--output_dir", str(out), "--temperature", "1.0"])  # fmt: skip
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["answer"], r["sample_index"]) for r in rows] == [
        (p, a, s) for p, a in zip(PROMPTS["prompt"], PROMPTS["answer"], strict=True) for s in range(2)
    ]
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 3
    assert f"3 of 3 prompts left to sample in {out}" in capsys.readouterr().err  # said at the default log level
    cli(["generate", "--config", str(config), "--dataset_name", str(data), "--prompt_column", "question",
         "--output_dir", str(out), "--temperature", "1.0"])  # fmt: skip
    assert f"0 of 3 prompts left to sample in {out} (3 already sampled)" in capsys.readouterr().err
    assert logging.getLogger("trl_rpo").level == level_before  # the command's log level ends with it


@pytest.mark.slow
def test_two_processes_share_the_prompts(model_dir, tmp_path):
    """`trl-rpo generate --accelerate_config multi_cpu` relaunches itself on 2 processes; each samples its share into
    its own shard, and the merged rows are the ones a single process gives."""
    prompts = {"prompt": [f"{i} + 1 =" for i in range(5)], "answer": [str(i + 1) for i in range(5)]}
    data = _write_jsonl(tmp_path / "prompts.jsonl", prompts)
    out = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env |= {"ACCELERATE_USE_CPU": "true", "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache")}
    command = [
        sys.executable, "-m", "trl_rpo", "generate", "--accelerate_config", "multi_cpu", "--num_processes", "2",
        "--main_process_port", "29543", "--model_name_or_path", model_dir, "--dataset_name", str(data),
        "--output_dir", str(out), "--num_generations", "2", "--max_new_tokens", "3", "--batch_size", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "on 2 process(es)" in result.stdout
    shards = {path.name: path.read_text().splitlines() for path in (out / "shards").glob("*.jsonl")}
    assert sorted(shards) == ["rank-0.jsonl", "rank-1.jsonl"]
    assert [len(lines) for _, lines in sorted(shards.items())] == [6, 4]  # 3 and 2 prompts, 2 samples each
    two = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    one = generate_completions(
        Dataset.from_dict(prompts), model=model_dir, output_dir=tmp_path / "one", num_generations=2, max_new_tokens=3
    )
    pairs = [(r["prompt_index"], r["sample_index"], r["prompt"], r["answer"]) for r in two]
    assert pairs == [(r["prompt_index"], r["sample_index"], r["prompt"], r["answer"]) for r in one]
