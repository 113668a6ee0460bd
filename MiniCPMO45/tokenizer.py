"""The MiniCPM-o 4.5 text tokenizer: a Qwen2-style byte-level BPE built with the `tokenizers` library.

A model folder holds either a ready `tokenizer.json`, or `vocab.json` + `merges.txt` plus the added tokens
(`added_tokens.json`, and their flags in `tokenizer_config.json`'s `added_tokens_decoder`). The official mirror has
no `tokenizer.json`, so the second form is the usual one. No BOS is ever added; special tokens written in the text
are recognised as single ids.

`SpecialTokens` resolves every special id the engine needs by its name, so the same code works for the real
vocabulary and for the tiny generated one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# The Qwen2 pre-tokenizer split: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, and whitespace (trailing whitespace kept apart from the next word).
QWEN2_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

REPLACEMENT_CHAR = "\ufffd"


def byte_level_alphabet() -> dict[str, int]:
    """The byte each character of a byte-level BPE vocabulary stands for. Printable Latin-1 bytes are written
    as themselves; the other 68 bytes (controls, space, 0x7f-0xa0, 0xad) as the characters from U+0100 on,
    in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet = {chr(b): b for b in sorted(printable)}
    others = [b for b in range(256) if b not in printable]
    alphabet.update({chr(0x100 + k): b for k, b in enumerate(others)})
    return alphabet


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be loaded, or a token the model needs that it lacks."""


def qwen2_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Attach the Qwen2 normalizer, pre-tokenizer and decoder to a BPE tokenizer (in place; returned)."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    return tokenizer


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip() or (i == 0 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{path.name} line {i + 1} is not a merge pair: {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def _added_tokens(model_dir: Path, config: dict) -> list[tuple[int, AddedToken]]:
    """Added tokens with their flags: `added_tokens_decoder` first, then any extra ids in added_tokens.json."""
    found: dict[int, AddedToken] = {}
    for sid, spec in config.get("added_tokens_decoder", {}).items():
        found[int(sid)] = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False),
            special=spec.get("special", True),
        )
    added_json = model_dir / "added_tokens.json"
    if added_json.is_file():
        for content, tid in json.loads(added_json.read_text(encoding="utf-8")).items():
            if tid not in found:
                found[tid] = AddedToken(content, normalized=False, special=True)
            elif found[tid].content != content:
                raise TokenizerError(
                    f"added_tokens.json gives id {tid} to {content!r}, tokenizer_config.json to {found[tid].content!r}"
                )
    return sorted(found.items())


def _add(tokenizer: Tokenizer, token: AddedToken) -> None:
    if token.special:
        tokenizer.add_special_tokens([token])
    else:
        tokenizer.add_tokens([token])


def build_from_vocab_merges(model_dir: Path, config: dict) -> Tokenizer:
    vocab_path, merges_path = model_dir / "vocab.json", model_dir / "merges.txt"
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise TokenizerError(f"no tokenizer.json and no {p.name} in {model_dir}")
    vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
    bpe = models.BPE(
        vocab=vocab,
        merges=_read_merges(merges_path),
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = qwen2_pipeline(Tokenizer(bpe))
    added = _added_tokens(model_dir, config)
    # Tokens already in vocab.json (the real `<unk>`) keep their id; the rest must follow the vocabulary
    # without gaps, since `add_tokens` appends.
    for tid, token in added:
        if token.content in vocab:
            if vocab[token.content] != tid:
                raise TokenizerError(
                    f"{token.content!r} is id {vocab[token.content]} in vocab.json, {tid} elsewhere"
                )
            _add(tokenizer, token)
            continue
        if tid != tokenizer.get_vocab_size(with_added_tokens=True):
            raise TokenizerError(
                f"added token {token.content!r} has id {tid}, but the next free id is "
                f"{tokenizer.get_vocab_size(with_added_tokens=True)}"
            )
        _add(tokenizer, token)
        if tokenizer.token_to_id(token.content) != tid:
            raise TokenizerError(f"added token {token.content!r} did not get id {tid}")
    return tokenizer


@dataclass(frozen=True)
class SpecialTokens:
    """Every special id of the prompt formats, resolved by name from the tokenizer (spec §2.1)."""

    endoftext: int
    im_start: int
    im_end: int
    unk: int
    think_start: int
    think_end: int
    image_start: int
    image_end: int
    slice_start: int
    slice_end: int
    image_id_start: int
    image_id_end: int
    unit_start: int
    unit_end: int
    audio_start: int
    audio: int
    audio_end: int
    spk_start: int
    spk: int
    spk_end: int
    tts_bos: int
    tts_eos: int
    listen: int
    speak: int
    interrupt: int
    vad_start: int
    vad_end: int
    turn_bos: int
    turn_eos: int
    chunk_eos: int
    chunk_bos: int
    chunk_tts_bos: int
    chunk_tts_eos: int
    tts_pad: int

    @property
    def pad(self) -> int:
        return self.endoftext

    @property
    def bos(self) -> int:
        """The tokenizer's bos_token is `<|im_start|>` (no BOS is ever added automatically)."""
        return self.im_start

    @property
    def eos(self) -> int:
        return self.im_end

    @classmethod
    def resolve(cls, token_to_id: dict[str, int]) -> SpecialTokens:
        missing = [text for text in SPECIAL_TOKEN_TEXT.values() if text not in token_to_id]
        if missing:
            raise TokenizerError(f"the tokenizer lacks special tokens: {', '.join(missing)}")
        return cls(**{name: token_to_id[text] for name, text in SPECIAL_TOKEN_TEXT.items()})

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


