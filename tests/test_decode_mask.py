"""A decode step's attention mask made by mpbook (mpbook.models.decode_mask) gives attention
exactly what transformers' own mask creation gives it: the same mask, and the same logits to
the bit, on every family it is used for, padded or not, with sdpa and eager attention."""

from __future__ import annotations

import pytest
import torch

from mpbook.models import decode_mask
from mpbook.models.loading import Stage
from mpbook.models.shrink import shrink_config

PROMPT_LENGTHS = (7, 4, 1)  # left-padded to 7
STEPS = 3


def _model(model_type: str, attention: str, **overrides):
    from transformers import AutoModelForCausalLM

    config = shrink_config(model_type)
    for name, value in overrides.items():
        setattr(config, name, value(config) if callable(value) else value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def _decode(model, mask, *, ours: bool):
    """Prefill a left-padded batch, then STEPS greedy steps: each step's mask and logits."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    kind = decode_mask.kind_for(model)
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, mask.shape)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)
        masks, logits = [], [out.logits]
        for _ in range(STEPS):
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            positions = positions[:, -1:] + 1
            given = decode_mask.for_one_token(mask, kind, model.dtype) if ours else mask
            embeds = model.get_input_embeddings()(tokens)
            masks.append(create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=given,
                                            cache=cache, position_ids=positions))
            out = model(input_ids=tokens, attention_mask=given, position_ids=positions, cache=cache, use_cache=True,
                        logits_to_keep=1)
            logits.append(out.logits)
    return masks, torch.cat(logits, dim=1)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", sorted(decode_mask.FAMILIES))
def test_the_step_mask_is_transformers_own_and_the_logits_are_bitwise_equal(model_type, attention, padded):
    model = _model(model_type, attention, **({"sliding_window": None} if model_type in ("mistral",) else {}))
    assert decode_mask.kind_for(model) == attention
    width = max(PROMPT_LENGTHS)
    lengths = PROMPT_LENGTHS if padded else (width,) * len(PROMPT_LENGTHS)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    their_masks, their_logits = _decode(model, mask, ours=False)
    our_masks, our_logits = _decode(model, mask, ours=True)
    for theirs, ours in zip(their_masks, our_masks):
        if theirs is None:  # sdpa with no padding: no mask at all, either way
            assert ours is None
        else:
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert torch.equal(our_logits, their_logits)


def test_the_step_mask_is_4d_where_transformers_would_build_one():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    sdpa = decode_mask.for_one_token(mask, "sdpa", torch.float32)
    assert sdpa.shape == (2, 1, 1, 3) and sdpa.dtype == torch.bool and sdpa[0, 0, 0].tolist() == [False, True, True]
    eager = decode_mask.for_one_token(mask, "eager", torch.bfloat16)
    assert eager.dtype == torch.bfloat16 and eager[0, 0, 0, 0] == torch.finfo(torch.bfloat16).min
    assert eager[1].eq(0).all()
    unpadded = torch.ones(2, 3, dtype=torch.long)
    assert decode_mask.for_one_token(unpadded, "sdpa", torch.float32) is unpadded


@pytest.mark.parametrize(("model_type", "overrides", "why"), [
    ("mistral", {}, "a sliding window (the shrunk config's is 4)"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1,
               "layer_types": lambda config: ["full_attention"] + ["sliding_attention"] * (config.num_hidden_layers - 1)}, "sliding layers"),
    ("gemma", {}, "a family outside the list"),
])
def test_families_that_need_their_own_mask_keep_it(model_type, overrides, why):
    model = _model(model_type, "eager", **overrides)
    assert decode_mask.kind_for(model) is None, why
    assert Stage(model, first=True, last=True, layers=range(model.config.num_hidden_layers)).step_mask_kind is None


def test_a_stage_of_a_listed_family_makes_its_own_step_mask():
    model = _model("llama", "sdpa")
    assert Stage(model, first=True, last=True, layers=range(model.config.num_hidden_layers)).step_mask_kind == "sdpa"
