"""Tokenizers: character-level, word-level and byte-level BPE, saved as one JSON file next to a model.

All three share one interface:

    tok.encode(text) -> list[int]        tok.decode(ids) -> str
    tok.vocab_size                       tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id (None if absent)
    tok.save(path)                       load_tokenizer(path) -> the same tokenizer
    tok.fingerprint()                    sha256 of what decides the ids (vocabulary, merges, options)

`fingerprint()` is stored with a checkpoint so a restore with a different vocabulary is detected.

Unknown input:
- CharTokenizer (vocabulary = the sorted distinct characters of the training text, as in nanoGPT; no
  specials) follows its `unknown` policy: "error" (default) raises DataError naming the character and its
  position; "skip" drops unknown characters with one warning per `encode` call; "unk" reserves one extra id
  (the last) for them, which decodes to U+FFFD.
- WordTokenizer maps words it has not seen, and the special-token strings themselves when they occur in
  text, to `<unk>`; so `decode(encode(t))` is the whitespace-joined words of `t`, unknown ones as "<unk>".
- BPETokenizer is byte-level: every Unicode string (without unpaired surrogates) round-trips exactly
  (after lower-casing when `lowercase=True`); special-token strings in text are encoded as plain text.

`decode` rejects ids outside [0, vocab_size) with a DataError naming the id and its index; Word and BPE
tokenizers drop `<pad>`, `<bos>`, `<eos>` (and `<mask>`) when decoding.
"""

import collections
import hashlib
import json
import os
import pathlib
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import tokenizers as hf_tokenizers

from flaxlm.errors import DataError

FORMAT_VERSION = 1
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
MASK = "<mask>"
UnknownPolicy = Literal["error", "skip", "unk"]


def _texts(texts: str | Iterable[str]) -> Iterable[str]:
    return [texts] if isinstance(texts, str) else texts


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    out = []
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not hasattr(token, "__index__") or not 0 <= int(token) < vocab_size:
            raise DataError(f"token id {token!r} at index {i} is outside the vocabulary [0, {vocab_size})")
        out.append(int(token))
    return out


def _fingerprint(identity: dict[str, Any]) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _write_json(data: dict[str, Any], path: str | os.PathLike) -> None:
    target = pathlib.Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=True)
        os.replace(tmp, target)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise DataError(f"cannot write tokenizer: {e.strerror or e}", path) from None


