"""Losses as pure functions of arrays: cross-entropy (hard and soft targets), MSE, L1/L2 penalties.

Every loss computes in float32 whatever the logits' dtype. Training losses return SUMS together with the
number of real tokens/examples (see `sequence_cross_entropy`): the train step divides the summed loss by
the summed count over micro-batches and devices, so the mean is over real tokens, never over padding.

Axis letters: B batch, T length, V vocabulary / classes.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

PathMask = Callable[[tuple[str, ...], jax.Array], bool]


def _log_softmax_parts(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Float32 logits and their log-sum-exp over the last axis."""
    logits = logits.astype(jnp.float32)
    return logits, jax.nn.logsumexp(logits, axis=-1)


def _apply_weights(loss: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Multiply by weights; positions with weight 0 give exactly 0 even when `loss` is not finite there."""
    if weights is None:
        return loss
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != loss.shape:
        raise ValueError(f"weights shape {weights.shape} must equal the per-example loss shape {loss.shape}")
    return jnp.where(weights == 0, 0.0, weights * loss)


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Per-example cross-entropy of integer labels: logits [..., V], labels [...] -> loss [...] (float32).

    With `label_smoothing` e the target is (1 - e) * one_hot(label) + e / V, as in PyTorch.
    `weights` [...] scales each example; weight 0 marks padding (use it where PyTorch uses `ignore_index`).
    A label outside [0, V) at a position with non-zero weight gives NaN (never a silent clamp), so a
    training step reports it as a non-finite loss.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} must equal logits shape {logits.shape} without its last axis")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integers, got dtype {labels.dtype}; use soft_target_cross_entropy for probabilities"
        )
    num_classes = logits.shape[-1]
    logits, lse = _log_softmax_parts(logits)
    in_range = (labels >= 0) & (labels < num_classes)
    safe_labels = jnp.where(in_range, labels, 0)
    label_logit = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    loss = lse - label_logit
    if label_smoothing:
        uniform = lse - jnp.mean(logits, axis=-1)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * uniform
    loss = jnp.where(in_range, loss, jnp.nan)
    return _apply_weights(loss, weights)


def soft_target_cross_entropy(
    logits: jax.Array,
    target_probs: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Per-example cross-entropy against a target distribution: logits [..., V], target_probs [..., V] -> [...].

    Equals -sum_v target_probs[v] * log_softmax(logits)[v]; `weights` [...] scales each example.
    """
    if target_probs.shape != logits.shape:
        raise ValueError(f"target_probs shape {target_probs.shape} must equal logits shape {logits.shape}")
    logits, lse = _log_softmax_parts(logits)
    log_probs = logits - lse[..., None]
    loss = -jnp.sum(target_probs.astype(jnp.float32) * log_probs, axis=-1)
    return _apply_weights(loss, weights)


def sequence_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the real-token count: logits [B, T, V], targets [B, T], mask [B, T].

    Returns (loss_sum, token_count), both float32 scalars; mean loss = loss_sum / token_count. `mask` is
    True (or 1) on real tokens; None counts every position. Padding never enters the sum nor the count,
    so batches with different amounts of padding combine exactly by adding sums and counts.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {logits.shape}")
    weights = jnp.ones(targets.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    if weights.shape != targets.shape:
        raise ValueError(f"mask shape {weights.shape} must equal targets shape {targets.shape}")
    losses = softmax_cross_entropy(logits, targets, weights=weights, label_smoothing=label_smoothing)
    return jnp.sum(losses), jnp.sum(weights)


def mse(predictions: jax.Array, targets: jax.Array, *, weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error (float32 scalar) over all elements, or the weighted mean with `weights`.

    `weights` broadcasts against predictions; the mean divides by the summed broadcast weights.
    """
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions shape {predictions.shape} must equal targets shape {targets.shape}")
    squared = jnp.square(predictions.astype(jnp.float32) - targets.astype(jnp.float32))
    if weights is None:
        return jnp.mean(squared)
    weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), squared.shape)
    return jnp.sum(weights * squared) / jnp.sum(weights)


def path_names(path: tuple) -> tuple[str, ...]:
    """A jax key path as plain strings, e.g. ('layers', '0', 'mlp', 'kernel', 'value')."""
    return tuple(jax.tree_util.keystr((entry,), simple=True) for entry in path)


def is_kernel(names: tuple[str, ...], leaf: jax.Array) -> bool:
    """Default penalty subset: leaves whose path names a `kernel` (Flax's name for weight matrices)."""
    del leaf
    return "kernel" in names


def _penalty(tree, mask_fn: PathMask, term: Callable[[jax.Array], jax.Array]) -> jax.Array:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    terms = [jnp.sum(term(leaf.astype(jnp.float32))) for path, leaf in leaves if mask_fn(path_names(path), leaf)]
    return sum(terms, jnp.zeros((), jnp.float32))


def l2_penalty(tree, mask_fn: PathMask = is_kernel) -> jax.Array:
    """Sum of squares of the chosen leaves of any pytree (an NNX module, a State, a dict).

    `mask_fn(names, leaf) -> bool` picks leaves by their path names (see `path_names`); by default kernels
    only, so biases, norm scales and embeddings are not penalised. Add `0.5 * wd * l2_penalty(...)` to a
    loss for the gradient `wd * w` of classic coupled L2 decay.
    """
    return _penalty(tree, mask_fn, jnp.square)


def l1_penalty(tree, mask_fn: PathMask = is_kernel) -> jax.Array:
    """Sum of absolute values of the chosen leaves (kernels only by default); see `l2_penalty`."""
    return _penalty(tree, mask_fn, jnp.abs)
