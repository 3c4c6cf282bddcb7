"""Tokenizers: vocabularies, specials, round trips, unknown-input policies, save/load, fingerprints, fuzzing."""

import functools
import json
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxlm.data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer, load_tokenizer, train_tokenizer
from flaxlm.errors import DataError

CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog",
    "The Cat! the cat? lower and UPPER",
] * 5


@functools.cache
def bpe(lowercase=False, mask=False):
    return BPETokenizer.train(CORPUS, vocab_size=300, lowercase=lowercase, mask=mask)


def test_char_vocabulary_is_sorted_characters_like_nanogpt():
    text = "hello world\n"
    tok = CharTokenizer.train(text)
    chars = sorted(set(text))
    assert tok.chars == tuple(chars)
    assert tok.vocab_size == len(chars) == 9
    assert tok.encode("hello") == [chars.index(c) for c in "hello"]
    assert tok.decode(tok.encode(text)) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (None, None, None, None)


def test_char_unknown_policies():
    strict = CharTokenizer.train("abc")
    with pytest.raises(DataError,
                       match=r"character 'z' \(U\+007A\) at position 2 is not in the 3-character vocabulary"):
        strict.encode("abz")
    skip = CharTokenizer.train("abc", unknown="skip")
    with pytest.warns(UserWarning, match="skipped 2 character"):
        assert skip.encode("azbz") == [0, 1]
    unk = CharTokenizer.train("abc", unknown="unk")
    assert unk.vocab_size == 4 and unk.unk_id == 3
    assert unk.encode("azc") == [0, 3, 2]
    assert unk.decode([0, 3, 2]) == "a\ufffdc"
    with pytest.raises(DataError, match="unknown must be"):
        CharTokenizer("abc", unknown="ignore")
    with pytest.raises(DataError, match="empty text"):
        CharTokenizer.train("")


def test_word_vocabulary_specials_counts_and_limits():
    tok = WordTokenizer.train(CORPUS, min_count=6)
    assert tok.tokens[:4] == ("<pad>", "<unk>", "<bos>", "<eos>")
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, None)
    assert tok.words == ("the", "a", "and", "cat", "dog", "on", "sat")  # counts 30, then 10 each (alphabetical)
    assert tok.encode("the cat flew") == [tok.tokens.index("the"), tok.tokens.index("cat"), tok.unk_id]
    assert tok.decode([tok.bos_id, *tok.encode("the cat flew"), tok.eos_id, tok.pad_id]) == "the cat <unk>"
    small = WordTokenizer.train(CORPUS, max_size=6)
    assert small.vocab_size == 6 and small.words == ("the", "a")
    lower = WordTokenizer.train(CORPUS, lowercase=True, mask=True)
    assert "The" not in lower.words and lower.encode("THE") == lower.encode("the")
    assert lower.mask_id == 4 and lower.tokens[4] == "<mask>" and lower.words[0] == "the"
    with pytest.raises(DataError, match="max_size must be"):
        WordTokenizer.train(CORPUS, max_size=4)
    with pytest.raises(DataError, match="min_count must be"):
        WordTokenizer.train(CORPUS, min_count=0)


def test_word_special_strings_in_text_are_unknown():
    tok = WordTokenizer.train(["<pad> <eos> hello"])
    assert tok.words == ("hello",)
    assert tok.encode("<pad> hello <bos>") == [tok.unk_id, 4, tok.unk_id]


def test_bpe_specials_round_trip_and_merges():
    tok = bpe()
    assert [tok._tokenizer.id_to_token(i) for i in range(4)] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert 260 < tok.vocab_size <= 300
    text = "the cat sat on the mat"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode())  # merges learned
    assert tok.decode(ids) == text
    unseen = "Zürich 東京 🙂 <pad> <eos>\ttabs\n"
    assert tok.decode(tok.encode(unseen)) == unseen
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert bpe(lowercase=True).decode(bpe(lowercase=True).encode("The CAT")) == "the cat"
    assert bpe(mask=True).mask_id == 4
    with pytest.raises(DataError, match="vocab_size must be an integer >= 260"):
        BPETokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(DataError, match="unpaired surrogate"):
        tok.encode("a\ud800b")


@pytest.mark.parametrize("tok", [CharTokenizer.train("abc"), WordTokenizer.train(["a b"]), bpe()],
                         ids=["char", "word", "bpe"])
