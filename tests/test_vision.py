"""Vision-language models (the `VisionLanguageLayout`) on a tiny LLaVA built in-process: rows with `image` /
`images`, standard and conversational, a processor as `processing_class`. The reference log-probs are the plain
model's log-probs of exactly the completion tokens given the row's images; the targets group rows by prompt *and*
images; the first loss is the hand-computed one; LoRA moves only the adapter and its disabled-adapter base is π_ref."""

import numpy as np
import pytest
import torch
from conftest import assert_only_adapter_moved, capture_target_passes
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

from trl_rpo import DROConfig, DROTrainer, RPOConfig, RPOTrainer
from trl_rpo.testing import build_causal_lm, build_vision_lm, build_vision_processor


@pytest.fixture(scope="module")
def processor():
    return build_vision_processor()


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(count)]


def conversational_rows() -> dict[str, list]:
    """Three prompts with the same text and three different images, three answers each; the right answer differs
    per image, so only the images tell the prompts apart."""
    rows = {"prompt": [], "completion": [], "reward": [], "image": []}
    for index, image in enumerate(_images(3)):
        for answer, word in enumerate(["cat", "dog", "bird"]):
            rows["prompt"].append([{"role": "user", "content": "What is in the picture?"}])
            rows["completion"].append([{"role": "assistant", "content": f"A {word}."}])
            rows["reward"].append(1.0 if answer == index else -0.5 * answer)
            rows["image"].append(image)
    return rows


def standard_rows() -> dict[str, list]:
    """Standard strings with the image token in the prompt: one image, two images, and a text-only prompt."""
    first, second = _images(2, seed=1)
    prompts = [("<image> Describe it.", [first]), ("<image><image> Compare them.", [first, second]), ("Hi!", [])]
    rows = {"prompt": [], "completion": [], "reward": [], "images": []}
    for prompt, images in prompts:
        for reward, completion in enumerate([" Red.", " Blue and green.", " Nothing."]):
            rows["prompt"].append(prompt)
            rows["completion"].append(completion)
            rows["reward"].append(float(reward))
            rows["images"].append(images)
    return rows


def _args(tmp_path, **kwargs) -> RPOConfig:
    defaults = {
        "output_dir": str(tmp_path / "out"), "report_to": "none", "per_device_train_batch_size": 3, "max_steps": 3,
        "logging_steps": 1, "learning_rate": 0.05, "save_strategy": "no", "disable_tqdm": True,
        "cache_ref_log_probs": False, "logps_aggregation": "sum", "beta": 1.0,
    }  # fmt: skip
    return RPOConfig(**{**defaults, **kwargs})


