"""File readers: contents, the bad-input catalogue (file and line in every message), the shared data, fuzzing."""

import gzip

import grain
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxlm.data.sources import enforce_max_length, read_lines, read_parallel, read_text, read_tsv_labeled
from flaxlm.errors import DataError, FlaxlmError


def write(path, content):
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def test_read_text_plain_and_gzip(tmp_path):
    text = "First Citizen:\nBefore we proceed, ünïcode.\n"
    assert read_text(write(tmp_path / "a.txt", text)) == text
    assert read_text(write(tmp_path / "a.txt.gz", text)) == text


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "missing.txt: file not found"),
        ("empty.txt", b"", "empty.txt: file is empty"),
        ("blank.txt", b" \n\t\n", "blank.txt: file contains only whitespace"),
        ("latin1.txt", b"line one\ncaf\xe9\n", "latin1.txt:2: not valid UTF-8: byte 0xe9 at byte offset 12"),
        ("bad.gz", b"not gzip at all", "bad.gz: cannot read file: Not a gzipped file"),
        ("cut.gz", gzip.compress(b"hello world", mtime=0)[:-6], "cut.gz: corrupt gzip file"),
    ],
)
def test_read_text_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_text(path)
    assert str(info.value).startswith(str(tmp_path) + "/")
    assert message in str(info.value)


def test_read_text_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory, expected a file"):
        read_text(tmp_path)


def test_read_lines_line_endings(tmp_path):
    assert read_lines(write(tmp_path / "a.txt", "\ufeffa\r\nb\n\nc")) == ["a", "b", "", "c"]
    assert read_lines(write(tmp_path / "b.txt", "a\u2028b\x0bc\n")) == ["a\u2028b\x0bc"]


def test_tsv_accepts_either_header_name(tmp_path):
    for header in ("label\tsentence", "label\tcontent"):
        rows = read_tsv_labeled(write(tmp_path / "a.tsv", f"{header}\n0\tbad film .\n\n1\tgood film\r\n"))
        assert rows.texts == ["bad film .", "good film"]
        assert rows.labels == [0, 1] and rows.lines == [2, 4] and len(rows) == 2
    named = read_tsv_labeled(write(tmp_path / "n.tsv", "label\ttext\npos\tyes\nneg\tno\n"), label_set=["neg", "pos"])
    assert named.labels == [1, 0]
    assert list(grain.MapDataset.source(named)) == [("yes", 1), ("no", 0)]


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ("label\tsentence\n0\tfine\n1 missing tab\n", {}, ":3: no tab in line: expected label<TAB>text"),
        ("label\tsentence\n0\tfine\n2\tthree\n", {"label_set": ["0", "1"]},
         ":3: label '2' is not in the label set ['0', '1']"),
        ("label\tsentence\npos\tx\n", {}, ":2: label 'pos' is not a non-negative integer"),
        ("label\tsentence\n0\ta\tb\n", {}, ":2: expected 2 tab-separated columns, found 3"),
        ("label\tsentence\n0\t  \n", {}, ":2: empty text"),
        ("0\tno header\n", {}, ":1: expected a header line 'label<TAB>text'"),
        ("label\tsentence\n\n", {}, ": no data rows after the header"),
    ],
)
def test_tsv_errors_name_file_and_line(tmp_path, content, kwargs, message):
    path = write(tmp_path / "data.tsv", content)
    with pytest.raises(DataError) as info:
        read_tsv_labeled(path, **kwargs)
    assert str(info.value).startswith(f"{path}{message}")


def test_read_parallel_plain_and_gzip(tmp_path):
    src = write(tmp_path / "a.de.gz", "Ein Hund .\nZwei Katzen\n")
    tgt = write(tmp_path / "a.en", "A dog .\n Two cats \n")
    pairs = read_parallel(src, tgt)
    assert pairs.src == ["Ein Hund .", "Zwei Katzen"] and pairs.tgt == ["A dog .", "Two cats"]
    assert pairs.lines == [1, 2] and len(pairs) == 2
    assert grain.MapDataset.source(pairs)[1] == ("Zwei Katzen", "Two cats")


def test_read_parallel_count_mismatch_names_both_files(tmp_path):
    src = write(tmp_path / "s.txt", "a\nb\nc\n")
    tgt = write(tmp_path / "t.txt.gz", "x\ny\n")
    with pytest.raises(DataError) as info:
        read_parallel(src, tgt)
    assert str(info.value) == f"parallel files differ in line count: {src} has 3 lines, {tgt} has 2"


