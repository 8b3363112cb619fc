"""What a run asks for: prompts, their lengths, precision, attention kernel; checked early."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MpbookError
from ..options import check_max_new_tokens, check_microbatches, check_stage_sizes

# "sdpa" is what mpbook's loader asks transformers for; "eager" materializes the scores.
ATTENTION = ("sdpa", "eager")

# The prompts of the default workload: what `bench` runs and the calibration's reference runs
# decode (mpbook.planner.calibrating), so that the speed model is fitted where it is held to account.
SAMPLE_PROMPTS = [
    "Explain pipeline parallelism in one sentence.",
    "What does an all-reduce do?",
    "Why do micro-batches shrink the pipeline bubble?",
    "Tensor parallelism splits every weight matrix across devices, so",
    "Data parallel replicas",
    "The KV cache holds",
    "A model too large for one GPU",
    "Throughput is measured in tokens per second",
]


def sample_prompts(batch: int) -> list[str]:
    """``batch`` prompts: the sample ones, repeated as needed."""
    return (SAMPLE_PROMPTS * (batch // len(SAMPLE_PROMPTS) + 1))[:batch]


@dataclass(frozen=True)
class Workload:
    """What runs on the layout: prompts, lengths, precision, attention kernel."""

    batch: int
    prompt_len: int
    max_new_tokens: int
    microbatches: int
    dtype: str
    attention: str
    stage_sizes: tuple[int, ...] | None = None

    @property
    def tokens(self) -> int:
        """Positions a row's KV cache holds at the end: the prompt and every new token but
        the last, which is returned and never fed back (``max_new_tokens - 1`` decode steps)."""
        return self.prompt_len + max(self.max_new_tokens - 1, 0)


def checked_workload(
    config,
    *,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    microbatches: int,
    dtype: str,
    attention: str,
    stage_sizes: Sequence[int] | str | None,
) -> Workload:
    """The workload, or a one-line MpbookError naming the bad number and the valid range.

    ``dtype`` is already checked (mpbook.options.check_dtype); the stage sizes' sum is checked
    where the layers are split (mpbook.parallel.pipeline.split_layers)."""
    if attention not in ATTENTION:
        raise MpbookError(f"attention={attention!r}: choose one of {', '.join(ATTENTION)}")
    batch = _whole("batch", batch, 1)
    prompt_len = _whole("prompt_len", prompt_len, 1)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    microbatches = check_microbatches(microbatches)
    positions = getattr(config, "max_position_embeddings", None)
    if positions and prompt_len + max_new_tokens > positions:
        raise MpbookError(
            f"prompt_len={prompt_len} + max_new_tokens={max_new_tokens} = {prompt_len + max_new_tokens} tokens is beyond "
            f"the model's {positions} positions (max_position_embeddings); keep the sum <= {positions}"
        )
    return Workload(batch, prompt_len, max_new_tokens, microbatches, dtype, attention, check_stage_sizes(stage_sizes))


def _whole(name: str, value, low: int) -> int:
    # batch and prompt_len are the planner's own arguments (a run counts its prompts itself).
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MpbookError(f"{name}={value!r}: must be a whole number >= {low}")
    return value
