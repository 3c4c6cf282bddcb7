"""Grain input pipelines. Each returns a `grain.DatasetIterator` of batches (dicts of numpy arrays).

Checkpointing: `it.get_state()` is a small JSON-serialisable dict (for index-based pipelines just
`{"next_index": k}`, the number of batches already taken); `it.set_state(state)` on a freshly built
iterator with the same arguments makes its next batch the one the saved iterator would have produced.
Grain's Orbax handlers (`grain.checkpoint`) accept these iterators directly.

Multi-host: `batch_size` is always the GLOBAL batch size. Host `process_index` of `process_count` gets
rows [process_index * b, (process_index + 1) * b) of every global batch, b = batch_size // process_count
(packed_lm: its own slice of the documents, packed into b rows). `process_index`/`process_count` default
to `jax.process_index()`/`jax.process_count()`.

Batch keys (B = batch_size // process_count, T = block/row/bucket length):

  lm_windows, lm_sequential:  inputs [B,T] int32, targets [B,T] int32, mask [B,T] float32 (1 = real target)
  packed_lm:                  inputs, targets, segment_ids, positions [B,T] int32 (segment 0 = padding),
                              mask [B,T] float32
  classification_batches:     tokens [B,T] int32, lengths [B] int32, labels [B] int32, weights [B] float32
  translation_batches:        src [B,T] int32, src_lengths [B] int32, tgt_in [B,T] int32 (<bos> + y),
                              tgt_out [B,T] int32 (y + <eos>), tgt_lengths [B] int32, tgt_mask [B,T] float32,
                              weights [B] float32
  bucketed_batches:           per sequence field k: k [B,T] int32 and k_lengths [B] int32; per scalar
                              field: [B] int32; weights [B] float32

Bucketed pipelines pad each batch to the smallest bucket boundary that fits it, so a jitted step compiles
once per bucket. With `drop_remainder=False` a partial batch keeps the full batch shape: its missing rows
have length 0, pad tokens, label 0 and weight 0, so weighted metrics count every example exactly once.
"""

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from flaxlm.errors import DataError

Batch = dict[str, np.ndarray]
_INT32_MAX = np.iinfo(np.int32).max


def default_read_options() -> grain.ReadOptions:
    """One reader thread, a few batches ahead: batches here are cheap numpy work."""
    return grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_seed(seed: Any) -> int:
    seed = _check_int("seed", seed, 0)
    if seed >= 2**32:
        raise DataError(f"seed must be < 2**32, got {seed}")
    return seed


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    count = _check_int("process_count", process_count, 1)
    index = _check_int("process_index", process_index, 0)
    if index >= count:
        raise DataError(f"process_index {index} must be < process_count {count}")
    return index, count


def _host_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size % process_count:
        raise DataError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    per_host = batch_size // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


