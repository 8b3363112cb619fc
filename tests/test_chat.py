"""Chat prompts: mpbook.session.prompts.encode_prompts against the tokenizer's own chat
template, the presets' word tokenizer, and the one-line errors of a cell whose prompts and
options disagree.

Pure: no engines (a cell's errors are raised before the engines are called, so the magic runs
here on a stand-in cluster that only says how many engines it has).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from mpbook.errors import MpbookError
from mpbook.models import build_tiny, load_tokenizer
from mpbook.models.tokenizer import (
    CHAT_TEMPLATE, EOS_ID, IM_END_ID, IM_START_ID, PAD_ID, SPECIALS, TOKENIZER_IDS, UNK_ID, generation_eos_ids,
    tiny_word_tokenizer,
)
from mpbook.session import Session
from mpbook.session.model_info import ModelInfo
from mpbook.session.prompts import encode_prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny preset saved with save_pretrained (its tokenizer and generation config too)."""
    return build_tiny(tmp_path_factory.mktemp("chat-tiny"), seed=3)


@pytest.fixture(scope="module")
def plain_folder(folder, tmp_path_factory):
    """The same model and tokenizer without a chat template (a base model)."""
    plain = tmp_path_factory.mktemp("plain-tiny") / "model"
    shutil.copytree(folder, plain)
    (plain / "chat_template.jinja").unlink()
    assert not getattr(load_tokenizer(plain), "chat_template", None)
    return plain


@pytest.fixture(scope="module", params=["fresh", "saved"])
def tokenizer(request, folder):
    """The presets' tokenizer as built, and as a model folder gives it back."""
    return tiny_word_tokenizer() if request.param == "fresh" else load_tokenizer(folder)


