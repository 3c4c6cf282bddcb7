"""Readers for the text formats flaxlm trains on; every problem is a DataError naming the file (and line).

- `read_text(path)`: a whole UTF-8 text file (language modelling).
- `read_tsv_labeled(path, label_set=...)`: `label<TAB>text` rows under a header whose first column is
  `label` (the SST-2 format; the text column may be called anything, e.g. `sentence` or `content`).
- `read_parallel(src_path, tgt_path)`: two line-aligned files, one sentence per line (translation).
- `enforce_max_length(sequences, max_length, policy=...)`: truncate with a warning, or reject.

The returned `LabeledTexts`/`ParallelTexts` are Grain random-access sources (`__len__`/`__getitem__`).

Files ending in `.gz` are decompressed. Lines are split on "\\n" only (a trailing "\\r" is dropped), so
reported line numbers match what an editor shows. Line-based readers ignore a UTF-8 byte-order mark.
"""

import dataclasses
import gzip
import os
import pathlib
import warnings
import zlib
from collections.abc import Sequence
from typing import Literal

from flaxlm.errors import DataError

MaxLengthPolicy = Literal["truncate", "reject"]


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of `path`, decompressed when it ends in .gz.

    DataError if it is missing, a directory, unreadable, corrupt gzip or empty.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise DataError("file not found", path)
    if p.is_dir():
        raise DataError("is a directory, expected a file", path)
    try:
        data = p.read_bytes()
        if p.suffix == ".gz":
            data = gzip.decompress(data)
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", path) from None
    except (EOFError, zlib.error) as e:
        raise DataError(f"corrupt gzip file: {e}", path) from None
    if not data:
        raise DataError("file is empty", path)
    return data


def _decode(data: bytes, path: str | os.PathLike) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"not valid UTF-8: byte {data[e.start]:#04x} at byte offset {e.start}", path, line) from None


def read_text(path: str | os.PathLike) -> str:
    """The whole UTF-8 text of `path`, unchanged; DataError if missing, empty, whitespace-only or not UTF-8."""
    text = _decode(read_bytes(path), path)
    if not text.strip():
        raise DataError("file contains only whitespace", path)
    return text


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of UTF-8 text file `path` without line terminators (a final newline adds no empty line)."""
    text = _decode(read_bytes(path), path).removeprefix("\ufeff")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


@dataclasses.dataclass(frozen=True)
class LabeledTexts:
    """Rows of a labelled TSV file. `labels[i]` is an int id; `lines[i]` is the 1-based line of row i.

    A Grain random-access source: `grain.MapDataset.source(rows)[i] == (texts[i], labels[i])`.
    """

    path: str
    texts: list[str]
    labels: list[int]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], self.labels[index]


def read_tsv_labeled(path: str | os.PathLike, *, label_set: Sequence[str] | None = None) -> LabeledTexts:
    """Read `label<TAB>text` rows below a header line whose first column is `label`.

    Label ids: with `label_set`, the position of the label in `label_set` (a label outside it is an error);
    without, the label itself, which must be a non-negative integer such as "0" or "1". Blank lines are
    skipped. DataError "path:LINE: ..." for a line without a tab, with more than two columns, with empty
    text, or with a bad label; "path:1: ..." for a missing header; "path: ..." when no rows follow it.
    """
    lines = read_lines(path)
    header = lines[0].split("\t")
    if len(header) != 2 or header[0].strip().lower() != "label":
        raise DataError(f"expected a header line 'label<TAB>text', got {lines[0][:80]!r}", path, 1)
    index = None if label_set is None else {str(label): i for i, label in enumerate(label_set)}
    texts, labels, numbers = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) == 1:
            raise DataError(f"no tab in line: expected label<TAB>text, got {line[:80]!r}", path, number)
        if len(columns) > 2:
            raise DataError(f"expected 2 tab-separated columns, found {len(columns)}", path, number)
        label, text = columns[0].strip(), columns[1].strip()
        if not text:
            raise DataError("empty text", path, number)
        if index is not None:
            if label not in index:
                raise DataError(f"label {label!r} is not in the label set {list(index)}", path, number)
            labels.append(index[label])
        elif label.isascii() and label.isdigit():
            labels.append(int(label))
        else:
            message = f"label {label!r} is not a non-negative integer (give a label_set for named labels)"
            raise DataError(message, path, number)
        texts.append(text)
        numbers.append(number)
    if not texts:
        raise DataError("no data rows after the header", path)
    return LabeledTexts(path=os.fspath(path), texts=texts, labels=labels, lines=numbers)


@dataclasses.dataclass(frozen=True)
class ParallelTexts:
    """Aligned sentence pairs; `lines[i]` is the 1-based line of pair i in both files.

    A Grain random-access source: `grain.MapDataset.source(pairs)[i] == (src[i], tgt[i])`.
    """

    src_path: str
    tgt_path: str
    src: list[str]
    tgt: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, index: int) -> tuple[str, str]:
        return self.src[index], self.tgt[index]


def read_parallel(src_path: str | os.PathLike, tgt_path: str | os.PathLike) -> ParallelTexts:
    """Read two line-aligned text files (gzipped when named *.gz), one sentence per line.

    DataError naming both files and their line counts when the counts differ, and "path:LINE: empty line"
    for a blank line on either side (it would be a pair with nothing to translate).
    """
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"parallel files differ in line count: {os.fspath(src_path)} has {len(src)} lines, "
            f"{os.fspath(tgt_path)} has {len(tgt)}"
        )
    for path, side in ((src_path, src), (tgt_path, tgt)):
        for number, line in enumerate(side, start=1):
            if not line.strip():
                raise DataError("empty line", path, number)
    return ParallelTexts(
        src_path=os.fspath(src_path), tgt_path=os.fspath(tgt_path),
        src=[s.strip() for s in src], tgt=[t.strip() for t in tgt], lines=list(range(1, len(src) + 1)),
    )


def enforce_max_length(
    sequences: Sequence[Sequence[int]],
    max_length: int,
    *,
    policy: MaxLengthPolicy,
    path: str | os.PathLike | None = None,
    lines: Sequence[int] | None = None,
) -> list[list[int]]:
    """Apply the max-length policy to token sequences.

    "truncate" keeps the first `max_length` tokens of longer sequences and warns once with their count;
    "reject" raises DataError naming the file and line (or the example index) of the first one too long.
    `lines[i]` is the source line of sequence i when known.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length must be an integer >= 1, got {max_length!r}")
    if policy not in ("truncate", "reject"):
        raise DataError(f"max-length policy must be 'truncate' or 'reject', got {policy!r}")
    out, too_long = [], []
    for i, sequence in enumerate(sequences):
        sequence = list(sequence)
        if len(sequence) > max_length:
            line = lines[i] if lines is not None else None
            if policy == "reject":
                message = f"{len(sequence)} tokens exceed max_length {max_length}"
                raise DataError(message if line is not None else f"example {i}: {message}", path, line)
            too_long.append(f"line {line}" if line is not None else f"example {i}")
            sequence = sequence[:max_length]
        out.append(sequence)
    if too_long:
        source = f"{os.fspath(path)}: " if path is not None else ""
        warnings.warn(
            f"{source}truncated {len(too_long)} sequence(s) to max_length {max_length} (first at {too_long[0]})",
            stacklevel=2,
        )
    return out