def test_read_parallel_empty_line(tmp_path):
    src = write(tmp_path / "s.txt", "a\n\nc\n")
    tgt = write(tmp_path / "t.txt", "x\ny\nz\n")
    with pytest.raises(DataError, match=rf"^{src}:2: empty line$"):
        read_parallel(src, tgt)


def test_enforce_max_length_truncate_and_reject():
    sequences = [[1, 2], [1, 2, 3, 4, 5], [1, 2, 3, 4]]
    with pytest.warns(UserWarning, match=r"d.tsv: truncated 2 sequence\(s\) to max_length 3 \(first at line 7\)"):
        out = enforce_max_length(sequences, 3, policy="truncate", path="d.tsv", lines=[5, 7, 9])
    assert out == [[1, 2], [1, 2, 3], [1, 2, 3]]
    with pytest.raises(DataError, match=r"^d.tsv:7: 5 tokens exceed max_length 3$"):
        enforce_max_length(sequences, 3, policy="reject", path="d.tsv", lines=[5, 7, 9])
    with pytest.raises(DataError, match=r"^example 1: 5 tokens exceed max_length 3$"):
        enforce_max_length(sequences, 3, policy="reject")
    assert enforce_max_length(sequences, 5, policy="reject") == sequences
    with pytest.raises(DataError, match="policy must be"):
        enforce_max_length(sequences, 3, policy="drop")
    with pytest.raises(DataError, match="max_length must be"):
        enforce_max_length(sequences, 0, policy="reject")


def test_shared_sst2(shared_data):
    train = read_tsv_labeled(shared_data / "sst2" / "train.tsv", label_set=["0", "1"])
    dev = read_tsv_labeled(shared_data / "sst2" / "dev.tsv", label_set=["0", "1"])
    assert len(train) == 67_349 and len(dev) == 872
    assert (train.texts[0], train.labels[0], train.lines[0]) == ("hide new secretions from the parental units", 0, 2)
    assert dev.texts[0] == "one long string of cliches ." and dev.labels[0] == 0
    assert set(train.labels) == {0, 1}


def test_shared_multi30k(shared_data):
    train = read_parallel(shared_data / "multi30k" / "train.de.gz", shared_data / "multi30k" / "train.en.gz")
    val = read_parallel(shared_data / "multi30k" / "val.de.gz", shared_data / "multi30k" / "val.en.gz")
    assert len(train) == 29_000 and len(val) == 1_014
    assert train.tgt[0] == "Two young, White males are outside near many bushes."


fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
tsv_like = st.lists(
    st.sampled_from([b"label\tsentence\n", b"0\tgood\n", b"1\tbad film\n", b"\t", b"\n", b"2", b"\xff", b"\r\n",
                     b"a\tb\tc"]),
    max_size=12,
).map(b"".join)


@fuzz
@given(st.binary(max_size=64) | tsv_like)
def test_fuzz_tsv_reader(tmp_path, content):
    path = write(tmp_path / "fuzz.tsv", content)
    try:
        rows = read_tsv_labeled(path, label_set=["0", "1"])
    except FlaxlmError as e:
        assert isinstance(e, DataError) and str(e).startswith(str(path))
        return
    assert len(rows.texts) == len(rows.labels) == len(rows.lines) > 0


@fuzz
@given(st.binary(max_size=48) | tsv_like, st.binary(max_size=48) | tsv_like, st.booleans())
def test_fuzz_parallel_reader(tmp_path, src_bytes, tgt_bytes, gzipped):
    src = write(tmp_path / ("s.txt.gz" if gzipped else "s.txt"), src_bytes)
    tgt = write(tmp_path / "t.txt", tgt_bytes)
    try:
        pairs = read_parallel(src, tgt)
    except FlaxlmError as e:
        assert isinstance(e, DataError)
        return
    assert len(pairs.src) == len(pairs.tgt) > 0


@fuzz
@given(st.binary(max_size=64))
def test_fuzz_read_text(tmp_path, content):
    try:
        assert read_text(write(tmp_path / "f.txt", content)).strip()
    except FlaxlmError as e:
        assert isinstance(e, DataError)


def test_data_error_format_and_pickle():
    import pickle

    error = DataError("bad label", "d.tsv", 7)
    assert str(error) == "d.tsv:7: bad label" and (error.path, error.line, error.message) == ("d.tsv", 7, "bad label")
    assert str(DataError("no file")) == "no file" and str(DataError("x", "p")) == "p: x"
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    assert isinstance(error, FlaxlmError) and isinstance(error, ValueError)