def _naive_logps(model, processor, row: dict) -> float:
    """Summed log-prob of the row's completion tokens, from plain logits of the model given the row's images."""
    ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if row["images"]:
        inputs["pixel_values"] = processor.image_processor(images=row["images"], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(**inputs).logits[0].double()
    start = len(row["prompt_ids"])
    token_logps = torch.log_softmax(logits[start - 1 : -1], -1).gather(1, ids[0, start:, None]).squeeze(1)
    return token_logps.sum().item()


@pytest.mark.parametrize("rows", [conversational_rows, standard_rows])
def test_reference_logps_read_each_rows_images(tmp_path, processor, rows):
    model = build_vision_lm(processor)
    trainer = RPOTrainer(model, args=_args(tmp_path), train_dataset=Dataset.from_dict(rows()),
                         processing_class=processor)  # fmt: skip
    assert trainer.layout.name == "vision-language"
    dataset = trainer.train_dataset
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    for row in dataset:
        # The processor expanded each image to its 4 tokens, all in the prompt; the completion ends with EOS.
        assert row["prompt_ids"].count(image_token) == 4 * len(row["images"])
        assert image_token not in row["completion_ids"]
        assert processor.tokenizer.eos_token_id in row["completion_ids"][-2:]  # the template may add a newline
        assert row["ref_logps"] == pytest.approx(_naive_logps(model.eval(), processor, row), rel=1e-5)
    # Without its images the same tokens score differently: the reference really read them.
    image_row = next(row for row in dataset if row["images"])
    blind = {**image_row, "images": _images(len(image_row["images"]), seed=9)}
    assert abs(_naive_logps(model, processor, blind) - image_row["ref_logps"]) > 1e-4


def test_prompts_are_told_apart_by_their_images(tmp_path, processor):
    """Same prompt text, three images: three prompts, each with its own V̂ (the targets of its three rows)."""
    model = build_vision_lm(processor)
    args = _args(tmp_path, reward_normalization="none", partition_estimator="empirical")
    trainer = RPOTrainer(model, args=args, train_dataset=Dataset.from_dict(conversational_rows()),
                         processing_class=processor)  # fmt: skip
    dataset = trainer.train_dataset
    groups = np.asarray(dataset["group_key"])
    assert len(np.unique(groups)) == 3
    assert (groups.reshape(3, 3) == groups.reshape(3, 3)[:, :1]).all()  # rows of one image share a group
    ref = torch.tensor(dataset["ref_logps"], dtype=torch.float64).view(3, 3)
    rewards = torch.tensor(dataset["reward"], dtype=torch.float64).view(3, 3)
    value = torch.logsumexp(ref + rewards, dim=1, keepdim=True)  # V̂ = log Σ π_ref·exp(r) at τ = 1, per image
    torch.testing.assert_close(torch.tensor(dataset["target"], dtype=torch.float64).view(3, 3), rewards - value)


def test_first_loss_and_gradient_match_a_naive_computation(tmp_path, processor):
    rows = conversational_rows()
    model = build_vision_lm(processor)
    args = _args(tmp_path, per_device_train_batch_size=9, max_steps=1, learning_rate=0.0, max_grad_norm=None)
    trainer = RPOTrainer(model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=processor)
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    # Naive: the same policy's log-probs row by row, from plain logits with each row's own images.
    trainer.model.zero_grad()
    residuals = []
    for row in dataset:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        pixels = processor.image_processor(images=row["images"], return_tensors="pt")["pixel_values"]
        logits = trainer.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits[0]
        start = len(row["prompt_ids"])
        logp = torch.log_softmax(logits[start - 1 : -1].float(), -1).gather(1, ids[0, start:, None]).sum()
        residuals.append(logp - row["ref_logps"] - row["target"])
    naive = 0.5 * torch.stack(residuals).pow(2).mean()
    naive.backward()
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    assert loss.item() == pytest.approx(0.5 * np.mean(np.square(dataset["target"])), rel=1e-5)  # policy = reference
    assert grads, "no parameter got a gradient"
    for name, param in trainer.model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)


def test_lora_trains_the_adapter_and_its_disabled_base_is_the_reference(tmp_path, processor, monkeypatch):
    model = build_vision_lm(processor)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = RPOTrainer(model, args=_args(tmp_path), train_dataset=Dataset.from_dict(standard_rows()),
                         processing_class=processor, peft_config=peft_config)  # fmt: skip
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert_only_adapter_moved(before, trainer.model)
    # A split first seen by `evaluate()` after training is scored by the base with the adapter disabled.
    seen = capture_target_passes(trainer, monkeypatch)
    metrics = trainer.evaluate({"held_out": Dataset.from_dict(conversational_rows()).select(range(3))})
    bare = build_vision_lm(processor).eval()  # same seed: the base weights before training
    for row in seen["held_out"]:
        assert row["ref_logps"] == pytest.approx(_naive_logps(bare, processor, row), rel=1e-5)
    assert abs(metrics["eval_held_out_log_ratio"]) > 1e-4  # and the policy that trained is not that reference
    logs = trainer.state.log_history
    assert any(abs(log.get("log_ratio", 0.0)) > 1e-4 for log in logs)  # the adapter moved the policy


