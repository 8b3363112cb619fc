"""One device, plain transformers: the result every layout must reproduce (tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence


def reference(model: str, prompts: Sequence[str], *, max_new_tokens: int, dtype: str = "float32",
              attention: str | None = None, **generate_options):
    """Returns (logits per prompt, generated ids per prompt) from one process, no mpbook code
    in the model's path: the same left padding and positions as the engines use, and
    transformers' own ``generate`` (greedy unless ``generate_options`` say otherwise).

    ``attention``: the attention implementation (default: the one transformers picks).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from . import models

    folder = models.resolve(model)
    tokenizer = models.load_tokenizer(folder)
    kwargs = {"attn_implementation": attention} if attention else {}
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs).eval()
    batch = tokenizer(list(prompts), padding=True, return_tensors="pt")
    mask = batch.attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.inference_mode():
        logits = lm(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions).logits.float()
        per_prompt = [logits[r, -int(mask[r].sum()):] for r in range(len(prompts))]
        tokens = []
        if max_new_tokens:
            options = {"do_sample": False, **generate_options}
            out = lm.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **options)
            tokens = out[:, batch.input_ids.shape[1]:].tolist()
    return per_prompt, tokens