SPECIAL_TOKEN_TEXT: dict[str, str] = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "unk": "<unk>",
    "think_start": "<think>",
    "think_end": "</think>",
    "image_start": "<image>",
    "image_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "image_id_start": "<image_id>",
    "image_id_end": "</image_id>",
    "unit_start": "<unit>",
    "unit_end": "</unit>",
    "audio_start": "<|audio_start|>",
    "audio": "<|audio|>",
    "audio_end": "<|audio_end|>",
    "spk_start": "<|spk_bos|>",
    "spk": "<|spk|>",
    "spk_end": "<|spk_eos|>",
    "tts_bos": "<|tts_bos|>",
    "tts_eos": "<|tts_eos|>",
    "listen": "<|listen|>",
    "speak": "<|speak|>",
    "interrupt": "<|interrupt|>",
    "vad_start": "<|vad_start|>",
    "vad_end": "<|vad_end|>",
    "turn_bos": "<|turn_bos|>",
    "turn_eos": "<|turn_eos|>",
    "chunk_eos": "<|chunk_eos|>",
    "chunk_bos": "<|chunk_bos|>",
    "chunk_tts_bos": "<|chunk_tts_bos|>",
    "chunk_tts_eos": "<|chunk_tts_eos|>",
    "tts_pad": "<|tts_pad|>",
}


class MiniCPMOTokenizer:
    """Encode/decode text for MiniCPM-o 4.5; load with `MiniCPMOTokenizer.from_dir(model_dir)`."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None) -> None:
        self.backend = tokenizer
        self.config = config or {}
        self.special = SpecialTokens.resolve(tokenizer.get_vocab(with_added_tokens=True))
        self.bad_token_ids: list[int] = [int(i) for i in self.config.get("bad_token_ids", [])]
        self.chat_template: str | None = self.config.get("chat_template")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> MiniCPMOTokenizer:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise TokenizerError(f"tokenizer folder {model_dir} does not exist")
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        if (model_dir / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        else:
            tokenizer = build_from_vocab_merges(model_dir, config)
        return cls(tokenizer, config)

    @property
    def vocab_size(self) -> int:
        """Size of the id space including added tokens (highest id + 1)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def decoded_bytes(self) -> list[bytes | None]:
        """Per id, the bytes `decode([..., id, ...], skip_special_tokens=True)` turns it into before the whole
        byte string is read as UTF-8 (lossily): empty for a special token. None where the id is not such a
        plain piece (a non-special added token, an id without a token, a decoder that is not byte-level): a
        text with that id must be decoded by the tokenizer itself."""
        size = self.vocab_size
        table: list[bytes | None] = [None] * size
        if not isinstance(self.backend.decoder, decoders.ByteLevel):
            return table
        added = self.backend.get_added_tokens_decoder()
        alphabet = byte_level_alphabet()
        for tid in range(size):
            if tid in added:
                table[tid] = b"" if added[tid].special else None
                continue
            token = self.backend.id_to_token(tid)
            if token is not None and all(c in alphabet for c in token):
                table[tid] = bytes(alphabet[c] for c in token)
        return table

    def has_token(self, token: str) -> bool:
        return self.backend.token_to_id(token) is not None

    def token_to_id(self, token: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"unknown token {token!r}")
        return tid

    def id_to_token(self, tid: int) -> str:
        token = self.backend.id_to_token(tid)
        if token is None:
            raise TokenizerError(f"id {tid} is outside the vocabulary")
        return token

    def char_token_id(self, char: str) -> int:
        """The id of a text that is exactly one token, else `<unk>` (how the official code bans characters)."""
        ids = self.encode(char)
        return ids[0] if len(ids) == 1 else self.special.unk

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    @cached_property
    def control_ids(self) -> frozenset[int]:
        """Ids of every added token: the control vocabulary (`<|im_end|>`, `<|timbre_27|>`, `<tool_call>`, ...),
        special or not. None of it is text for a person to read."""
        return frozenset(self.backend.get_added_tokens_decoder())

    def display_text(self, ids: Iterable[int]) -> str:
        """The text of `ids` as a caller sees it: without any control token."""
        return self.decode([i for i in ids if i not in self.control_ids], skip_special_tokens=True)

    def display_detokenizer(self) -> IncrementalDetokenizer:
        """Text deltas as a caller sees them (`display_text`, incrementally)."""
        return IncrementalDetokenizer(self, skip_special_tokens=True, drop=self.control_ids)


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas that never end in a broken UTF-8 character.

    Byte-level BPE tokens can split a multi-byte character; decoding such a prefix yields U+FFFD at the end.
    Those ids are held back until the character completes (or `max_hold` tokens pile up, for a stream that is
    really invalid), then emitted. `flush()` returns whatever is still held.
    """

    def __init__(
        self,
        tokenizer: MiniCPMOTokenizer,
        skip_special_tokens: bool = True,
        max_hold: int = 6,
        drop: frozenset[int] = frozenset(),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._max_hold = max_hold
        self._drop = drop  # ids left out entirely
        self._pending: list[int] = []
        self.text = ""

    def push(self, ids: int | Sequence[int]) -> str:
        self._pending.extend(i for i in ([ids] if isinstance(ids, int) else ids) if i not in self._drop)
        piece = self._tokenizer.decode(self._pending, skip_special_tokens=self._skip)
        if piece.endswith(REPLACEMENT_CHAR) and len(self._pending) < self._max_hold:
            return ""
        self._pending.clear()
        self.text += piece
        return piece

    def flush(self) -> str:
        if not self._pending:
            return ""
        piece = self._tokenizer.decode(self._pending, skip_special_tokens=self._skip)
        self._pending.clear()
        self.text += piece
        return piece
