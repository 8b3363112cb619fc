"""Out of memory, predicted and real: each error names the rank and its bytes, and advises only
layouts of these engines that need less memory per rank than the one that failed.

The real one is forced on CPU engines of this module's own cluster: each engine's address
space is capped (``RLIMIT_AS``) a little above what it maps now, so that loading the `small`
preset's 76 MiB of weights fails inside torch, as a device's allocation would; the cap is
lifted afterwards and the cluster stopped at the end.
"""

from __future__ import annotations

import re

import pytest

import mpbook
from mpbook import MpbookError, Workbench
from mpbook.layout import Layout
from mpbook.units import format_bytes

PROMPTS = ["Hello there", "What is it", "Tell me more", "Why not"]
LAYOUT = re.compile(r"dp=(\d+) x pp=(\d+) x tp=(\d+)")
HEADROOM = 40 << 20  # bytes an engine may still map once capped: about half the small preset's weights


def layouts_in(text: str) -> list[Layout]:
    return [Layout(*map(int, m)) for m in LAYOUT.findall(text)]


@pytest.fixture(scope="module")
def own_wb():
    """Two CPU engines of this module alone: the test caps their memory."""
    wb = Workbench.start(2, cpu=True)
    yield wb
    wb.stop()


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    from mpbook.models import build_preset

    return str(build_preset("small", tmp_path_factory.mktemp("small")))


def _cap_address_space(state, headroom: int) -> int:
    """Let this engine map at most ``headroom`` bytes more than it maps now."""
    import resource

    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, resource.RLIM_INFINITY))
    return mapped + headroom


def _uncap_address_space(state) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _share(wb: Workbench) -> int:
    """What each of the engines may count on, as the session's memory check counts it: CPU
    engines on one host share its available memory and what their models would free."""
    engines = wb.status()
    assert len({e.host for e in engines}) == 1
    return (engines[0].memory_free_bytes + sum(e.model_bytes for e in engines)) // len(engines)


def _peak(model, layout: Layout, free: int, **work) -> tuple[int, bool]:
    planned = mpbook.plan(model, dp=layout.dp, pp=layout.pp, tp=layout.tp, device_memory_bytes=free, **work)
    return planned.peak_bytes, planned.fits


@pytest.mark.cluster
def test_a_real_out_of_memory_on_cpu_engines_advises_layouts_that_need_less(own_wb, small_folder):
    wb = own_wb
    # The model's code and transformers imported first, so that the cap meets the loading.
    wb.generate(PROMPTS, strategy="data", model="tiny", max_new_tokens=2)
    wb.apply(_cap_address_space, HEADROOM, stream=False)
    try:
        with pytest.raises(MpbookError) as info:
            wb.generate(PROMPTS, strategy="data", model=small_folder, max_new_tokens=2)
    finally:
        wb.apply(_uncap_address_space, stream=False)
    message = str(info.value)
    failed, _, advice = message.partition("; layouts of 2 engines that need less memory per rank than ")
    assert re.fullmatch(r"out of memory on rank 0 \(cpu\): (asked for [\d.]+ [KMG]iB|MemoryError: Cannot allocate memory .*); "
                        r"[\d.]+ GiB of the host's "
                        r"[\d.]+ GiB available; this engine may map [\d.]+ [KMG]iB at most \(its RLIMIT_AS\) "
                        r"\(rank 1 too\)", failed), message
    assert advice.startswith("dp=2 x pp=1 x tp=1 ("), message
    asked, _, listing = advice.partition(" predicted): ")

    # Every layout named needs less per rank than the one that failed, as the planner says
    # it for these engines and prompts, and none that does is left out (all of them, not
    # the last one alone): here both ways of halving the weights.
    from mpbook.models import load_tokenizer

    prompt_len = max(len(ids) for ids in load_tokenizer(small_folder).apply_chat_template(
        [[{"role": "user", "content": p}] for p in PROMPTS], add_generation_prompt=True, tokenize=True,
        return_dict=False))
    free = _share(wb)
    work = dict(batch=len(PROMPTS), prompt_len=prompt_len, max_new_tokens=2)
    need, _ = _peak(small_folder, Layout(dp=2), free, **work)
    named = layouts_in(listing)
    assert sorted(map(str, named)) == ["dp=1 x pp=1 x tp=2", "dp=1 x pp=2 x tp=1"], message
    for layout in named:
        peak, fits = _peak(small_folder, layout, free, microbatches=layout.pp, **work)
        assert peak < need and fits, (layout, peak, need)
        assert f"{layout} ({format_bytes(peak)})" in listing

    # The engines stayed up, freed the model, and the advice runs on them (uncapped now).
    for layout in named:
        result = wb.generate(PROMPTS, strategy="data", model=small_folder, max_new_tokens=2,
                             dp=layout.dp, pp=layout.pp, tp=layout.tp)
        assert result.layout == layout and len(result.texts) == len(PROMPTS)
        assert max(result.weight_bytes) < 0.6 * 79_484_928  # half the weights, as the advice said