def test_decode_rejects_out_of_range_ids(tok):
    size = tok.vocab_size
    with pytest.raises(DataError, match=rf"token id {size} at index 1 is outside the vocabulary \[0, {size}\)"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(DataError, match="token id -1 at index 0"):
        tok.decode([-1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: CharTokenizer.train("hello world", unknown="unk"),
        lambda: WordTokenizer.train(CORPUS, min_count=2, lowercase=True, mask=True),
        lambda: bpe(lowercase=True),
    ],
    ids=["char", "word", "bpe"],
)
def test_save_load_round_trip(tmp_path, make):
    tok = make()
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.vocab_size == tok.vocab_size
    for text in ["hello the cat", "Ünïcode 🙂 world"]:
        ids = tok.encode(text)
        assert loaded.encode(text) == ids and loaded.decode(ids) == tok.decode(ids)
    assert json.loads(path.read_text())["kind"] == tok.kind


def test_fingerprint_changes_with_vocabulary():
    assert CharTokenizer.train("abc").fingerprint() == CharTokenizer.train("cab").fingerprint()
    assert CharTokenizer.train("abc").fingerprint() != CharTokenizer.train("abd").fingerprint()
    assert CharTokenizer.train("abc").fingerprint() != CharTokenizer.train("abc", unknown="unk").fingerprint()
    assert WordTokenizer.train(CORPUS).fingerprint() != WordTokenizer.train(CORPUS, min_count=6).fingerprint()
    assert WordTokenizer.train(CORPUS).fingerprint() != WordTokenizer.train(CORPUS, lowercase=True).fingerprint()
    assert bpe().fingerprint() != BPETokenizer.train(CORPUS, vocab_size=270).fingerprint()
    assert bpe().fingerprint() == BPETokenizer.train(CORPUS, vocab_size=300).fingerprint()
    assert len({CharTokenizer.train("ab").fingerprint(), WordTokenizer(["ab"]).fingerprint(), bpe().fingerprint()}) == 3


def test_train_tokenizer_dispatch():
    assert train_tokenizer("char", "ba").chars == ("a", "b")
    assert train_tokenizer("word", ["x y x"], min_count=2).words == ("x",)
    with pytest.raises(DataError, match="unknown tokenizer kind 'sentencepiece'"):
        train_tokenizer("sentencepiece", "x")


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"{not json", "corrupt tokenizer file: invalid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"[1, 2]", "expected a JSON object with a 'kind' field"),
        (b'{"kind": "morse", "version": 1}', "unknown tokenizer kind 'morse'"),
        (b'{"kind": "char", "version": 99, "chars": ["a"], "unknown": "error"}',
         "unsupported tokenizer format version 99"),
        (b'{"kind": "char", "version": 1}', "corrupt char tokenizer: KeyError"),
        (b'{"kind": "char", "version": 1, "chars": ["ab"], "unknown": "error"}', "must be single characters"),
        (b'{"kind": "word", "version": 1, "words": ["a", "a"], "lowercase": false, "mask": false}', "duplicate"),
        (b'{"kind": "bpe", "version": 1, "lowercase": false, "mask": false, "tokenizer": {"model": 3}}',
         "corrupt bpe tokenizer"),
    ],
)
def test_load_tokenizer_errors_name_the_file(tmp_path, content, fragment):
    path = tmp_path / "tok.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_tokenizer(path)
    assert str(info.value).startswith(str(path))
    assert fragment in str(info.value)


def test_load_tokenizer_missing_and_directory(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "none.json")
    with pytest.raises(DataError, match="is a directory"):
        load_tokenizer(tmp_path)


def test_save_to_missing_directory_names_path(tmp_path):
    with pytest.raises(DataError, match="nodir/tok.json: cannot write tokenizer"):
        CharTokenizer.train("ab").save(tmp_path / "nodir" / "tok.json")


def test_char_tokenizer_on_tinyshakespeare_matches_nanogpt(shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text()
    tok = CharTokenizer.train(text)
    assert tok.vocab_size == 65
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    assert tok.encode(text[:1000]) == [stoi[c] for c in text[:1000]]


fuzz = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRAINED = "abcdefghij klmnop\n"


@fuzz
@given(st.text())
def test_fuzz_char_round_trip_with_each_policy(text):
    known = "".join(c for c in text if c in TRAINED)
    unk = CharTokenizer.train(TRAINED, unknown="unk")
    assert unk.decode(unk.encode(text)) == "".join(c if c in TRAINED else "\ufffd" for c in text)
    skip = CharTokenizer.train(TRAINED, unknown="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert skip.decode(skip.encode(text)) == known
    assert len(caught) == (known != text)
    strict = CharTokenizer.train(TRAINED)
    if known == text:
        assert strict.decode(strict.encode(text)) == text
    else:
        with pytest.raises(DataError):
            strict.encode(text)
    own = CharTokenizer.train(text or "x")
    assert own.decode(own.encode(text)) == text


@fuzz
@given(st.text(), st.text())
def test_fuzz_word_round_trip(train_text, text):
    tok = WordTokenizer.train([train_text])
    vocab = set(tok.words)
    assert tok.decode(tok.encode(text)) == " ".join(w if w in vocab else "<unk>" for w in text.split())


@fuzz
@given(st.text())
def test_fuzz_bpe_round_trip(text):
    assert bpe().decode(bpe().encode(text)) == text
    lower = bpe(lowercase=True)
    assert lower.decode(lower.encode(text)) == lower.normalize(text)