def _token_array(tokens: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(tokens)
    except (ValueError, TypeError) as e:
        raise DataError(f"{name} must be a 1-D array of token ids: {e}") from None
    if array.ndim != 1:
        raise DataError(f"{name} must be a 1-D array of token ids, got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.int32)
    if array.dtype.kind not in "iu":
        raise DataError(f"{name} must hold integer token ids, got dtype {array.dtype}")
    if array.min() < 0 or array.max() > _INT32_MAX:
        raise DataError(f"{name} has token id {array.min() if array.min() < 0 else array.max()} outside [0, 2**31)")
    return array.astype(np.int32)


def _iterate(dataset: grain.MapDataset | grain.IterDataset, read_options: grain.ReadOptions | None):
    if isinstance(dataset, grain.MapDataset):
        dataset = dataset.to_iter_dataset(read_options or default_read_options())
    return iter(dataset)


class _WindowBatch:
    """Step -> random windows: starts drawn from numpy's generator seeded with (seed, step)."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rows: slice):
        self.tokens, self.block_size, self.batch_size, self.seed, self.rows = tokens, block_size, batch_size, seed, rows

    def __call__(self, step: int) -> Batch:
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)[self.rows]
        index = starts[:, None] + np.arange(self.block_size)
        return {
            "inputs": self.tokens[index],
            "targets": self.tokens[index + 1],
            "mask": np.ones(index.shape, np.float32),
        }


def lm_windows(
    tokens: np.ndarray,
    *,
    block_size: int,
    batch_size: int,
    seed: int,
    num_steps: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Random language-model windows, nanoGPT's `get_batch`: x = tokens[i:i+T], y = tokens[i+1:i+T+1].

    The B global starts of step s are drawn uniformly from [0, len(tokens) - T) by a generator seeded with
    (seed, s), so the iterator state is just the step. `num_steps=None` never ends.
    Batches: inputs [B,T] int32, targets [B,T] int32, mask [B,T] float32 (all ones).
    """
    tokens = _token_array(tokens, "tokens")
    block_size = _check_int("block_size", block_size, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_seed(seed)
    if len(tokens) <= block_size:
        raise DataError(f"tokens has {len(tokens)} ids; lm_windows needs more than block_size={block_size}")
    rows = _host_rows(batch_size, *_host(process_index, process_count))
    steps = sys.maxsize if num_steps is None else _check_int("num_steps", num_steps, 0)
    dataset = grain.MapDataset.range(steps).map(_WindowBatch(tokens, block_size, batch_size, seed, rows))
    return _iterate(dataset, read_options)


class _SequentialBatch:
    """Batch index -> consecutive windows of the token stream, the tail padded with mask 0."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, pad_id: int, rows: slice):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.pad_id, self.rows = pad_id, rows

    def __call__(self, index: int) -> Batch:
        t = self.block_size
        windows = (index * self.batch_size + np.arange(self.batch_size))[self.rows]
        inputs = np.full((len(windows), t), self.pad_id, np.int32)
        targets = np.full((len(windows), t), self.pad_id, np.int32)
        mask = np.zeros((len(windows), t), np.float32)
        num_targets = len(self.tokens) - 1
        for row, window in enumerate(windows):
            start = window * t
            valid = int(np.clip(num_targets - start, 0, t))
            inputs[row, :valid] = self.tokens[start : start + valid]
            targets[row, :valid] = self.tokens[start + 1 : start + 1 + valid]
            mask[row, :valid] = 1.0
        return {"inputs": inputs, "targets": targets, "mask": mask}


def lm_sequential(
    tokens: np.ndarray,
    *,
    block_size: int,
    batch_size: int,
    pad_id: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Every next-token target of `tokens` exactly once, for evaluation on a whole split.

    Window w holds inputs tokens[wT:(w+1)T] and their targets; windows are consecutive and do not overlap,
    the last one and the last batch are padded (pad_id, mask 0). Summed over all hosts and batches, `mask`
    adds up to len(tokens) - 1. Batches: inputs, targets [B,T] int32, mask [B,T] float32.
    """
    tokens = _token_array(tokens, "tokens")
    block_size = _check_int("block_size", block_size, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    pad_id = _check_int("pad_id", pad_id, 0)
    if len(tokens) < 2:
        raise DataError(f"tokens has {len(tokens)} ids; evaluation needs at least 2")
    rows = _host_rows(batch_size, *_host(process_index, process_count))
    num_windows = -(-(len(tokens) - 1) // block_size)
    num_batches = -(-num_windows // batch_size)
    dataset = grain.MapDataset.range(num_batches).map(_SequentialBatch(tokens, block_size, batch_size, pad_id, rows))
    return _iterate(dataset, read_options)


class _PackedBatch:
    """Grain's packed features -> flaxlm's keys; a short final batch gets empty rows (pad_id, segment 0)."""

    def __init__(self, rows: int, pad_id: int):
        self.rows, self.pad_id = rows, pad_id

    def __call__(self, batch: Batch) -> Batch:
        missing = self.rows - batch["inputs"].shape[0]

        def full(x: np.ndarray, fill: int) -> np.ndarray:
            x = x.astype(np.int32)
            return np.concatenate([x, np.full((missing, x.shape[1]), fill, np.int32)]) if missing else x

        segment_ids = full(batch["inputs_segment_ids"], 0)
        return {
            "inputs": full(batch["inputs"], self.pad_id),
            "targets": full(batch["targets"], self.pad_id),
            "segment_ids": segment_ids,
            "positions": full(batch["inputs_positions"], 0),
            "mask": (segment_ids > 0).astype(np.float32),
        }


def packed_lm(
    documents: Sequence[Sequence[int]],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    drop_remainder: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Documents packed into rows of `seq_len` next-token pairs with segment ids (no cross-document targets).

    Each document (with `bos_id` prepended and `eos_id` appended when given) is cut into chunks of at most
    seq_len + 1 tokens; a chunk c contributes inputs c[:-1] and targets c[1:]. Chunks are shuffled per
    epoch (seeded), split between hosts, and packed first-fit into B rows at a time by Grain's
    `FirstFitPackIterDataset`. `num_epochs=None` repeats forever; with a finite number of epochs the
    last batch is dropped (`drop_remainder`) or completed with empty rows (mask 0).
    Batches: inputs, targets, segment_ids (1, 2, ... per document in the row, 0 = padding), positions
    (0-based within each document) [B,T] int32; mask [B,T] float32 = segment_ids > 0.
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_seed(seed)
    pad_id = _check_int("pad_id", pad_id, 0)
    if num_epochs is not None:
        num_epochs = _check_int("num_epochs", num_epochs, 1)
    prefix = np.asarray([] if bos_id is None else [_check_int("bos_id", bos_id, 0)], np.int32)
    suffix = np.asarray([] if eos_id is None else [_check_int("eos_id", eos_id, 0)], np.int32)
    index, count = _host(process_index, process_count)
    rows = _host_rows(batch_size, index, count)
    examples = []
    for i, document in enumerate(documents):
        ids = np.concatenate([prefix, _token_array(document, f"documents[{i}]"), suffix])
        for start in range(0, max(len(ids) - 1, 0), seq_len):
            chunk = ids[start : start + seq_len + 1]
            examples.append({"inputs": chunk[:-1], "targets": chunk[1:]})
    if len(examples) < count:
        raise DataError(
            f"packed_lm has {len(examples)} chunks of 2 or more tokens; need at least one per host ({count})"
        )
    dataset = grain.MapDataset.source(examples)
    if shuffle:
        dataset = dataset.shuffle(seed)
    dataset = dataset.slice(slice(index, None, count)).repeat(num_epochs)
    per_host = rows.stop - rows.start
    packed = grain.experimental.FirstFitPackIterDataset(
        dataset.to_iter_dataset(read_options or default_read_options()),
        length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=per_host,
        seed=seed,
        shuffle_bins=shuffle,
        padding_struct={"inputs": pad_id, "targets": pad_id},
    )
    return _iterate(packed.batch(per_host, drop_remainder=drop_remainder).map(_PackedBatch(per_host, pad_id)), None)


class _BucketPlan:
    """Which examples form each batch of an epoch; a pure function of (seed, epoch).

    Per epoch: examples are permuted (when shuffling), grouped by bucket in that order, cut into global
    batches of `batch_size`, and the batches permuted (or, without shuffling, ordered by first example).
    The number of batches per epoch does not depend on the seed.
    """

    def __init__(self, buckets: np.ndarray, num_buckets: int, batch_size: int, seed: int, shuffle: bool,
                 drop_remainder: bool):
        self.buckets, self.batch_size, self.seed = buckets, batch_size, seed
        self.shuffle, self.drop_remainder, self.num_buckets = shuffle, drop_remainder, num_buckets
        counts = np.bincount(buckets, minlength=num_buckets)
        full, partial = counts // batch_size, (counts % batch_size) > 0
        self.batches_per_epoch = int(full.sum() + (0 if drop_remainder else partial.sum()))
        self._cached: dict[int, list[tuple[int, np.ndarray]]] = {}

    def epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(bucket, global example indices) of every batch of `epoch`; the latest two epochs are cached."""
        if epoch not in self._cached:
            plan = self._plan(epoch)
            self._cached = {e: p for e, p in self._cached.items() if e == epoch - 1} | {epoch: plan}
        return self._cached[epoch]

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(len(self.buckets)) if self.shuffle else np.arange(len(self.buckets))
        batches = []
        for bucket in range(self.num_buckets):
            members = order[self.buckets[order] == bucket]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_remainder:
                    batches.append((bucket, chunk))
        if self.shuffle:
            return [batches[i] for i in rng.permutation(len(batches))]
        return sorted(batches, key=lambda batch: int(batch[1][0]))


class _BucketBatch:
    """Batch index -> this host's rows of that global batch, padded to the bucket length."""

    def __init__(self, sequences: dict[str, list[np.ndarray]], scalars: dict[str, np.ndarray], plan: _BucketPlan,
                 boundaries: tuple[int, ...], pad_id: int, rows: slice):
        self.sequences, self.scalars, self.plan = sequences, scalars, plan
        self.boundaries, self.pad_id, self.rows = boundaries, pad_id, rows

    def __call__(self, index: int) -> Batch:
        epoch, position = divmod(index, self.plan.batches_per_epoch)
        bucket, chunk = self.plan.epoch(epoch)[position]
        length = self.boundaries[bucket]
        members = np.full(self.plan.batch_size, -1, np.int64)
        members[: len(chunk)] = chunk
        members = members[self.rows]
        batch = {}
        for key, values in self.sequences.items():
            tokens = np.full((len(members), length), self.pad_id, np.int32)
            lengths = np.zeros(len(members), np.int32)
            for row, member in enumerate(members):
                if member >= 0:
                    sequence = values[member]
                    tokens[row, : len(sequence)] = sequence
                    lengths[row] = len(sequence)
            batch[key] = tokens
            batch[f"{key}_lengths"] = lengths
        for key, values in self.scalars.items():
            batch[key] = np.where(members >= 0, values[np.maximum(members, 0)], 0).astype(np.int32)
        batch["weights"] = (members >= 0).astype(np.float32)
        return batch


def _check_boundaries(bucket_boundaries: Sequence[int]) -> tuple[int, ...]:
    try:
        boundaries = tuple(bucket_boundaries)
    except TypeError:
        raise DataError(f"bucket_boundaries must be a sequence of lengths, got {bucket_boundaries!r}") from None
    if not boundaries:
        raise DataError("bucket_boundaries must not be empty")
    for b in boundaries:
        _check_int("each bucket boundary", b, 1)
    if any(a >= b for a, b in zip(boundaries, boundaries[1:])):
        raise DataError(f"bucket_boundaries must be strictly increasing, got {list(boundaries)}")
    return tuple(int(b) for b in boundaries)


def _split_fields(examples: Sequence[Mapping[str, Any]]) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """Validate examples (same keys; 1-D int sequences or int scalars) and gather them per field."""
    if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Sequence) or len(examples) == 0:
        raise DataError("examples must be a non-empty sequence of dicts")
    first = examples[0]
    if not isinstance(first, Mapping) or not first:
        raise DataError(f"example 0 must be a non-empty dict of fields, got {type(first).__name__}")
    keys = list(first)
    sequence_keys = [k for k in keys if not isinstance(first[k], (int, np.integer))]
    if not sequence_keys:
        raise DataError("examples need at least one sequence field to bucket by")
    reserved = {"weights"} | {f"{k}_lengths" for k in sequence_keys}
    for k in keys:
        if not isinstance(k, str) or k in reserved:
            raise DataError(f"example field name {k!r} is not a string or clashes with an output key")
    sequences = {k: [] for k in sequence_keys}
    scalars = {k: [] for k in keys if k not in sequence_keys}
    for i, example in enumerate(examples):
        if not isinstance(example, Mapping) or set(example) != set(keys):
            got = sorted(map(str, example)) if isinstance(example, Mapping) else type(example).__name__
            raise DataError(f"example {i} must be a dict with fields {keys}, got {got}")
        for k in sequence_keys:
            sequences[k].append(_token_array(example[k], f"example {i} field {k!r}"))
        for k in scalars:
            value = example[k]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= _INT32_MAX:
                raise DataError(f"example {i} field {k!r} must be an integer in [0, 2**31), got {value!r}")
            scalars[k].append(int(value))
    return sequences, {k: np.asarray(v, np.int64) for k, v in scalars.items()}


def _bucketed_dataset(
    examples: Sequence[Mapping[str, Any]],
    *,
    bucket_boundaries: Sequence[int],
    batch_size: int,
    pad_id: int,
    seed: int,
    shuffle: bool,
    drop_remainder: bool,
    num_epochs: int | None,
    process_index: int | None,
    process_count: int | None,
) -> grain.MapDataset:
    boundaries = _check_boundaries(bucket_boundaries)
    batch_size = _check_int("batch_size", batch_size, 1)
    pad_id = _check_int("pad_id", pad_id, 0)
    seed = _check_seed(seed)
    if num_epochs is not None:
        num_epochs = _check_int("num_epochs", num_epochs, 1)
    rows = _host_rows(batch_size, *_host(process_index, process_count))
    sequences, scalars = _split_fields(examples)
    lengths = np.max([[len(s) for s in values] for values in sequences.values()], axis=0)
    longest = int(np.argmax(lengths))
    if lengths[longest] > boundaries[-1]:
        raise DataError(
            f"example {longest} has length {lengths[longest]} > the largest bucket boundary {boundaries[-1]}; "
            "truncate long examples (enforce_max_length) or add a larger bucket"
        )
    plan = _BucketPlan(
        np.searchsorted(boundaries, lengths, side="left"), len(boundaries), batch_size, seed, bool(shuffle),
        bool(drop_remainder),
    )
    if plan.batches_per_epoch == 0:
        raise DataError(
            f"no full batch: every bucket has fewer than batch_size={batch_size} of the {len(lengths)} examples "
            "and drop_remainder=True"
        )
    total = sys.maxsize if num_epochs is None else plan.batches_per_epoch * num_epochs
    return grain.MapDataset.range(total).map(_BucketBatch(sequences, scalars, plan, boundaries, pad_id, rows))


def bucketed_batches(
    examples: Sequence[Mapping[str, Any]],
    *,
    bucket_boundaries: Sequence[int],
    batch_size: int,
    pad_id: int,
    seed: int,
    shuffle: bool = True,
    drop_remainder: bool = False,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Variable-length examples in length buckets, each batch padded to its bucket boundary.

    `examples[i]` is a dict whose values are 1-D token id sequences (padded, with `k_lengths` added) or
    integer scalars (stacked); all examples have the same fields. An example's length is its longest
    sequence field; it goes to the smallest boundary >= that length (an example longer than the largest
    boundary is a DataError). Every epoch visits every example exactly once (reshuffled per epoch with
    `seed` when `shuffle`); `num_epochs=None` repeats forever. See the module docstring for keys, partial
    batches and hosts.
    """
    dataset = _bucketed_dataset(
        examples, bucket_boundaries=bucket_boundaries, batch_size=batch_size, pad_id=pad_id, seed=seed,
        shuffle=shuffle, drop_remainder=drop_remainder, num_epochs=num_epochs, process_index=process_index,
        process_count=process_count,
    )
    return _iterate(dataset, read_options)


def _classification_batch(batch: Batch) -> Batch:
    return {"tokens": batch["tokens"], "lengths": batch["tokens_lengths"], "labels": batch["labels"],
            "weights": batch["weights"]}


def classification_batches(
    token_ids: Sequence[Sequence[int]],
    labels: Sequence[int],
    *,
    bucket_boundaries: Sequence[int],
    batch_size: int,
    pad_id: int,
    seed: int,
    shuffle: bool = True,
    drop_remainder: bool = False,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Bucketed classification batches: tokens [B,T] int32, lengths [B] int32, labels [B] int32, weights [B] float32."""
    if len(token_ids) != len(labels):
        raise DataError(f"token_ids has {len(token_ids)} examples but labels has {len(labels)}")
    examples = [{"tokens": t, "labels": y} for t, y in zip(token_ids, labels)]
    dataset = _bucketed_dataset(
        examples, bucket_boundaries=bucket_boundaries, batch_size=batch_size, pad_id=pad_id, seed=seed,
        shuffle=shuffle, drop_remainder=drop_remainder, num_epochs=num_epochs, process_index=process_index,
        process_count=process_count,
    )
    return _iterate(dataset.map(_classification_batch), read_options)


def _translation_batch(batch: Batch) -> Batch:
    length = batch["tgt_out"].shape[1]
    tgt_lengths = batch["tgt_out_lengths"]
    return {
        "src": batch["src"],
        "src_lengths": batch["src_lengths"],
        "tgt_in": batch["tgt_in"],
        "tgt_out": batch["tgt_out"],
        "tgt_lengths": tgt_lengths,
        "tgt_mask": (np.arange(length)[None, :] < tgt_lengths[:, None]).astype(np.float32),
        "weights": batch["weights"],
    }


def translation_batches(
    src_ids: Sequence[Sequence[int]],
    tgt_ids: Sequence[Sequence[int]],
    *,
    bos_id: int,
    eos_id: int,
    bucket_boundaries: Sequence[int],
    batch_size: int,
    pad_id: int,
    seed: int,
    shuffle: bool = True,
    drop_remainder: bool = False,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Bucketed translation batches (teacher forcing): tgt_in = <bos> + y, tgt_out = y + <eos>.

    A pair's length is max(len(x), len(y) + 1); src and tgt are padded to the same bucket length T.
    Keys: src [B,T], src_lengths [B], tgt_in [B,T], tgt_out [B,T], tgt_lengths [B] (int32),
    tgt_mask [B,T] float32, weights [B] float32.
    """
    if len(src_ids) != len(tgt_ids):
        raise DataError(f"src_ids has {len(src_ids)} examples but tgt_ids has {len(tgt_ids)}")
    bos = _check_int("bos_id", bos_id, 0)
    eos = _check_int("eos_id", eos_id, 0)
    examples = []
    for i, (src, tgt) in enumerate(zip(src_ids, tgt_ids)):
        tgt = _token_array(tgt, f"tgt_ids[{i}]")
        examples.append({"src": src, "tgt_in": np.concatenate([[bos], tgt]), "tgt_out": np.concatenate([tgt, [eos]])})
    dataset = _bucketed_dataset(
        examples, bucket_boundaries=bucket_boundaries, batch_size=batch_size, pad_id=pad_id, seed=seed,
        shuffle=shuffle, drop_remainder=drop_remainder, num_epochs=num_epochs, process_index=process_index,
        process_count=process_count,
    )
    return _iterate(dataset.map(_translation_batch), read_options)
