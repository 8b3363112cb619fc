"""One device, plain transformers: the result every layout must reproduce (tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence

from .protocol import DEFAULT_DTYPE


def reference(model: str, prompts: Sequence, *, max_new_tokens: int, dtype: str = DEFAULT_DTYPE,
              attention: str | None = None, chat: bool | None = None, system: str | None = None,
              **generate_options):
    """Returns (logits per prompt, generated ids per prompt) from one process, with no mpbook
    code between the prompts and the outputs, so that a bug mpbook's runs share with it
    cannot hide: the tokenizer as transformers loads it, padding on the left; the prompts
    through its own call, or its own chat template (by mpbook's rule: when the tokenizer has
    one unless ``chat=False``, always for a prompt given as a list of messages, ``system``
    first); each prompt's logits from a forward pass of that prompt alone (no padding, so no
    positions to work out); and transformers' own ``generate`` on the padded batch (greedy
    unless ``generate_options`` say otherwise). Each prompt's generated ids end at its
    finishing token (end-of-sequence or a stop string): the padding ``generate`` puts after it
    is dropped, as mpbook's results hold it. Only the model's folder is found by mpbook
    (a preset's name, a hub id or a folder).

    ``attention``: the attention implementation (default: the one transformers picks).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import resolve

    folder = resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tokenizer.pad_token is None:  # a batch needs one; generate pads finished rows with it
        tokenizer.pad_token = tokenizer.eos_token
    prompts = list(prompts)
    use_chat = bool(tokenizer.chat_template) if chat is None else chat
    if use_chat or any(not isinstance(p, str) for p in prompts):
        conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
        if system is not None:
            conversations = [c if c[0]["role"] == "system" else [{"role": "system", "content": system}, *c]
                             for c in conversations]
        batch = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                              return_tensors="pt", return_dict=True)
    else:
        batch = tokenizer(prompts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kwargs = {"attn_implementation": attention} if attention else {}
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs).eval()
    with torch.inference_mode():
        per_prompt = [lm(input_ids=ids[r][mask[r].bool()][None]).logits[0].float() for r in range(len(prompts))]
        tokens = []
        if max_new_tokens:
            options = {"do_sample": False, **generate_options}
            if "stop_strings" in options:
                options.setdefault("tokenizer", tokenizer)
            out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, **options)
            criteria = None
            if options.get("stop_strings"):
                from transformers import StopStringCriteria

                criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(options["stop_strings"]))
            width = ids.shape[1]
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
