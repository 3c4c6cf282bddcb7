"""Grain pipelines: batch contents, bucketing, exact resume from a saved iterator state, host sharding, fuzzing."""

import json

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxlm.data.pipelines import (
    bucketed_batches,
    classification_batches,
    lm_sequential,
    lm_windows,
    packed_lm,
    translation_batches,
)
from flaxlm.errors import DataError, FlaxlmError

ONE_HOST = {"process_index": 0, "process_count": 1}


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert a[key].dtype == b[key].dtype


def assert_resumes_exactly(make, skip, take):
    """A fresh iterator given the state saved after `skip` batches yields what the original yields next."""
    it = make()
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(take)]
    restored = make()
    restored.set_state(state)
    for batch in expected:
        assert_batches_equal(next(restored), batch)


def host_batches(make, process_count, steps):
    """[host][step] batches from `process_count` hosts."""
    return [
        [b for _, b in zip(range(steps), make(process_index=i, process_count=process_count))]
        for i in range(process_count)
    ]


# ---------------------------------------------------------------- lm_windows


def test_lm_windows_are_shifted_contiguous_slices():
    tokens = np.arange(500)
    it = lm_windows(tokens, block_size=16, batch_size=8, seed=0, num_steps=3, **ONE_HOST)
    batches = list(it)
    assert len(batches) == 3
    for batch in batches:
        assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (8, 16)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32 and batch["mask"].dtype == np.float32
        starts = batch["inputs"][:, 0]
        np.testing.assert_array_equal(batch["inputs"], starts[:, None] + np.arange(16))
        np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
        assert starts.min() >= 0 and starts.max() < 500 - 16
        assert batch["mask"].min() == 1.0


def test_lm_windows_depend_only_on_seed_and_step():
    tokens = np.arange(1000)
    a = next(lm_windows(tokens, block_size=8, batch_size=4, seed=3, **ONE_HOST))
    b = next(lm_windows(tokens, block_size=8, batch_size=4, seed=3, **ONE_HOST))
    c = next(lm_windows(tokens, block_size=8, batch_size=4, seed=4, **ONE_HOST))
    assert_batches_equal(a, b)
    assert not np.array_equal(a["inputs"], c["inputs"])
    starts = np.random.default_rng((3, 0)).integers(0, 1000 - 8, size=4)
    np.testing.assert_array_equal(a["inputs"][:, 0], starts)


def test_lm_windows_resume_and_hosts():
    tokens = np.arange(300) % 37

    def make(**host):
        return lm_windows(tokens, block_size=8, batch_size=6, seed=1, **(host or ONE_HOST))

    assert_resumes_exactly(make, skip=5, take=3)
    single = host_batches(make, 1, 4)[0]
    for parts, whole in zip(zip(*host_batches(make, 3, 4)), single):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    assert parts[0]["inputs"].shape == (2, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokens": np.arange(8)}, "tokens has 8 ids; lm_windows needs more than block_size=8"),
        ({"batch_size": 5, "process_count": 2}, "global batch_size 5 is not divisible by process_count 2"),
        ({"process_index": 2, "process_count": 2}, "process_index 2 must be < process_count 2"),
        ({"tokens": np.arange(20.0)}, "tokens must hold integer token ids"),
        ({"tokens": np.arange(20) - 1}, "token id -1 outside"),
        ({"tokens": np.zeros((4, 5), int)}, "must be a 1-D array"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"seed": 2**32}, "seed must be < 2\\*\\*32"),
        ({"block_size": 0}, "block_size must be an integer >= 1"),
    ],
)
def test_lm_windows_bad_arguments(kwargs, message):
    args = {"tokens": np.arange(100), "block_size": 8, "batch_size": 4, "seed": 0, **ONE_HOST, **kwargs}
    with pytest.raises(DataError, match=message):
        lm_windows(**args)


# ---------------------------------------------------------------- lm_sequential