class CharTokenizer:
    """One id per character; the vocabulary is a sorted tuple of distinct characters (no specials).

    With `unknown="unk"` the vocabulary has one extra id, `len(chars)`, for characters outside it.
    """

    kind = "char"
    pad_id = None
    bos_id = None
    eos_id = None
    mask_id = None

    def __init__(self, chars: Sequence[str], *, unknown: UnknownPolicy = "error"):
        chars = tuple(chars)
        if not chars:
            raise DataError("a character vocabulary needs at least one character")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise DataError(f"character vocabulary entries must be single characters, got {bad[0]!r}")
        if len(set(chars)) != len(chars):
            raise DataError("character vocabulary has duplicate entries")
        if unknown not in ("error", "skip", "unk"):
            raise DataError(f"unknown must be 'error', 'skip' or 'unk', got {unknown!r}")
        self.chars = chars
        self.unknown = unknown
        self._index = {c: i for i, c in enumerate(chars)}
        self.unk_id = len(chars) if unknown == "unk" else None

    @classmethod
    def train(cls, texts: str | Iterable[str], *, unknown: UnknownPolicy = "error") -> "CharTokenizer":
        """Vocabulary = sorted distinct characters of `texts` (one string or several)."""
        chars = set()
        for text in _texts(texts):
            chars.update(text)
        if not chars:
            raise DataError("cannot build a character vocabulary from empty text")
        return cls(sorted(chars), unknown=unknown)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + (self.unk_id is not None)

    def encode(self, text: str) -> list[int]:
        index = self._index
        try:
            return [index[c] for c in text]
        except KeyError:
            pass
        ids, skipped, first = [], 0, None
        for position, c in enumerate(text):
            token = index.get(c)
            if token is not None:
                ids.append(token)
                continue
            if self.unknown == "error":
                raise DataError(
                    f"character {c!r} (U+{ord(c):04X}) at position {position} is not in the "
                    f"{len(self.chars)}-character vocabulary"
                )
            if self.unknown == "unk":
                ids.append(self.unk_id)
            else:
                skipped += 1
                first = first if first is not None else (c, position)
        if skipped:
            warnings.warn(
                f"CharTokenizer skipped {skipped} character(s) not in the vocabulary "
                f"(first {first[0]!r} at position {first[1]})",
                stacklevel=2,
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        chars = self.chars
        return "".join(chars[i] if i < len(chars) else "\ufffd" for i in _check_ids(ids, self.vocab_size))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": FORMAT_VERSION, "chars": list(self.chars), "unknown": self.unknown}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CharTokenizer":
        return cls(data["chars"], unknown=data["unknown"])

    def fingerprint(self) -> str:
        return _fingerprint({"kind": self.kind, "chars": list(self.chars), "unknown": self.unknown})

    def save(self, path: str | os.PathLike) -> None:
        _write_json(self.to_json(), path)


class WordTokenizer:
    """Whitespace-split words; ids 0..3 are `<pad>`, `<unk>`, `<bos>`, `<eos>` (then `<mask>` if asked for).

    Words follow the specials by decreasing training count, ties broken alphabetically.
    """

    kind = "word"
    pad_id = 0
    unk_id = 1
    bos_id = 2
    eos_id = 3

    def __init__(self, words: Sequence[str], *, lowercase: bool = False, mask: bool = False):
        words = tuple(words)
        specials = SPECIALS + ((MASK,) if mask else ())
        for w in words:
            if not isinstance(w, str) or not w or w.split() != [w]:
                raise DataError(f"vocabulary words must be non-empty strings without whitespace, got {w!r}")
            if w in specials:
                raise DataError(f"vocabulary word {w!r} collides with a special token")
        if len(set(words)) != len(words):
            raise DataError("word vocabulary has duplicate entries")
        self.words = words
        self.lowercase = bool(lowercase)
        self.mask_id = len(SPECIALS) if mask else None
        self.tokens = specials + words
        self._index = {w: i + len(specials) for i, w in enumerate(words)}

    @classmethod
    def train(
        cls,
        texts: str | Iterable[str],
        *,
        min_count: int = 1,
        max_size: int | None = None,
        lowercase: bool = False,
        mask: bool = False,
    ) -> "WordTokenizer":
        """Build the vocabulary from `texts`: words seen at least `min_count` times, at most `max_size` ids in all
        (specials included)."""
        num_specials = len(SPECIALS) + bool(mask)
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise DataError(f"min_count must be an integer >= 1, got {min_count!r}")
        bad_size = isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= num_specials
        if max_size is not None and bad_size:
            raise DataError(f"max_size must be an integer > {num_specials} (the special tokens), got {max_size!r}")
        counts = collections.Counter()
        for text in _texts(texts):
            counts.update((text.lower() if lowercase else text).split())
        for special in SPECIALS + (MASK,):
            counts.pop(special, None)
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max_size - num_specials]
        return cls(words, lowercase=lowercase, mask=mask)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        unk, index = self.unk_id, self._index
        return [index.get(w, unk) for w in (text.lower() if self.lowercase else text).split()]

    def decode(self, ids: Sequence[int]) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id, self.mask_id}
        return " ".join(self.tokens[i] for i in _check_ids(ids, self.vocab_size) if i not in skip)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "version": FORMAT_VERSION, "words": list(self.words),
            "lowercase": self.lowercase, "mask": self.mask_id is not None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WordTokenizer":
        return cls(data["words"], lowercase=data["lowercase"], mask=data["mask"])

    def fingerprint(self) -> str:
        return _fingerprint({"kind": self.kind, "tokens": list(self.tokens), "lowercase": self.lowercase})

    def save(self, path: str | os.PathLike) -> None:
        _write_json(self.to_json(), path)