PROMPTS = ["Hello, what is a tensor?", "Explain pipeline parallelism in one sentence.", "hi"]
SYSTEM = "You are a helpful assistant."
CONVERSATIONS = [
    [{"role": "user", "content": "Hello, what is a tensor?"}],
    [{"role": "system", "content": "Answer yes or no."},
     {"role": "user", "content": "Is a model data?"},
     {"role": "assistant", "content": "No."},
     {"role": "user", "content": "Is a tensor data?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "What does an all-reduce do?"}],
]


def template_ids(tokenizer, messages) -> tuple[int, ...]:
    """transformers' own rendering and tokenizing of ``messages`` with the assistant's turn opened."""
    return tuple(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False))


# --------------------------------------------------------------------------- ids
def test_chat_is_the_default_for_a_tokenizer_with_a_template(tokenizer):
    encoded = encode_prompts(tokenizer, PROMPTS)
    expected = [template_ids(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    assert list(encoded.input_ids) == expected
    assert encode_prompts(tokenizer, PROMPTS, chat=True).input_ids == encoded.input_ids
    assert encoded.shown == PROMPTS  # the printout shows the user's line, not the template
    assert encoded.messages == [[{"role": "user", "content": p}] for p in PROMPTS]
    # and BatchEncoding form (transformers 5's default return_dict=True) says the same
    first = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    assert tuple(first["input_ids"]) == encoded.input_ids[0]


def test_chat_ids_are_the_rendered_template_tokenized(tokenizer):
    ids = encode_prompts(tokenizer, ["Hello, what is a tensor?"]).input_ids[0]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, what is a tensor?"}],
                                         add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nHello, what is a tensor?<|im_end|>\n<|im_start|>assistant\n"
    assert list(ids) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == IM_START_ID and ids.count(IM_END_ID) == 1 and UNK_ID not in ids


def test_a_system_message_comes_first(tokenizer):
    encoded = encode_prompts(tokenizer, PROMPTS, system=SYSTEM)
    expected = [template_ids(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}])
                for p in PROMPTS]
    assert list(encoded.input_ids) == expected
    assert encoded.shown == PROMPTS
    assert all(m[0] == {"role": "system", "content": SYSTEM} for m in encoded.messages)
    assert encoded.input_ids != encode_prompts(tokenizer, PROMPTS).input_ids


def test_message_lists_go_through_the_template(tokenizer):
    encoded = encode_prompts(tokenizer, CONVERSATIONS)
    assert list(encoded.input_ids) == [template_ids(tokenizer, c) for c in CONVERSATIONS]
    assert encoded.shown == ["Hello, what is a tensor?", "Is a tensor data?", "What does an all-reduce do?"]
    assert encoded.messages == CONVERSATIONS
    # --chat says the same; a system message is added only where the list has none
    assert encode_prompts(tokenizer, CONVERSATIONS, chat=True).input_ids == encoded.input_ids
    with_system = encode_prompts(tokenizer, CONVERSATIONS, system=SYSTEM)
    assert with_system.input_ids[1] == encoded.input_ids[1]  # it has its own system message
    assert with_system.input_ids[0] == template_ids(tokenizer, [{"role": "system", "content": SYSTEM},
                                                                 *CONVERSATIONS[0]])
    assert with_system.input_ids[2] == template_ids(tokenizer, [{"role": "system", "content": SYSTEM},
                                                                 *CONVERSATIONS[2]])


def test_strings_and_message_lists_mix(tokenizer):
    encoded = encode_prompts(tokenizer, ["hi", CONVERSATIONS[1]])
    assert encoded.input_ids == (template_ids(tokenizer, [{"role": "user", "content": "hi"}]),
                                 template_ids(tokenizer, CONVERSATIONS[1]))


def test_the_caller_s_messages_are_not_changed(tokenizer):
    conversation = [dict(m) for m in CONVERSATIONS[0]]
    encode_prompts(tokenizer, [conversation], system=SYSTEM)
    assert conversation == CONVERSATIONS[0]


def test_no_chat_sends_the_text_as_it_is(tokenizer):
    encoded = encode_prompts(tokenizer, PROMPTS, chat=False)
    assert list(encoded.input_ids) == [tuple(ids) for ids in tokenizer(PROMPTS)["input_ids"]]
    assert encoded.messages is None and encoded.shown == PROMPTS
    assert IM_START_ID not in encoded.input_ids[0]


def test_without_a_template_the_default_is_plain_text(plain_folder):
    tokenizer = load_tokenizer(plain_folder)
    encoded = encode_prompts(tokenizer, PROMPTS)
    assert list(encoded.input_ids) == [tuple(ids) for ids in tokenizer(PROMPTS)["input_ids"]]
    assert encoded.messages is None


# --------------------------------------------------------------------------- errors
def one_line_error(call, *words: str) -> str:
    with pytest.raises(MpbookError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and len(message) < 300, message
    for word in words:
        assert word in message, message
    return message


def test_no_chat_with_message_lists_is_a_one_line_error(tokenizer):
    one_line_error(lambda: encode_prompts(tokenizer, CONVERSATIONS, chat=False), "--no-chat", "message lists")
    one_line_error(lambda: encode_prompts(tokenizer, ["hi", CONVERSATIONS[0]], chat=False), "--no-chat")


def test_chat_without_a_template_is_a_one_line_error(plain_folder):
    tokenizer = load_tokenizer(plain_folder)
    one_line_error(lambda: encode_prompts(tokenizer, PROMPTS, chat=True), "--chat", "no chat template")
    one_line_error(lambda: encode_prompts(tokenizer, CONVERSATIONS), "list of messages", "no chat template")
    one_line_error(lambda: encode_prompts(tokenizer, PROMPTS, system=SYSTEM), "--system")


def test_system_with_no_chat_is_a_one_line_error(tokenizer):
    one_line_error(lambda: encode_prompts(tokenizer, PROMPTS, chat=False, system=SYSTEM), "--system")


def test_system_without_a_template_does_not_blame_a_flag_not_given(plain_folder):
    """A model without a chat template and no --no-chat: the message must not say "leave
    out --no-chat" (there is nothing to leave out); it says the model has no template."""
    tokenizer = load_tokenizer(plain_folder)
    message = one_line_error(lambda: encode_prompts(tokenizer, PROMPTS, system=SYSTEM), "--system")
    assert "--no-chat" not in message and "no chat template" in message


@pytest.mark.parametrize("bad", [
    [{"role": "user"}],
    [{"content": "hi"}],
    [],
    ["hi"],
    [{"role": "user", "content": 3}],
])
def test_malformed_message_lists_name_the_prompt(tokenizer, bad):
    one_line_error(lambda: encode_prompts(tokenizer, ["fine", bad]), "prompt 1")


# --------------------------------------------------------------------------- the tokenizer
def test_vocabulary_and_special_ids(tokenizer):
    assert len(tokenizer) == TOKENIZER_IDS["vocab_size"] == 394
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        TOKENIZER_IDS["pad_token_id"], TOKENIZER_IDS["bos_token_id"], TOKENIZER_IDS["eos_token_id"]) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(list(SPECIALS)) == list(range(6))
    assert set(tokenizer.all_special_ids) == set(range(6))
    assert tokenizer.padding_side == "left"
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_random_ids_decode_to_printable_words(tokenizer):
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(0, len(tokenizer), (500,), generator=g).tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)  # as a result's texts are decoded
        assert text.isprintable(), repr(text)  # no control characters
        assert "##" not in text and "<" not in text
        words = text.split()
        assert sum(w.strip(".,!?;:'\"()-").isalpha() for w in words) / len(words) > 0.8
    # a text that starts with a continuation piece has no "##" either
    assert tokenizer.decode(tokenizer.convert_tokens_to_ids(["##s", "model"])) == "s model"


def test_text_round_trip(tokenizer):
    text = "hello, what is a tensor? the pipeline model uses 4 devices!"
    ids = tokenizer(text)["input_ids"]
    assert UNK_ID not in ids and tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer("Hello World")["input_ids"]) == "hello world"  # lowercased