def test_lm_sequential_covers_every_target_once():
    tokens = np.arange(1, 104)  # 102 targets
    targets = []
    for host in range(2):
        for batch in lm_sequential(tokens, block_size=10, batch_size=4, process_index=host, process_count=2):
            assert batch["inputs"].shape == (2, 10)
            np.testing.assert_array_equal(batch["targets"] * batch["mask"], (batch["inputs"] + 1) * batch["mask"])
            targets.extend(batch["targets"][batch["mask"] > 0].tolist())
    assert sorted(targets) == list(range(2, 104))
    single = list(lm_sequential(tokens, block_size=10, batch_size=4, **ONE_HOST))
    assert len(single) == 3 and sum(b["mask"].sum() for b in single) == 102
    assert_resumes_exactly(lambda: lm_sequential(tokens, block_size=10, batch_size=2, **ONE_HOST), skip=2, take=3)


# ---------------------------------------------------------------- packed_lm


DOCS = [list(range(100 * d, 100 * d + n)) for d, n in enumerate([3, 9, 5, 1, 14, 7, 2, 6, 11, 4])]


def unpack(batch):
    """(inputs, targets) token lists of every packed segment in a batch."""
    segments = []
    for row in range(batch["inputs"].shape[0]):
        ids = batch["segment_ids"][row]
        for segment in np.unique(ids[ids > 0]):
            where = ids == segment
            np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
            segments.append((batch["inputs"][row][where].tolist(), batch["targets"][row][where].tolist()))
    return segments


def test_packed_lm_rows_hold_whole_chunks_without_cross_document_targets():
    batches = list(packed_lm(DOCS, seq_len=8, batch_size=2, seed=0, eos_id=999, pad_id=5, **ONE_HOST))
    segments = [s for b in batches for s in unpack(b)]
    for batch in batches:
        assert batch["inputs"].shape == (2, 8) and batch["mask"].dtype == np.float32
        np.testing.assert_array_equal(batch["mask"], batch["segment_ids"] > 0)
        assert (batch["inputs"][batch["mask"] == 0] == 5).all()
    expected = []
    for doc in DOCS:
        ids = doc + [999]
        for start in range(0, len(ids) - 1, 8):
            chunk = ids[start : start + 9]
            expected.append((chunk[:-1], chunk[1:]))
    assert sorted(segments) == sorted(expected)


def test_packed_lm_resume_and_hosts():
    def make(**host):
        return packed_lm(DOCS, seq_len=6, batch_size=2, seed=2, num_epochs=None, bos_id=998, **(host or ONE_HOST))

    assert_resumes_exactly(make, skip=7, take=5)
    one_epoch = {
        host: [s for b in packed_lm(DOCS, seq_len=6, batch_size=4, seed=2, bos_id=998, process_index=host,
                                    process_count=2)
               for s in unpack(b)]
        for host in range(2)
    }
    everything = [s for b in packed_lm(DOCS, seq_len=6, batch_size=4, seed=2, bos_id=998, **ONE_HOST)
                  for s in unpack(b)]
    assert sorted(one_epoch[0] + one_epoch[1]) == sorted(everything)
    assert abs(len(one_epoch[0]) - len(one_epoch[1])) <= 1


# ---------------------------------------------------------------- bucketing

LENGTHS = [3, 17, 5, 9, 30, 1, 12, 8, 8, 25, 2, 16, 4, 7, 19, 11, 6, 31, 10, 13]


def examples(lengths=LENGTHS):
    return [{"ids": list(range(1, n + 1)), "label": i} for i, n in enumerate(lengths)]


def test_bucketing_pads_to_bucket_sizes_only_and_visits_each_example_once():
    boundaries = (4, 8, 16, 32)
    seen = []
    for batch in bucketed_batches(examples(), bucket_boundaries=boundaries, batch_size=3, pad_id=0, seed=0, **ONE_HOST):
        length = batch["ids"].shape[1]
        assert length in boundaries and batch["ids"].shape[0] == 3
        real = batch["weights"] > 0
        lengths = batch["ids_lengths"][real]
        assert lengths.max() <= length and (length == 4 or lengths.max() > boundaries[boundaries.index(length) - 1])
        assert (batch["ids_lengths"][~real] == 0).all() and (batch["ids"][~real] == 0).all()
        for row in np.flatnonzero(real):
            n = batch["ids_lengths"][row]
            assert batch["ids"][row, :n].tolist() == list(range(1, n + 1)) and (batch["ids"][row, n:] == 0).all()
            assert LENGTHS[batch["label"][row]] == n
            seen.append(int(batch["label"][row]))
    assert sorted(seen) == list(range(len(LENGTHS)))


