"""The presets' tokenizer: English words, and a chat template, so that ``--chat`` works offline.

The preset's model has random weights, so whatever it generates is a random walk over the
vocabulary. With a byte-level vocabulary that walk prints control characters; with this one it
prints lowercase English words and punctuation.

Design:
- WordPiece model over ~300 common words, with single letters and digits plus their "##"
  continuations as a fallback, so any lowercase ASCII word can still be spelled (and decoded
  back); anything else (accents, symbols) becomes <unk>. The fallback is not cosmetic:
  transformers' StopStringCriteria tokenizes the probe string "abcdef" and looks for it in
  ``convert_tokens_to_string`` (``clean_tokenizer_vocab(static_prefix="abcdef")``); a pure
  WordLevel vocabulary maps it to <unk> and ``--stop`` fails with "substring not found".
- Lowercase normalizer, BERT pre-tokenizer (whitespace, and each punctuation character on its
  own), WordPiece decoder: words joined by spaces, "##" pieces glued on, no space before
  punctuation. Then "##" is removed from what is left: WordPiece's decoder keeps it on the first
  token, and generated text often starts with a continuation piece.
- Special tokens first, at fixed ids, so that editing the word list never moves them.
- A ChatML-like chat template (system/user/assistant, add_generation_prompt) so that
  ``--chat`` works offline. Newlines in the template are whitespace to this tokenizer.
"""

from __future__ import annotations

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIALS = (PAD, BOS, EOS, UNK, IM_START, IM_END)  # ids 0..5, never reordered
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IM_START_ID, IM_END_ID = range(len(SPECIALS))

PUNCTUATION = tuple(".,!?;:'\"()-")

# Common English words (and a few about this project); "system", "user", "assistant" are the
# chat roles. Lowercase only: the normalizer lowercases the input.
WORDS = tuple(
    """
    the of and to in is was it for on are as with be at by this had not but from or have an they
    which one you were her all she there would their we him been has when who will more no if out
    so said what up its about into than them can only other new some could time these two may then
    first any my now such like our over man me even most made after also did many before must
    through back years where much your way well down should because each just those people how too
    little state good very make world still own see men work long get here between both life being
    under never day same another know while last might us great old year off come since against go
    came right used take three small large big next early young important few public bad able
    thing think help place point find give tell ask show try call keep leave put mean become begin
    seem feel turn start run move live believe hold bring happen write sit stand lose pay meet
    include continue set learn change lead understand watch follow stop create speak read allow add
    spend grow open walk win offer remember love consider appear buy wait serve die send expect
    build stay fall cut reach kill remain water room mother area money story fact month lot book eye
    job word business issue side kind head house friend father power hour game line end member law
    car city name team minute idea kid body information face others level office door health art war
    history party result morning reason research girl guy moment air teacher force education
    model token data tensor pipeline parallel memory device batch layer answer question sentence
    system user assistant hello yes please thank
    """.split()
)
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz0123456789")

# ChatML-like: <|im_start|>role\ncontent<|im_end|>\n per message; the generation prompt opens an
# assistant turn. No BOS: the tokenizer adds none either.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocabulary() -> dict[str, int]:
    """Token -> id: specials, punctuation, words, letters and digits, then their ## pieces."""
    tokens = [*SPECIALS, *PUNCTUATION, *WORDS]
    tokens += [c for c in LETTERS if c not in tokens]  # "a" and "i" come in here, as letters
    tokens += [f"##{c}" for c in LETTERS]
    if len(set(tokens)) != len(tokens):
        raise ValueError("duplicate token in the tiny vocabulary")
    return {token: i for i, token in enumerate(tokens)}


def tiny_word_tokenizer():
    """The preset's tokenizer (a transformers fast tokenizer); pads on the left."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordPiece(vocab=vocabulary(), unk_token=UNK, continuing_subword_prefix="##"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace("##", "")])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # transformers 5 name (formerly additional_special_tokens): split out before the
        # normalizer sees them, and dropped by decode(skip_special_tokens=True).
        extra_special_tokens=[IM_START, IM_END],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# What the config of a model saved with this tokenizer says (tests splat it into theirs).
TOKENIZER_IDS = dict(vocab_size=len(vocabulary()), pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def generation_eos_ids() -> list[int]:
    """What the preset's generation_config.eos_token_id should be: end of text or end of turn
    (a list, as chat models ship it; config.eos_token_id stays EOS_ID)."""
    return [EOS_ID, IM_END_ID]
