"""Tokenizer and IncrementalDecoder: GPT-2 ids, both file variants, streaming without split characters."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from gpt2serve.engine.tokenizer import IncrementalDecoder, Tokenizer
from tests.checkpoints import BUNDLED_TOKENIZER

HELLO = "Hello world, this is GPT-2"
HELLO_IDS = [15496, 995, 11, 428, 318, 402, 11571, 12, 17]
SAMPLES = [
    HELLO,
    "  leading spaces, trailing  \n\n\ttabs\r\n",
    "I'm sure they'll say it's 3.14159 or 1,000,000 — don't you?",
    "Ünïcödé, 日本語のテキスト, 한국어, Ελληνικά, emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # code",
]
STREAM_TEXTS = [
    "Emoji: 😀🎉🧑‍🤝‍🧑 end",
    "日本語のテキストと中文文本",
    "mixed ü 🍕 ok — “quotes” …",
]


@pytest.fixture(scope="module")
def bundled() -> Tokenizer:
    return Tokenizer.bundled()


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The same tokenizer built from vocab.json + merges.txt only."""
    folder = tmp_path_factory.mktemp("vocab_merges")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(BUNDLED_TOKENIZER / name, folder / name)
    tokenizer = Tokenizer.from_dir(folder)
    assert tokenizer is not None
    return tokenizer


def _byte_token_ids(tokenizer: Tokenizer) -> dict[int, int]:
    """Byte value -> id of GPT-2's single-byte token (inverse of the byte-level alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {tokenizer.id_to_token(i): i for i in range(tokenizer.vocab_size)}
    return {b: vocab[c] for b, c in chars.items()}


def _stream(tokenizer: Tokenizer, ids: list[int], prefix: list[int] = ()) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, prefix)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


def test_known_ids(bundled: Tokenizer, bpe_files: Tokenizer) -> None:
    assert bundled.encode(HELLO) == HELLO_IDS
    assert bpe_files.encode(HELLO) == HELLO_IDS
    assert bundled.decode(HELLO_IDS) == HELLO
    assert bundled.eos_token_id == bpe_files.eos_token_id == 50256
    assert bundled.vocab_size == bpe_files.vocab_size == 50257


@pytest.mark.parametrize("text", SAMPLES)
def test_file_variants_agree_and_round_trip(bundled: Tokenizer, bpe_files: Tokenizer, text: str) -> None:
    ids = bundled.encode(text)
    assert bpe_files.encode(text) == ids
    assert bundled.decode(ids) == bpe_files.decode(ids) == text


def test_from_dir_without_files_is_none(tmp_path: Path) -> None:
    assert Tokenizer.from_dir(tmp_path) is None


def test_from_dir_prefers_tokenizer_json(tiny_checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    assert tokenizer is not None and tokenizer.source.endswith("tokenizer.json")
    assert tokenizer.encode(HELLO) == HELLO_IDS


@pytest.mark.parametrize("which", ["bundled", "bpe_files"])
def test_endoftext_in_user_text_is_plain_text(which: str, request: pytest.FixtureRequest) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(which)
    text = "before<|endoftext|>after"
    ids = tokenizer.encode(text)
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert tokenizer.decode(ids) == text
    # The real end-of-text id is special: dropped on decode unless asked for.
    assert tokenizer.decode([15496, tokenizer.eos_token_id]) == "Hello"
    assert (
        tokenizer.decode([15496, tokenizer.eos_token_id], skip_special_tokens=False) == "Hello<|endoftext|>"
    )


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_decoder_never_splits_characters(bundled: Tokenizer, text: str) -> None:
    ids = bundled.encode(text)
    pieces = _stream(bundled, ids, prefix=bundled.encode("A prompt:"))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == bundled.decode(ids) == text


def test_incremental_decoder_one_byte_per_token(bundled: Tokenizer) -> None:
    byte_ids = _byte_token_ids(bundled)
    text = "a😀é日本🎉"
    ids = [byte_ids[b] for b in text.encode()]
    assert bundled.decode(ids) == text
    pieces = _stream(bundled, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] == ["a", "😀", "é", "日", "本", "🎉"]
    assert pieces[1:4] == ["", "", ""]  # the first three bytes of the 4-byte emoji yield nothing


def test_incremental_decoder_unfinished_character_flushes_as_replacement(bundled: Tokenizer) -> None:
    byte_ids = _byte_token_ids(bundled)
    decoder = IncrementalDecoder(bundled)
    assert decoder.push(bundled.encode("ok")[0]) == "ok"
    assert decoder.push(byte_ids[0xF0]) == ""  # first byte of a 4-byte character, nothing after it yet
    assert decoder.push(byte_ids[0x9F]) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""


def test_incremental_decoder_skips_end_of_text(bundled: Tokenizer) -> None:
    decoder = IncrementalDecoder(bundled, bundled.encode("x"))
    assert decoder.push(15496) == "Hello"
    assert decoder.push(bundled.eos_token_id) == ""
    assert decoder.flush() == ""


def test_incremental_decoder_matches_full_decode_on_random_ids(bundled: Tokenizer) -> None:
    rng = random.Random(0)
    byte_ids = list(_byte_token_ids(bundled).values())
    for _ in range(20):
        # Mix ordinary tokens with many single-byte tokens so incomplete UTF-8 occurs often.
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(50256) for _ in range(60)]
        assert "".join(_stream(bundled, ids)) == bundled.decode(ids)
