"""What determines the samples of a generation run: [`SamplingSettings`], recorded and compared on resume."""

from dataclasses import dataclass


BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class SamplingSettings:
    """What determines the samples; recorded in `generation_config.json` and compared when a run resumes."""

    model: str
    revision: str | None
    adapter: str | None
    dtype: str
    temperature: float
    top_p: float
    top_k: int | None
    max_new_tokens: int
    num_generations: int
    seed: int
    backend: str

    def __post_init__(self):
        checks = {
            "num_generations": self.num_generations >= 1,
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k is None or self.top_k >= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(
                    f"`{name}={getattr(self, name)!r}` is invalid: use num_generations >= 1, temperature > 0, "
                    "0 < top_p <= 1, top_k >= 1 (or None: no top-k), max_new_tokens >= 1."
                )
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend={self.backend!r}` is unknown: use one of {list(BACKENDS)}.")

    @property
    def samples_reference(self) -> bool:
        """Whether the samples follow the model's own distribution (what the Monte-Carlo estimator assumes)."""
        return self.temperature == 1 and self.top_p == 1 and self.top_k is None
