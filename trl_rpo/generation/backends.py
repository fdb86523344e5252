"""The samplers: functions `(prompt ids, seed) -> [(completion ids, finished)]`, `num_generations` per prompt, in
order — transformers' `generate` (every model, every device) or vLLM (one process, a CUDA GPU)."""

import importlib.util

import torch
from accelerate import PartialState
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    PreTrainedModel,
    set_seed,
)
from trl.trainer.utils import pad

from .settings import SamplingSettings


def _load_model(settings: SamplingSettings, trust_remote_code: bool) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(
        settings.model, revision=settings.revision, trust_remote_code=trust_remote_code
    )
    auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto_class.from_pretrained(
        settings.model, revision=settings.revision, dtype=settings.dtype, trust_remote_code=trust_remote_code
    )
    if settings.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, settings.adapter).merge_and_unload()  # merged: plain, faster forward
    return model.eval()


def _eos_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos)


def transformers_sampler(settings: SamplingSettings, tokenizer, trust_remote_code: bool, device):
    """A function `(prompt ids, seed) -> [(completion ids, finished)]`, `num_generations` per prompt, in order."""
    model = _load_model(settings, trust_remote_code).to(device)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    encoder_decoder = model.config.is_encoder_decoder
    # A fresh configuration, not the model's: its sampling defaults (temperature, top-k, repetition penalty, …) would
    # change the distribution the recorded settings describe. `top_k=0` switches off transformers' default of 50.
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k or 0,
        max_new_tokens=settings.max_new_tokens,
        num_return_sequences=settings.num_generations,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=model.generation_config.bos_token_id,
        decoder_start_token_id=model.generation_config.decoder_start_token_id,
    )
    model.generation_config = generation_config  # so `generate` does not fill unset values from the model's

    def sample(prompt_ids: list[list[int]], seed: int) -> list[tuple[list[int], bool]]:
        # Causal models continue the prompt, so it is padded on the left; an encoder reads it whole (right padding).
        side = "right" if encoder_decoder else "left"
        input_ids = pad([torch.tensor(ids) for ids in prompt_ids], padding_value=pad_id, padding_side=side)
        mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], padding_value=0, padding_side=side)
        set_seed(seed)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device))
        new_tokens = output[:, 1:] if encoder_decoder else output[:, input_ids.shape[1] :]  # 1: decoder start token
        return [_until_eos(ids, eos_ids) for ids in new_tokens.tolist()]

    return sample


def _until_eos(ids: list[int], eos_ids: list[int]) -> tuple[list[int], bool]:
    """The tokens before the first EOS, and whether there was one (else the sample hit `max_new_tokens`)."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position], True
    return ids, False


# ------------------------------------------------------------------------------------------------------- vLLM
VLLM_HELP = "Install vLLM (`pip install vllm`, on a machine with a CUDA GPU) or use backend='transformers'."


def check_vllm(state: PartialState) -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"backend='vllm' needs the `vllm` package, which is not installed. {VLLM_HELP}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"backend='vllm' needs a CUDA GPU, and none is visible. {VLLM_HELP}")
    if state.num_processes > 1:
        raise ValueError(
            "backend='vllm' runs in one process (vLLM spreads a model over GPUs itself, with tensor parallelism). "
            "Run `trl-rpo generate --backend vllm` without accelerate, or use backend='transformers' to shard."
        )


def vllm_sampler(settings: SamplingSettings, tokenizer, trust_remote_code: bool, device):
    """The vLLM version of [`transformers_sampler`]: same prompt token ids, same settings. Not run by this project's
    tests (no GPU, no vLLM there)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=settings.model,
        revision=settings.revision,
        dtype=settings.dtype,
        seed=settings.seed,
        trust_remote_code=trust_remote_code,
        enable_lora=settings.adapter is not None,
        generation_config="vllm",  # vLLM's neutral defaults, not the model's own sampling settings
    )
    lora_request = None
    if settings.adapter:
        from vllm.lora.request import LoRARequest

        lora_request = LoRARequest("adapter", 1, settings.adapter)

    def sample(prompt_ids: list[list[int]], seed: int) -> list[tuple[list[int], bool]]:
        params = SamplingParams(
            n=settings.num_generations,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k or -1,  # -1: no top-k
            max_tokens=settings.max_new_tokens,
            seed=seed,
        )
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = llm.generate(requests, params, lora_request=lora_request, use_tqdm=False)
        return [(list(c.token_ids), c.finish_reason == "stop") for output in outputs for c in output.outputs]

    return sample