def test_the_preset_ends_at_end_of_text_or_end_of_turn(folder):
    assert generation_eos_ids() == [EOS_ID, IM_END_ID]
    info = ModelInfo.load(str(folder))
    assert info.eos_token_ids == (EOS_ID, IM_END_ID)
    assert info.has_chat_template
    assert info.tokenizer.pad_token_id == PAD_ID


def test_a_preset_being_built_never_looks_built_before_its_tokenizer_files_are_in(tmp_path, monkeypatch):
    """A preset is built into the shared cache by whichever process asks first (engines and test
    workers at the same moment); the others take it as built once config.json and
    model.safetensors are there. Every file must be in by then: a reader that found them beside
    a folder without chat_template.jinja would load the model without its chat template and
    send its prompts as plain text."""
    import os

    from mpbook.models import build_preset

    folder = tmp_path / "tiny"
    seen = []  # after each file moved in: was the preset "built", and what did the folder hold
    replace = os.replace

    def replace_and_look(source, target):
        replace(source, target)
        names = {p.name for p in folder.iterdir()}
        seen.append(({"config.json", "model.safetensors"} <= names, names))

    monkeypatch.setattr(os, "replace", replace_and_look)
    build_preset("tiny", folder, seed=3)
    monkeypatch.undo()
    every_file = {p.name for p in folder.iterdir()}
    assert {"chat_template.jinja", "tokenizer.json", "generation_config.json"} <= every_file
    assert len(seen) == len(every_file)
    looked_built = [names for built, names in seen if built]
    assert looked_built and all(names == every_file for names in looked_built), seen


# --------------------------------------------------------------------------- in a cell
class StandInCluster:
    """What Session.generate reads before it calls the engines."""

    world_size = 2
    device_type = "cpu"
    engines: list = []

    def check_running(self, what):
        pass


class StandInWorkbench:
    """The magic's view of a workbench; every check before the engines runs for real."""

    world_size = 2
    device_type = "cpu"

    def __init__(self):
        self.session = Session(StandInCluster(), calls=None)

    def generate(self, prompts, *, strategy, model, dashboard=None, **options):
        return self.session.generate(prompts, strategy=strategy, model=model, **options)

    def stop(self):
        pass


@pytest.fixture
def cell(shell):
    """Run a %%mp cell on a stand-in workbench; return the error the user sees (or None)."""
    magics = shell.magics_manager.registry["MpMagics"]
    magics.workbench = StandInWorkbench()

    def run(source: str, **variables):
        shell.user_ns.update(variables)
        result = shell.run_cell(source)
        return result.error_in_exec or result.error_before_exec

    yield run
    magics.workbench = None


def test_cell_no_chat_with_message_lists(cell, folder):
    from IPython.core.error import UsageError

    err = cell(f"%mp tensor --model {folder} --no-chat --prompts conversations", conversations=CONVERSATIONS)
    assert isinstance(err, UsageError) and "\n" not in str(err) and "--no-chat" in str(err)


def test_cell_chat_without_a_template(cell, plain_folder):
    from IPython.core.error import UsageError

    err = cell(f"%%mp tensor --model {plain_folder} --chat\nhello there")
    assert isinstance(err, UsageError) and "\n" not in str(err) and "--chat" in str(err)
    err = cell(f"%%mp data --model {plain_folder} --system 'be brief'\nhello there")
    assert isinstance(err, UsageError) and "--system" in str(err)


def test_cell_options_parse():
    from mpbook.magics import parse

    assert parse("tensor", cell=True).chat is None
    assert parse("tensor --chat", cell=True).chat is True
    assert parse("tensor --no-chat", cell=True).chat is False
    args = parse("pipeline --system brief --temperature 0.7 --top-k 5 --top-p 0.9 --repetition-penalty 1.1 "
                 "--seed 3 --stop end --stop the --ignore-eos", cell=True)
    assert (args.system, args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed) == (
        "brief", 0.7, 5, 0.9, 1.1, 3)
    assert args.stop == ["end", "the"] and args.ignore_eos


def test_quoted_option_values_lose_their_quotes():
    """`--system "You are terse."` is the message You are terse. (as a shell reads it): with
    the quotes kept, the system message carries them and a quoted stop string never matches."""
    from mpbook.magics import parse

    args = parse("""pipeline --system "You are terse." --stop 'the end' --stop "a b" --stop plain""", cell=True)
    assert args.system == "You are terse."
    assert args.stop == ["the end", "a b", "plain"]


def test_tensor_help_lists_the_generation_options(shell, capsys):
    assert shell.run_cell("%%mp tensor --help\nignored").success
    out = capsys.readouterr().out
    for flag in ("--chat", "--no-chat", "--system", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
                 "--seed", "--stop", "--ignore-eos", "--max-new-tokens"):
        assert flag in out, flag
