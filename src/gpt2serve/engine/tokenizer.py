"""GPT-2 byte-level BPE tokenizer and a streaming detokenizer.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` built from a checkpoint's `tokenizer.json`, or from
its `vocab.json` + `merges.txt`, or from the copy bundled with the package.

Documented choice: the text `<|endoftext|>` inside user input is encoded as plain text (seven ordinary
tokens), never as the end-of-text token 50256, so a prompt cannot end a generation early by spelling it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

EOS_TOKEN = "<|endoftext|>"
DEFAULT_EOS_ID = 50256
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """Text <-> GPT-2 token ids."""

    def __init__(self, inner: tokenizers.Tokenizer, source: str = "") -> None:
        eos_id = inner.token_to_id(EOS_TOKEN)
        if eos_id is not None:
            # Registered as special so decode(skip_special_tokens=True) drops it ...
            inner.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        # ... but never matched inside user text: "<|endoftext|>" there is plain text.
        inner.encode_special_tokens = True
        self._inner = inner
        self.source = source
        self.eos_token_id: int = DEFAULT_EOS_ID if eos_id is None else eos_id
        self.vocab_size: int = inner.get_vocab_size(with_added_tokens=True)
        # The most characters one token can stand for: byte-level BPE spells each byte as one character
        # of the vocabulary, and a character is at least one byte.
        self.max_token_chars: int = max((len(t) for t in inner.get_vocab(with_added_tokens=False)), default=1)

    @classmethod
    def bundled(cls) -> Tokenizer:
        """The GPT-2 tokenizer packaged with gpt2serve (shared, read-only use)."""
        return _bundled()

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """Load `tokenizer.json`, else `vocab.json` + `merges.txt`, from `path`; None if neither is there."""
        path = Path(path)
        tokenizer_json = path / "tokenizer.json"
        if tokenizer_json.is_file():
            return cls(tokenizers.Tokenizer.from_file(str(tokenizer_json)), str(tokenizer_json))
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return cls(_byte_level_bpe(vocab, merges), f"{vocab} + {merges.name}")
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any added special tokens."""
        return self._inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid or incomplete UTF-8 becomes U+FFFD."""
        return self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (byte-level form) of one id."""
        return self._inner.id_to_token(token_id)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def _byte_level_bpe(vocab: Path, merges: Path) -> tokenizers.Tokenizer:
    inner = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    return inner


@functools.lru_cache(maxsize=1)
def _bundled() -> Tokenizer:
    folder = resources.files("gpt2serve") / "data" / "gpt2-tokenizer"
    with resources.as_file(folder) as path:
        tokenizer = Tokenizer.from_dir(path)
    if tokenizer is None:
        raise FileNotFoundError(f"the bundled GPT-2 tokenizer is missing from {folder}")
    return tokenizer


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, never splitting a multi-byte character.

    A character such as an emoji may span two or three byte-level tokens; until its last byte arrives the
    decoded window ends in U+FFFD, and that tail is held back. The pieces concatenate to the decode of all
    pushed ids. `prefix_ids` (the prompt) only gives context: its text is never returned.
    """

    def __init__(
        self, tokenizer: Tokenizer, prefix_ids: Iterable[int] = (), *, skip_special_tokens: bool = True
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prefix_ids)
        # Window decoded on each push: ids[_start:]. _read is the last point where the text was complete.
        self._start = self._read = len(self._ids)
        self._emitted = 0  # characters of the window's text already returned (or belonging to the prompt)
        if self._ids:
            self._start = max(0, len(self._ids) - 1)
            self._emitted = len(self._decode(self._start).rstrip(REPLACEMENT_CHAR))

    def _decode(self, start: int) -> str:
        return self._tok.decode(self._ids[start:], skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Append one id; return the new complete text ("" while a character is unfinished)."""
        self._ids.append(token_id)
        text = self._decode(self._start)
        stable = text.rstrip(REPLACEMENT_CHAR)
        piece = stable[self._emitted :]
        self._emitted = max(self._emitted, len(stable))
        if len(stable) == len(text):
            # Complete: slide the window so it keeps only the tokens since the previous complete point.
            self._start, self._read = self._read, len(self._ids)
            self._emitted = len(self._decode(self._start))
        return piece

    def flush(self) -> str:
        """Return whatever is held back (an unfinished character decodes as U+FFFD) and reset."""
        piece = self._decode(self._start)[self._emitted :]
        self._start = self._read = len(self._ids)
        self._emitted = 0
        return piece
