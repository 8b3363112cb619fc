"""One device, plain transformers: the result every layout must reproduce (tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence


def reference(model: str, prompts: Sequence, *, max_new_tokens: int, dtype: str = "float32",
              attention: str | None = None, chat: bool | None = None, system: str | None = None,
              **generate_options):
    """Returns (logits per prompt, generated ids per prompt) from one process, no mpbook code
    in the model's path: the prompts encoded as mpbook encodes them (the chat template by the
    same rule), left-padded with the same positions, and transformers' own ``generate``
    (greedy unless ``generate_options`` say otherwise). Each prompt's generated ids end at
    its finishing token (end-of-sequence or a stop string): the padding ``generate`` puts
    after it is dropped, as mpbook's results hold it.

    ``attention``: the attention implementation (default: the one transformers picks).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from . import models
    from .session import encode_prompts

    folder = models.resolve(model)
    tokenizer = models.load_tokenizer(folder)
    encoded = encode_prompts(tokenizer, list(prompts), chat=chat, system=system)
    kwargs = {"attn_implementation": attention} if attention else {}
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs).eval()
    batch = tokenizer.pad({"input_ids": [list(ids) for ids in encoded.input_ids]}, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.inference_mode():
        logits = lm(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits.float()
        per_prompt = [logits[r, -int(mask[r].sum()):] for r in range(len(prompts))]
        tokens = []
        if max_new_tokens:
            options = {"do_sample": False, **generate_options}
            if "stop_strings" in options:
                options.setdefault("tokenizer", tokenizer)
            out = lm.generate(input_ids=batch["input_ids"], attention_mask=mask, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, **options)
            criteria = None
            if options.get("stop_strings"):
                from transformers import StopStringCriteria

                criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(options["stop_strings"]))
            width = batch["input_ids"].shape[1]
            tokens = [_until_finished(row[width:], row[:width], lm.generation_config, criteria)
                      for row in out.tolist()]
    return per_prompt, tokens


def _until_finished(row: list[int], prompt: list[int], generation_config, criteria) -> list[int]:
    """A row of ``generate``'s output up to and including its finishing token: an
    end-of-sequence id, or the token with which a stop string matched. ``criteria`` is the
    StopStringCriteria generate() used, which matches text on the prompt and the new ids
    together, inside the last token too ("on" ends a row at "money")."""
    import torch

    eos = generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
        if criteria is not None and bool(criteria(torch.tensor([prompt + row[: i + 1]]), None)[0]):
            return row[: i + 1]
    return row
