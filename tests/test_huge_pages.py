"""A CPU model's weights on transparent huge pages (mpbook.models.huge_pages): a real model
from from_pretrained, its large weights moved onto 2 MiB pages, bit for bit, ties kept, and the
engines' runners load that way."""

from __future__ import annotations

import pytest
import torch

from mpbook import models
from mpbook.models.huge_pages import HUGE_PAGE, available, huge_page_bytes, place_on_huge_pages

needs_thp = pytest.mark.skipif(not available(), reason="this kernel has transparent huge pages off ('never')")


@needs_thp
def test_large_weights_move_onto_huge_pages_bit_for_bit_and_ties_hold():
    lm = models.load_whole("small", dtype=torch.float32, device=torch.device("cpu"))
    before = {name: t.clone() for name, t in lm.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.inference_mode():
        logits_before = lm(ids).logits
    large = [p for p in lm.parameters() if p.numel() * p.element_size() >= HUGE_PAGE]
    small = [(p, p.data_ptr()) for p in lm.parameters() if p.numel() * p.element_size() < HUGE_PAGE]
    assert large and small

    moved = place_on_huge_pages(lm)

    # every large tensor once (the tied head and embedding are one), the small ones untouched
    assert moved == sum({p.data_ptr(): p.numel() * p.element_size() for p in large}.values())
    assert all(p.data_ptr() == ptr for p, ptr in small)
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    for name, t in lm.state_dict().items():
        assert torch.equal(t, before[name]), name
    # the kernel backs them with huge pages (a mapping holds at least its aligned 2 MiB pages)
    for p in large:
        assert huge_page_bytes(p) >= HUGE_PAGE, f"{tuple(p.shape)}: {huge_page_bytes(p)} bytes on huge pages"
    with torch.inference_mode():
        torch.testing.assert_close(lm(ids).logits, logits_before, rtol=0, atol=0)


def test_nothing_moves_where_the_kernel_has_no_huge_pages(monkeypatch, tmp_path):
    from mpbook.models import huge_pages

    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    layer = torch.nn.Linear(1024, 1024)
    ptr = layer.weight.data_ptr()
    assert place_on_huge_pages(layer) == 0 and layer.weight.data_ptr() == ptr
    setting.write_text("always [madvise] never\n")
    assert huge_pages.available() is hasattr(__import__("mmap"), "MADV_HUGEPAGE")


@needs_thp
def test_engines_hold_their_weights_on_huge_pages(workbench):
    """A runner after loading, whole or a stage: its large weights on huge pages (every layout
    passes the same place after loading; small's tp=2 shards are under 2 MiB, so pp here)."""
    def weights_on_huge_pages(state):
        from mpbook.models.huge_pages import HUGE_PAGE, huge_page_bytes

        runner = state.cache["runner"]
        large = [p for p in runner.model.parameters() if p.numel() * p.element_size() >= HUGE_PAGE]
        return len(large), sum(huge_page_bytes(p) >= HUGE_PAGE for p in large)

    for layout in (dict(strategy="data", dp=2), dict(strategy="pipeline", pp=2)):
        result = workbench.generate(["Hi"] * 2, model="small", max_new_tokens=2, **layout)
        assert result.new_tokens == 4
        for large, on_huge_pages in workbench.apply(weights_on_huge_pages, stream=False):
            assert large > 0 and on_huge_pages == large, layout
