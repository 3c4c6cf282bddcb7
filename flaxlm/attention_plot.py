"""Attention maps of a trained run, drawn as PNG heatmaps with token labels (matplotlib, Agg backend).

- translate runs: cross-attention from each generated target token (rows, ending with </s>) to the source
  tokens (columns), for the greedy translation of the text. Transformer: one decoder layer (default the last),
  averaged over heads. Seq2Seq: its one attention (Luong or Bahdanau); attention='none' has no weights.
- classify runs with backbone 'transformer': one encoder layer's self-attention (default the last), averaged
  over heads, tokens x tokens. Other classifier backbones have no attention to show.

    amap = attention_map(run.task, model, "Ein Hund läuft.", layer=None)
    plot_attention(amap, "attention.png")
"""

import dataclasses
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.data.sources import enforce_max_length
from flaxlm.errors import FlaxlmError


@dataclasses.dataclass(frozen=True)
class AttentionMap:
    """weights [T, S] (row t: how query token t spreads its attention over the S key tokens), labels, title."""

    weights: np.ndarray
    rows: list[str]
    columns: list[str]
    title: str
    row_axis: str
    column_axis: str


def token_labels(tokenizer, ids) -> list[str]:
    """Readable axis labels: the text of each token id (specials as <s>, </s>, <unk>, <pad>; spaces as ␣)."""
    specials = {tokenizer.pad_id: "<pad>", tokenizer.unk_id: "<unk>", tokenizer.bos_id: "<s>",
                tokenizer.eos_id: "</s>"}
    labels = []
    for i in ids:
        if i in specials:
            labels.append(specials[i])
        else:
            labels.append(tokenizer.decode([i]).strip() or "␣")
    return labels


def _layer_index(layer: int | None, num_layers: int, what: str) -> int:
    if layer is None:
        return num_layers - 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise FlaxlmError(f"--layer {layer!r} is out of range: the model has {num_layers} {what} layers "
                          f"(0 to {num_layers - 1})")
    return layer


def _text_ids(tokenize, text: str, max_length: int) -> list[int]:
    if not text.strip():
        raise FlaxlmError("--text is empty")
    ids = tokenize(text)
    if not ids:
        raise FlaxlmError(f"--text {text!r} encodes to no tokens")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        return enforce_max_length([ids], max_length, policy="truncate", path="--text")[0]


def translation_attention(task, model, text: str, layer: int | None = None) -> AttentionMap:
    """Cross-attention [target tokens, source tokens] of the greedy translation of `text`."""
    cfg = model.cfg
    is_seq2seq = not hasattr(cfg, "num_decoder_layers")
    if is_seq2seq and cfg.attention == "none":
        raise FlaxlmError("this Seq2Seq run has model.attention='none': it has no attention weights to plot")
    if is_seq2seq and layer is not None:
        raise FlaxlmError("--layer applies to Transformer runs; a Seq2Seq model has one attention")
    tok = task.tokenizer
    src_ids = _text_ids(task.encode_source, text, task.max_length)
    out = task.generate(model, [src_ids])[0]
    rows = out + [tok.eos_id] if len(out) < task.output_limit(len(src_ids)) else out
    src = jnp.asarray([src_ids], jnp.int32)
    lengths = jnp.asarray([len(src_ids)], jnp.int32)
    tgt_in = jnp.asarray([[tok.bos_id] + rows[:-1]], jnp.int32)
    if is_seq2seq:
        _, weights = model(src, lengths, tgt_in, return_attention=True)
        weights, title = weights[0], f"Seq2Seq {cfg.attention} attention"
    else:
        index = _layer_index(layer, cfg.num_decoder_layers, "decoder")
        memory = model.encode(src, lengths)
        _, weights = model.decode(tgt_in, memory, lengths, return_attention=True)
        weights, title = weights[index, 0].mean(0), f"decoder layer {index} cross-attention (mean of heads)"
    return AttentionMap(np.asarray(weights, np.float32), token_labels(tok, rows), token_labels(tok, src_ids),
                        title, "generated target tokens", "source tokens")


def classifier_attention(task, model, text: str, layer: int | None = None) -> AttentionMap:
    """Self-attention [tokens, tokens] of one encoder layer of a 'transformer' TextClassifier on `text`."""
    cfg = model.cfg
    if cfg.backbone != "transformer":
        raise FlaxlmError(f"attention maps of classify runs need model.backbone='transformer', got {cfg.backbone!r}")
    index = _layer_index(layer, cfg.num_layers, "encoder")
    data = task.cfg.data
    ids = _text_ids(task.tokenizer.encode, text, min(data.max_length, data.bucket_boundaries[-1], cfg.max_length))
    tokens = jnp.asarray([ids], jnp.int32)
    x = model.embed(tokens) + model.positions(tokens.shape[1])
    for i in range(index + 1):
        block = jax.tree.map(lambda a, i=i: a[i], model.backbone.layers)
        _, weights = block.self_attn(block.self_attn_norm(x) if block.norm_first else x, return_weights=True)
        x = block(x)
    labels = token_labels(task.tokenizer, ids)
    return AttentionMap(np.asarray(weights[0].mean(0), np.float32), labels, labels,
                        f"encoder layer {index} self-attention (mean of heads)", "query tokens", "key tokens")


def attention_map(task, model, text: str, layer: int | None = None) -> AttentionMap:
    """The attention map of `text` for a translate run, or a classify run with a transformer backbone."""
    kind = task.cfg.task
    if kind == "translate":
        return translation_attention(task, model, text, layer)
    if kind == "classify":
        return classifier_attention(task, model, text, layer)
    raise FlaxlmError(f"attention maps are drawn for translate and classify runs, got task {kind!r}")


def plot_attention(amap: AttentionMap, path) -> None:
    """Write `amap` as a heatmap PNG at `path`, one labelled tick per token on each axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = amap.weights.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * n_cols + 2.5), max(3.0, 0.4 * n_rows + 2.0)))
    image = ax.imshow(amap.weights, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(n_cols), amap.columns, rotation=90)
    ax.set_yticks(range(n_rows), amap.rows)
    ax.set_xlabel(amap.column_axis)
    ax.set_ylabel(amap.row_axis)
    ax.set_title(amap.title, fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    try:
        fig.savefig(pathlib.Path(path), dpi=100, format="png")
    except OSError as e:
        raise FlaxlmError(f"{path}: cannot write the attention plot: {e.strerror or e}") from None
    finally:
        plt.close(fig)