@pytest.mark.cluster
def test_a_predicted_out_of_memory_names_every_layout_that_fits(own_wb, tmp_path_factory):
    from transformers import LlamaConfig

    from mpbook.models import tiny_tokenizer
    from mpbook.models.tokenizer import TOKENIZER_IDS

    wb = own_wb
    share = _share(wb)

    def config(layers: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=TOKENIZER_IDS["vocab_size"], hidden_size=2048, intermediate_size=8192,
                           num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                           max_position_embeddings=1024)

    # Sized against these engines' own memory: the whole model 1.5 times what each may
    # take, so that data parallel cannot fit and either way of halving it can.
    work = dict(batch=len(PROMPTS), prompt_len=16, max_new_tokens=4)
    per_layer = _peak(config(2), Layout(), share, **work)[0] - _peak(config(1), Layout(), share, **work)[0]
    layers = max(2, 2 * round(0.75 * share / per_layer))
    folder = tmp_path_factory.mktemp("sized-config")
    config(layers).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert not _peak(folder, Layout(dp=2), share, **work)[1]
    fitting = [x for x in (Layout(pp=2), Layout(tp=2)) if _peak(folder, x, share, **work)[1]]
    assert len(fitting) == 2

    with pytest.raises(MpbookError) as info:
        wb.generate(PROMPTS, strategy="data", model=str(folder), max_new_tokens=4, chat=False)
    message = str(info.value)
    assert message.startswith("out of memory (predicted): rank 0 needs ")
    assert "; layouts that fit on 2 engines: " in message
    assert sorted(map(str, layouts_in(message.partition("; layouts that fit on 2 engines: ")[2]))) == \
        sorted(map(str, fitting))


# --------------------------------------------------------------------------- no engines
def test_cpu_and_cuda_allocation_failures_are_out_of_memory():
    import errno

    import torch

    from mpbook.engine.runner import _asked, out_of_memory

    with pytest.raises(RuntimeError) as cpu:
        torch.empty(1 << 48)  # 1 PiB: torch's CPU allocator refuses it
    assert out_of_memory(cpu.value) and _asked(cpu.value) == "asked for 1048576.0 GiB"
    assert out_of_memory(MemoryError()) and out_of_memory(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _asked(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)")) == "asked for 2.00 GiB"
    assert _asked(RuntimeError("unable to mmap 79492952 bytes from file <x>: Cannot allocate memory (12)")) == \
        "asked for 75.8 MiB"
    # safetensors mapping a checkpoint: no bytes said, so the error itself
    assert _asked(MemoryError("Cannot allocate memory (os error 12)")) == "MemoryError: Cannot allocate memory (os error 12)"
    assert not out_of_memory(RuntimeError("shape mismatch")) and not out_of_memory(OSError(errno.ENOENT, "x"))


@pytest.mark.parametrize("failed, advised", [
    (Layout(dp=2), ["dp=1 x pp=2 x tp=1", "dp=1 x pp=1 x tp=2"]),  # least memory first
    (Layout(tp=2), ["dp=1 x pp=2 x tp=1"]),
    (Layout(pp=2), []),
])
def test_advice_after_out_of_memory_names_the_layouts_that_need_less_per_rank(small_config_folder, failed, advised):
    from mpbook.models import load_config
    from mpbook.parallel.pipeline import default_microbatches
    from mpbook.protocol import Request
    from mpbook.session.memory_check import smaller_layouts_advice

    config = load_config(small_config_folder)
    request = Request(model=small_config_folder, layout=failed, input_ids=((5,) * 300,) * 4, max_new_tokens=2,
                      pad_token_id=0, microbatches=default_microbatches(failed.pp, 4 // failed.dp))
    advice = smaller_layouts_advice(config, request, engines=2, free=[8 << 30] * 2, prompt_len=300,
                                    default_microbatches=True)
    assert [str(x) for x in layouts_in(advice)][1:] == advised  # the first one named is the failed layout
    if not advised:
        assert advice.startswith(f"no layout of 2 engines needs less memory per rank than {failed} (")
        assert advice.endswith("use more devices, a smaller dtype, fewer prompts or fewer new tokens")
    # with too little memory for any of them, none is advised
    tight = smaller_layouts_advice(config, request, engines=2, free=[1 << 20] * 2, prompt_len=300,
                                   default_microbatches=True)
    assert tight.startswith("no layout of 2 engines needs less memory per rank")


@pytest.fixture(scope="module")
def small_config_folder(tmp_path_factory):
    """The small preset's config alone (the advice plans; nothing loads)."""
    from mpbook.models.presets import small_config

    folder = tmp_path_factory.mktemp("small-config")
    small_config().save_pretrained(folder)
    return str(folder)


def test_an_engine_reports_a_failed_allocation_once_and_frees_its_model():
    import types

    import torch

    from mpbook.engine.runner import DeviceOutOfMemory, out_of_memory_reported

    closed = []
    state = types.SimpleNamespace(rank=1, device=torch.device("cpu"),
                                  cache={"runner": types.SimpleNamespace(close=lambda: closed.append(True))})
    with pytest.raises(DeviceOutOfMemory) as info:
        with out_of_memory_reported(state), out_of_memory_reported(state):  # one report inside another
            torch.empty(1 << 48)
    assert re.fullmatch(r"out of memory on rank 1 \(cpu\): asked for 1048576\.0 GiB; [\d.]+ GiB of the host's "
                        r"[\d.]+ GiB available", str(info.value))
    assert closed == [True] and "runner" not in state.cache
    with pytest.raises(ValueError):  # anything else passes through as it is
        with out_of_memory_reported(state):
            raise ValueError("not memory")