class BPETokenizer:
    """Byte-level BPE trained with the `tokenizers` library; ids 0..3 are `<pad>`, `<unk>`, `<bos>`, `<eos>`
    (then `<mask>` if asked for). Byte-level input never needs `<unk>`; the id exists so all word-like
    tokenizers share the same special ids."""

    kind = "bpe"
    pad_id = 0
    unk_id = 1
    bos_id = 2
    eos_id = 3

    def __init__(self, tokenizer: hf_tokenizers.Tokenizer, *, lowercase: bool, mask: bool):
        specials = SPECIALS + ((MASK,) if mask else ())
        for expected_id, token in enumerate(specials):
            if tokenizer.token_to_id(token) != expected_id:
                raise DataError(f"BPE tokenizer must have {token!r} at id {expected_id}")
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.lowercase = bool(lowercase)
        self.mask_id = len(SPECIALS) if mask else None
        self._skip = set(range(len(specials))) - {self.unk_id}

    @classmethod
    def train(
        cls,
        texts: str | Iterable[str],
        *,
        vocab_size: int,
        min_frequency: int = 2,
        lowercase: bool = False,
        mask: bool = False,
    ) -> "BPETokenizer":
        """Learn merges on `texts` until `vocab_size` ids (256 byte symbols and the specials included)."""
        specials = list(SPECIALS + ((MASK,) if mask else ()))
        alphabet = hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()
        minimum = len(alphabet) + len(specials)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
            raise DataError(f"vocab_size must be an integer >= {minimum} (256 bytes + specials), got {vocab_size!r}")
        tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
        if lowercase:
            tokenizer.normalizer = hf_tokenizers.normalizers.Lowercase()
        tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
        trainer = hf_tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=alphabet, show_progress=False,
        )
        tokenizer.train_from_iterator(_texts(texts), trainer=trainer)
        return cls(tokenizer, lowercase=lowercase, mask=mask)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def normalize(self, text: str) -> str:
        """The text `decode(encode(text))` returns: `text`, lower-cased when `lowercase=True`."""
        normalizer = self._tokenizer.normalizer
        return normalizer.normalize_str(text) if normalizer is not None else text

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"text has an unpaired surrogate {text[e.start]!r} at position {e.start}") from None
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in _check_ids(ids, self.vocab_size) if i not in self._skip]
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "version": FORMAT_VERSION, "lowercase": self.lowercase,
            "mask": self.mask_id is not None, "tokenizer": json.loads(self._tokenizer.to_str()),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BPETokenizer":
        tokenizer = hf_tokenizers.Tokenizer.from_str(json.dumps(data["tokenizer"]))
        return cls(tokenizer, lowercase=data["lowercase"], mask=data["mask"])

    def fingerprint(self) -> str:
        spec = json.loads(self._tokenizer.to_str())
        return _fingerprint({
            "kind": self.kind,
            "vocab": spec["model"]["vocab"],
            "merges": spec["model"]["merges"],
            "added": [[t["id"], t["content"]] for t in spec["added_tokens"]],
            "lowercase": self.lowercase,
        })

    def save(self, path: str | os.PathLike) -> None:
        _write_json(self.to_json(), path)


Tokenizer = CharTokenizer | WordTokenizer | BPETokenizer
_KINDS = {cls.kind: cls for cls in (CharTokenizer, WordTokenizer, BPETokenizer)}


def train_tokenizer(kind: Literal["char", "word", "bpe"], texts: str | Iterable[str], **options: Any) -> Tokenizer:
    """Train the tokenizer of `kind` on `texts` with that class's `train` options."""
    if kind not in _KINDS:
        raise DataError(f"unknown tokenizer kind {kind!r} (expected one of {', '.join(_KINDS)})")
    return _KINDS[kind].train(texts, **options)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer written by `save`; DataError naming the file if it is missing, corrupt or of an unknown kind."""
    p = pathlib.Path(path)
    if not p.exists():
        raise DataError("tokenizer file not found", path)
    if p.is_dir():
        raise DataError("is a directory, expected a tokenizer JSON file", path)
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except OSError as e:
        raise DataError(f"cannot read tokenizer file: {e.strerror or e}", path) from None
    except UnicodeDecodeError as e:
        raise DataError(f"corrupt tokenizer file: not valid UTF-8 at byte {e.start}", path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"corrupt tokenizer file: invalid JSON ({e.msg})", path, e.lineno) from None
    except RecursionError:
        raise DataError("corrupt tokenizer file: JSON nested too deeply", path) from None
    if not isinstance(data, dict) or "kind" not in data:
        raise DataError("corrupt tokenizer file: expected a JSON object with a 'kind' field", path)
    kind = data["kind"]
    if not isinstance(kind, str) or kind not in _KINDS:
        raise DataError(f"unknown tokenizer kind {kind!r} (expected one of {', '.join(_KINDS)})", path)
    if data.get("version") != FORMAT_VERSION:
        version = data.get("version")
        raise DataError(f"unsupported tokenizer format version {version!r} (expected {FORMAT_VERSION})", path)
    try:
        return _KINDS[kind].from_json(data)
    except DataError as e:
        raise DataError(f"corrupt {kind} tokenizer: {e.message}", path) from None
    except Exception as e:  # the tokenizers library raises plain Exception on a malformed spec
        raise DataError(f"corrupt {kind} tokenizer: {type(e).__name__}: {e}", path) from None
