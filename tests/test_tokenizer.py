"""Incremental detokenization adds up to the full decode, whatever the token ids (split characters,
special tokens), so streamed text equals the final text."""

from hypothesis import given, settings
from hypothesis import strategies as st

from moetier.loader.resolve import DEFAULT_MODEL_DIR
from moetier.tokenizer import Tokenizer

TOKENIZER = Tokenizer(DEFAULT_MODEL_DIR)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, TOKENIZER.vocab_size - 1), max_size=60))
def test_increments_concatenate_to_the_full_decode(token_ids):
    text, prefix, read = "", 0, 0
    for n in range(1, len(token_ids) + 1):
        new_text, prefix, read = TOKENIZER.decode_increment(token_ids[:n], prefix, read, final=n == len(token_ids))
        text += new_text
    assert text == TOKENIZER.decode(token_ids)


def test_multibyte_characters_wait_until_complete():
    ids = TOKENIZER.encode("é→ ok", add_special_tokens=False)
    pieces, prefix, read = [], 0, 0
    for n in range(1, len(ids) + 1):
        new_text, prefix, read = TOKENIZER.decode_increment(ids[:n], prefix, read)
        pieces.append(new_text)
    assert "".join(pieces) == "é→ ok" and all("\ufffd" not in piece for piece in pieces)