def test_bucketing_shuffles_per_epoch_and_is_deterministic():
    def labels(seed, shuffle=True, num_epochs=2):
        it = bucketed_batches(examples(), bucket_boundaries=(8, 32), batch_size=4, pad_id=0, seed=seed,
                              shuffle=shuffle, num_epochs=num_epochs, **ONE_HOST)
        return [b["label"][b["weights"] > 0].tolist() for b in it]

    first = labels(0)
    assert first == labels(0) and first != labels(1)
    epoch_batches = len(first) // 2
    epoch1, epoch2 = first[:epoch_batches], first[epoch_batches:]
    assert sorted(sum(epoch1, [])) == sorted(sum(epoch2, [])) == list(range(20)) and epoch1 != epoch2
    assert labels(0, shuffle=False, num_epochs=1) == labels(5, shuffle=False, num_epochs=1)
    assert labels(0, shuffle=False, num_epochs=1)[0] == [0, 2, 5, 7]


def test_bucketing_drop_remainder():
    it = bucketed_batches(examples(), bucket_boundaries=(8, 32), batch_size=4, pad_id=0, seed=0,
                          drop_remainder=True, **ONE_HOST)
    batches = list(it)
    assert all(b["weights"].min() == 1 for b in batches)
    assert len(batches) == 2 + 2  # 9 short examples -> 2 full batches, 11 long -> 2
    with pytest.raises(DataError, match="no full batch"):
        bucketed_batches(examples()[:3], bucket_boundaries=(32,), batch_size=4, pad_id=0, seed=0,
                         drop_remainder=True, **ONE_HOST)


def test_bucketing_resume_across_epochs_and_hosts():
    def make(**host):
        return bucketed_batches(examples(), bucket_boundaries=(8, 16, 32), batch_size=4, pad_id=0, seed=7,
                                num_epochs=None, **(host or ONE_HOST))

    assert_resumes_exactly(make, skip=9, take=6)  # crosses the epoch boundary (7 batches per epoch)
    single = host_batches(make, 1, 10)[0]
    for parts, whole in zip(zip(*host_batches(make, 2, 10)), single):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_bucketing_rejects_examples_longer_than_the_largest_bucket():
    with pytest.raises(DataError, match=r"example 17 has length 31 > the largest bucket boundary 16"):
        bucketed_batches(examples(), bucket_boundaries=(8, 16), batch_size=2, pad_id=0, seed=0, **ONE_HOST)


@pytest.mark.parametrize(
    "exs, boundaries, message",
    [
        ([], (8,), "non-empty sequence of dicts"),
        ([{"ids": [1], "label": 0}, {"ids": [1]}], (8,), "example 1 must be a dict with fields"),
        ([{"ids": [1.5], "label": 0}], (8,), "example 0 field 'ids' must hold integer token ids"),
        ([{"ids": [1], "label": -1}], (8,), "example 0 field 'label' must be an integer"),
        ([{"label": 1}], (8,), "at least one sequence field"),
        ([{"ids": [1], "weights": 1}], (8,), "clashes with an output key"),
        ([{"ids": [1]}], (8, 8), "strictly increasing"),
        ([{"ids": [1]}], (), "must not be empty"),
        ([{"ids": [1]}], (0, 4), "each bucket boundary must be an integer >= 1"),
    ],
)
def test_bucketing_bad_examples(exs, boundaries, message):
    with pytest.raises(DataError, match=message):
        bucketed_batches(exs, bucket_boundaries=boundaries, batch_size=2, pad_id=0, seed=0, **ONE_HOST)