def test_max_length_drops_rows_whose_prompt_fills_it_and_never_cuts_an_image(tmp_path, processor):
    rows = standard_rows()
    model = build_vision_lm(processor)
    lengths = [
        len(processor(text=[p], images=i or None)["input_ids"][0])
        for p, i in zip(rows["prompt"], rows["images"], strict=True)
    ]
    max_length = max(lengths)  # the two-image prompt fills it: its rows are dropped, counted
    trainer = RPOTrainer(model, args=_args(tmp_path, max_length=max_length), train_dataset=Dataset.from_dict(rows),
                         processing_class=processor)  # fmt: skip
    assert len(trainer.train_dataset) == 6
    assert all(len(images) < 2 for images in trainer.train_dataset["images"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    assert batch["input_ids"].shape[1] <= max_length
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_token).sum().item() == 4 * batch["pixel_values"].shape[0]
    trainer.train()


def test_the_reference_cache_keys_on_the_images(tmp_path, processor):
    """Same text, other images: another cache entry (a miss), never the first dataset's log-probs."""
    model = build_vision_lm(processor)
    rows = conversational_rows()
    other = {**rows, "image": [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in rows["image"]]}
    logs = []
    for data in (rows, other, rows):
        args = _args(tmp_path, cache_ref_log_probs=True)
        trainer = RPOTrainer(model, args=args, train_dataset=Dataset.from_dict(data), processing_class=processor)
        logs.append((trainer.target_pass_log["train"]["cache"], trainer.train_dataset["ref_logps"]))
    assert [cache for cache, _ in logs] == ["miss", "miss", "hit"]
    assert logs[2][1] == pytest.approx(logs[0][1])
    assert logs[1][1] != pytest.approx(logs[0][1])


def test_image_rows_are_refused_where_they_cannot_work(tmp_path, processor, tokenizer, t5_dir):
    data = Dataset.from_dict(conversational_rows())
    text_rows = data.remove_columns("image")
    with pytest.raises(ValueError, match=r"eval dataset has image columns \(image\) but the training split has none"):
        RPOTrainer(build_vision_lm(processor), args=_args(tmp_path), train_dataset=text_rows, eval_dataset=data,
                   processing_class=processor)  # fmt: skip
    with pytest.raises(ValueError, match="no image processor: pass the model's processor"):
        RPOTrainer(build_causal_lm(tokenizer), args=_args(tmp_path), train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ValueError, match="cannot pack image rows"):
        RPOTrainer(build_vision_lm(processor), args=_args(tmp_path, padding_free=True), train_dataset=data,
                   processing_class=processor)  # fmt: skip
    with pytest.raises(ValueError, match="this model is an encoder-decoder"):
        RPOTrainer(t5_dir, args=_args(tmp_path), train_dataset=data, processing_class=processor)
    rows = conversational_rows()
    both = Dataset.from_dict({**rows, "images": [[image] for image in rows["image"]]})
    with pytest.raises(ValueError, match="both 'image' and 'images' columns"):
        RPOTrainer(build_vision_lm(processor), args=_args(tmp_path), train_dataset=both, processing_class=processor)


def test_dro_trains_its_value_network_on_image_rows(tmp_path, processor):
    """DRO's shared value head (on the policy's hidden state at the prompt's last token) trains on image rows."""
    args = DROConfig(
        output_dir=str(tmp_path / "dro"), report_to="none", per_device_train_batch_size=3, max_steps=2,
        learning_rate=0.05, save_strategy="no", disable_tqdm=True, cache_ref_log_probs=False,
    )  # fmt: skip
    trainer = DROTrainer(build_vision_lm(processor), args=args, train_dataset=Dataset.from_dict(conversational_rows()),
                         processing_class=processor)  # fmt: skip
    before = {name: p.detach().clone() for name, p in trainer.value_model.named_parameters()}
    trainer.train()
    for name, param in trainer.value_model.named_parameters():
        assert not torch.equal(before[name], param), name


def test_a_saved_vision_model_trains_by_its_path_with_its_own_processor(tmp_path, processor):
    """As with KTOTrainer: `RPOTrainer("<folder>")` loads the vision-language model and, with no `processing_class`,
    its processor (`AutoProcessor`), whose image processor the layout then uses."""
    folder = tmp_path / "tiny-llava"
    build_vision_lm(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    trainer = RPOTrainer(str(folder), args=_args(tmp_path), train_dataset=Dataset.from_dict(standard_rows()))
    assert trainer.layout.name == "vision-language"
    assert type(trainer.model).__name__ == "LlavaForConditionalGeneration"
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())


def test_a_processor_that_marks_image_tokens_in_the_text_is_refused(tmp_path, processor, monkeypatch):
    """Gemma 3 / Qwen2.5-VL processors return `token_type_ids` / `mm_token_type_ids`: not carried yet, so refused
    with the reason, never trained on with the marks lost."""
    real = type(processor).__call__

    def with_marks(self, *args, **kwargs):
        encoded = real(self, *args, **kwargs)
        encoded["mm_token_type_ids"] = [[0] * len(ids) for ids in encoded["input_ids"]]
        return encoded

    monkeypatch.setattr(type(processor), "__call__", with_marks)
    with pytest.raises(ValueError, match=r"marks image tokens in the text \(mm_token_type_ids\)"):
        RPOTrainer(build_vision_lm(processor), args=_args(tmp_path), train_dataset=Dataset.from_dict(standard_rows()),
                   processing_class=processor)  # fmt: skip
