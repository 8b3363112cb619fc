"""A decode step's attention mask, made by mpbook instead of by the family's forward.

transformers turns the 2D padding mask into the 4D mask its attention reads in every forward
(``masking_utils.create_causal_mask``): a general routine, for any query length, offset,
window or cache, that costs 0.15-0.26 ms of Python per forward on a CPU engine (`small`, 4
rows, against 1.1 ms per decoder layer). A pipeline stage pays it once per micro-batch per
step for its few layers, where a one-device step pays it once for all of them. Made here, a
pipeline stage's compute per micro-batch step fell by 0.10-0.17 ms (of 4.0-4.4); the old
and new masks interleaved on one cluster over 6 rounds (`small`, 8 left-padded prompts, 2
engines) gave decode 1.011x in data parallel, 1.025x in tensor parallel and 1.005x in the
pipeline, whose last stage is paced by its other per-step costs (head, choice, the family's
forward around the layers).

For one new token per row the mask has no causal part: the token sees every position the
cache holds, less each row's left padding. So the 4D mask is the 2D one reshaped, and
transformers takes a prepared 4D mask as it is. What attention is given is exactly what
transformers would have made:

- ``sdpa``: the boolean mask (True: attend) when a row is padded; with no padding anywhere,
  transformers gives sdpa no mask at all, so the 2D mask is passed on for it to decide.
- ``eager``: the mask added to the scores, 0 or the dtype's minimum, always.

Only for families whose every layer attends to the whole cache (no sliding window, no chunks)
and that read the mask only through transformers' mask functions (:data:`FAMILIES`, each read
in its transformers code); anything else keeps the family's own mask creation. Prefill (many
tokens per row) always does.
"""

from __future__ import annotations

from ..compat import transformers as hf_compat

# Model types whose base model hands the attention mask to create_causal_mask (or, for the
# sliding layers they may have, create_sliding_window_causal_mask) and nowhere else.
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo2", "smollm3"})


def kind_for(model) -> str | None:
    """"sdpa" or "eager": the mask this model's decode steps can be given directly; None when
    its family, its attention or a windowed layer needs transformers' own mask creation."""
    config = model.config.get_text_config()
    if config.model_type not in FAMILIES:
        return None
    attention = hf_compat.attn_implementation(config)
    if attention not in ("sdpa", "eager"):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(kind != "full_attention" for kind in layer_types):
        return None
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return None
    return attention


def for_one_token(attention_mask, kind: str, dtype):
    """The 4D mask of a step that adds one token per row, from its 2D padding mask
    (rows, cache length); the 2D mask itself where transformers would give attention none."""
    import torch

    attend = attention_mask.bool()[:, None, None, :]
    if kind == "eager":
        return torch.where(attend, torch.zeros((), device=attend.device, dtype=dtype), torch.finfo(dtype).min)
    if bool(attend.all()):
        return attention_mask  # unpadded: transformers skips the mask for sdpa
    return attend