def test_classification_batches_keys():
    it = classification_batches([[4, 5, 6], [7]], [1, 0], bucket_boundaries=(2, 4), batch_size=2, pad_id=0,
                                seed=0, shuffle=False, **ONE_HOST)
    first, second = list(it)
    assert set(first) == {"tokens", "lengths", "labels", "weights"}
    assert first["tokens"].tolist() == [[4, 5, 6, 0], [0, 0, 0, 0]] and first["lengths"].tolist() == [3, 0]
    assert first["labels"].tolist() == [1, 0] and first["weights"].tolist() == [1.0, 0.0]
    assert second["tokens"].tolist() == [[7, 0], [0, 0]] and second["labels"].tolist() == [0, 0]
    assert first["tokens"].dtype == np.int32 and first["weights"].dtype == np.float32
    with pytest.raises(DataError, match="token_ids has 2 examples but labels has 1"):
        classification_batches([[1], [2]], [0], bucket_boundaries=(4,), batch_size=1, pad_id=0, seed=0, **ONE_HOST)


def test_translation_batches_teacher_forcing():
    it = translation_batches([[5, 6, 7], [8]], [[9], [10, 11, 12, 13]], bos_id=2, eos_id=3, bucket_boundaries=(4, 8),
                             batch_size=2, pad_id=0, seed=0, shuffle=False, **ONE_HOST)
    short, long = list(it)
    assert set(short) == {"src", "src_lengths", "tgt_in", "tgt_out", "tgt_lengths", "tgt_mask", "weights"}
    assert short["src"].tolist() == [[5, 6, 7, 0], [0, 0, 0, 0]]
    assert short["tgt_in"].tolist() == [[2, 9, 0, 0], [0, 0, 0, 0]]
    assert short["tgt_out"].tolist() == [[9, 3, 0, 0], [0, 0, 0, 0]]
    assert short["tgt_mask"].tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]] and short["tgt_mask"].dtype == np.float32
    assert long["src"].shape == (2, 8) and long["tgt_lengths"].tolist() == [5, 0]
    assert long["tgt_out"][0].tolist() == [10, 11, 12, 13, 3, 0, 0, 0]


@pytest.mark.parametrize("task", ["classification", "translation"])
def test_task_pipelines_resume_exactly(task):
    ids = [list(range(1, n + 1)) for n in LENGTHS]

    def make():
        common = dict(bucket_boundaries=(8, 16, 40), batch_size=4, pad_id=0, seed=3, num_epochs=None, **ONE_HOST)
        if task == "classification":
            return classification_batches(ids, [i % 2 for i in range(len(ids))], **common)
        return translation_batches(ids, ids[::-1], bos_id=2, eos_id=3, **common)

    assert_resumes_exactly(make, skip=6, take=4)


def test_pipelines_are_grain_iterators():
    it = lm_windows(np.arange(50), block_size=4, batch_size=2, seed=0, **ONE_HOST)
    assert isinstance(it, grain.DatasetIterator)


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), max_size=30),
    boundaries=st.one_of(
        st.lists(st.integers(1, 40), max_size=3, unique=True).map(lambda b: sorted(b) + [41]),
        st.lists(st.integers(-2, 40), max_size=4),
    ),
    per_host=st.integers(1, 4),
    process_count=st.integers(1, 3),
    batch_size_offset=st.sampled_from([0, 0, 0, 1, -1]),
    drop_remainder=st.booleans(),
)
def test_fuzz_bucketing(lengths, boundaries, per_host, process_count, batch_size_offset, drop_remainder):
    batch_size = per_host * process_count + batch_size_offset
    seen = []
    try:
        for host in range(process_count):
            it = bucketed_batches(
                examples(lengths), bucket_boundaries=boundaries, batch_size=batch_size, pad_id=0, seed=0,
                drop_remainder=drop_remainder, process_index=host, process_count=process_count,
                read_options=grain.ReadOptions(num_threads=0),
            )
            for batch in it:
                assert batch["ids"].shape[1] in boundaries
                assert batch["ids"].shape[0] == batch_size // process_count
                real = batch["weights"] > 0
                assert (batch["ids_lengths"][real] == np.asarray(lengths)[batch["label"][real]]).all()
                seen.extend(batch["label"][real].tolist())
    except FlaxlmError as e:
        assert isinstance(e, DataError)
        return
    if not drop_remainder:
        assert sorted(seen) == list(range(len(lengths)))
    assert len(seen) == len(set(seen))
