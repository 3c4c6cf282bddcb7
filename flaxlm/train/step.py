"""Jitted train and eval steps for any NNX module and loss function, on one device or a mesh.

The user's loss function has the signature

    loss_fn(model, batch, dropout_key) -> (loss_sum, aux)

where `loss_sum` is a float scalar SUM over the batch's real tokens/examples and `aux` is a dict with at
least `weight` (their count) and optionally `correct` (the number of correct predictions); any other
entries must also be sums and are reported as metrics. `dropout_key` is None in evaluation. Returning
sums with counts is what makes gradient accumulation and data parallelism exact: the step adds sums and
counts over micro-batches and devices and divides once, so the loss is a mean over real tokens whatever
the padding in each part.

`train_step(state, batch) -> (state, metrics)` with metrics (float32 scalars):
    loss      mean loss over the real tokens of the global batch
    accuracy  correct / weight (only when aux has `correct`)
    grad_norm global norm of the mean gradient, before clipping
    lr        learning rate used by this update (`learning_rate` in the optimizer state; NaN if absent; a
              skipped step reports the state's unchanged value)
    tokens    total weight (real tokens/examples) of the global batch
    nonfinite 1.0 if the loss or the gradient was NaN/inf, else 0.0
    skipped   number of steps skipped so far for non-finite values

Non-finite policy (`nonfinite`):
    'skip'   the parameters and optimizer state stay exactly as they were (bit-equal), `skipped` grows.
             The step counter and RNG still advance: `state.step` counts batches consumed, so data
             position and step number stay in lockstep; the optimizer's own count (and so the schedule)
             does not advance. The update runs under `lax.cond`, not as `where(finite, new, old)`: with
             the select, XLA copies every donated optimizer moment before updating it in place (both
             the moment's and the parameter's update read the old moment), which doubled the
             optimizer's time on the BiLSTM benchmark.
    'raise'  as 'skip' inside the jitted step, then the Python wrapper checks `nonfinite` on the host
             (a device sync every step) and raises FloatingPointError naming the step number.
    'ignore' the update is applied whatever it is; `nonfinite` still reports it.

Sharding: with `mesh`, the step is `jax.jit` with explicit in_shardings/out_shardings derived from the
state's parameter metadata (`flaxlm.train.sharding.state_shardings`, built once per state structure)
and the batch split over the batch mesh axes; place the state with `shard_state` first. With
`axis_name`, the same body psums gradients, loss and counts over that axis: with a mesh it runs under
`jax.shard_map` (pure data parallelism, state replicated, batch split over `axis_name`); without a mesh
the returned jitted function is meant to be called inside the caller's `jax.pmap`/`jax.shard_map`.

Gradient accumulation (`grad_accum_steps=k`): row i of the batch goes to micro-batch i % k (strided, so
each device keeps its rows), the k micro-batches run in a `lax.scan` and their sums are added.
Mixed precision (`compute_dtype=jnp.bfloat16`): float parameters are cast for the forward/backward pass
while the float32 master copy is what the optimizer updates; losses stay float32.
Matmul library on XLA:CPU (`dot_backend='xla'|'eigen'|'onednn'`): see `flaxlm.train.dot_backend`.
"""

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxlm.ops.losses import path_names
from flaxlm.train.dot_backend import check_dot_backend, compiler_options
from flaxlm.train.sharding import DEFAULT_RULES, Rules, batch_axes, batch_sharding, state_shardings
from flaxlm.train.state import TrainState

NONFINITE_MODES = ("skip", "raise", "ignore")

LossFn = Callable[[nnx.Module, object, jax.Array | None], tuple[jax.Array, Mapping[str, jax.Array]]]


def _cast_floats(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _checked_loss(loss_fn: LossFn, model, batch, key) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Call the user's loss_fn and check its (loss_sum, aux) contract; values as float32."""
    out = loss_fn(model, batch, key)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping) and "weight" in out[1]):
        raise TypeError("loss_fn must return (loss_sum, aux) with aux a dict holding at least 'weight'")
    loss_sum, aux = out
    if jnp.shape(loss_sum) != ():
        raise ValueError(f"loss_fn must return a scalar loss SUM, got shape {jnp.shape(loss_sum)}")
    for name, value in aux.items():
        if jnp.shape(value) != ():
            raise ValueError(f"loss_fn aux[{name!r}] must be a scalar sum, got shape {jnp.shape(value)}")
    return jnp.asarray(loss_sum, jnp.float32), {name: jnp.asarray(v, jnp.float32) for name, v in aux.items()}


def _micro_batches(batch, k: int):
    """[B, ...] leaves -> [k, B // k, ...]; micro-batch j holds rows j, j + k, j + 2k, ..."""

    def split(path, x):
        if x.ndim == 0 or x.shape[0] % k:
            where = "/".join(path_names(path)) or "batch"
            raise ValueError(
                f"batch leaf {where!r} of shape {x.shape}: leading axis not divisible by grad_accum_steps={k}"
            )
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree_util.tree_map_with_path(split, batch)


def _to_varying(tree, axis_name):
    """Mark values as device-varying so that jax.grad returns local gradients that we psum explicitly."""
    if axis_name is None:
        return tree
    return jax.lax.pcast(tree, axis_name, to="varying")


def _is_array(path, value) -> bool:
    del path
    return hasattr(value, "dtype")


def _metrics(loss_sum, sums) -> dict[str, jax.Array]:
    weight = sums["weight"]
    denom = jnp.where(weight > 0, weight, 1.0)
    metrics = {"loss": loss_sum / denom, "tokens": weight}
    if "correct" in sums:
        metrics["accuracy"] = sums["correct"] / denom
    metrics.update({name: value for name, value in sums.items() if name not in ("weight", "correct")})
    return metrics


def _train_body(loss_fn, grad_accum_steps, compute_dtype, nonfinite, axis_name, micro_sharding):
    def loss_of(params, graphdef, rest, batch, key):
        model = nnx.merge(graphdef, _cast_floats(params, compute_dtype), rest)
        return _checked_loss(loss_fn, model, batch, key)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def gradient_sums(params, graphdef, rest, batch, key):
        """(loss_sum, aux sums, gradient sums) over the local batch, accumulating micro-batches."""
        local = _to_varying(params, axis_name)
        if grad_accum_steps == 1:
            (loss_sum, sums), grads = grad_fn(local, graphdef, rest, batch, key)
            return loss_sum, sums, grads
        micro = _micro_batches(batch, grad_accum_steps)
        if micro_sharding is not None:
            micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
        keys = jax.random.split(key, grad_accum_steps)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, local, graphdef, rest, first, keys[0])
        zeros = _to_varying(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), axis_name)

        def accumulate(total, xs):
            part = grad_fn(local, graphdef, rest, *xs)
            return jax.tree.map(jnp.add, total, part), None

        ((loss_sum, sums), grads), _ = jax.lax.scan(accumulate, zeros, (micro, keys))
        return loss_sum, sums, grads

    def train_step(state: TrainState, batch):
        key, next_rng = jax.random.split(state.rng)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        graphdef, params, rest = nnx.split(state.model, nnx.Param, ...)
        loss_sum, sums, grads = gradient_sums(params, graphdef, rest, batch, key)
        if axis_name is not None:
            loss_sum, sums, grads = jax.lax.psum((loss_sum, sums, grads), axis_name)
        weight = sums["weight"]
        with jax.named_scope("optimizer"):  # profiles (benchmarks/profile_step.py) attribute time by this scope
            grads = jax.tree.map(lambda g: g / jnp.where(weight > 0, weight, 1.0), grads)
            grad_norm = optax.tree.norm(grads)
            metrics = _metrics(loss_sum, sums)
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

            def update(operands):
                params, opt_state = operands
                updates, opt_state = state.tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            skipped = state.skipped
            if nonfinite == "ignore":
                new_params, opt_state = update((params, state.opt_state))
            else:
                new_params, opt_state = jax.lax.cond(finite, update, lambda operands: operands,
                                                     (params, state.opt_state))
                skipped = skipped + (~finite).astype(skipped.dtype)
            lr = optax.tree_utils.tree_get(opt_state, "learning_rate", jnp.nan, filtering=_is_array)
        metrics.update(
            grad_norm=grad_norm,
            lr=jnp.asarray(lr, jnp.float32),
            nonfinite=(~finite).astype(jnp.float32),
            skipped=skipped.astype(jnp.float32),
        )
        new_state = state.replace(
            model=nnx.merge(graphdef, new_params, rest),
            opt_state=opt_state,
            step=state.step + 1,
            rng=next_rng,
            skipped=skipped,
        )
        return new_state, metrics

    return train_step


class _JitOverLeaves:
    """`fn(tree, batch)` jitted over the flat leaves of `tree`; one jitted function per tree structure.

    The tree (a TrainState or a model: nnx Modules) is flattened here once per call and the jitted function
    takes and returns leaves. Given the tree itself, jax.jit flattens it again after the structure lookup (nnx's
    Python callbacks): a call returned after 1.59 instead of 1.34 ms on the nanoGPT CPU config (median of 100,
    same process). `shardings(tree)` -> (the tree's shardings, as a tree or one prefix sharding; the
    batch's; the metrics') is called once per structure, which fixes the shardings exactly as often as jax.jit
    alone would retrace: a state's shardings depend on its parameters' metadata, part of its tree structure.
    With `with_state_out`, fn returns (tree of the same structure, metrics), else metrics.
    """

    def __init__(self, fn, *, donate: bool, with_state_out: bool, shardings: Callable | None = None,
                 options: dict | None = None):
        self._fn = fn
        self._options = options
        self._donate = (0,) if donate else ()
        self._with_state_out = with_state_out
        self._shardings = shardings
        self._jitted = {}

    def _jit(self, treedef, tree):
        out_treedefs = []

        def over_leaves(leaves, batch):
            out = self._fn(jax.tree.unflatten(treedef, leaves), batch)
            if not self._with_state_out:
                return out
            state, metrics = out
            state_leaves, out_treedef = jax.tree.flatten(state)
            out_treedefs.append(out_treedef)
            return state_leaves, metrics

        if self._shardings is None:
            return jax.jit(over_leaves, donate_argnums=self._donate, compiler_options=self._options), out_treedefs
        tree_sharding, batch_sharding_, metrics_sharding = self._shardings(tree)
        if not isinstance(tree_sharding, jax.sharding.Sharding):
            tree_sharding = treedef.flatten_up_to(tree_sharding)
        out_shardings = (tree_sharding, metrics_sharding) if self._with_state_out else metrics_sharding
        jitted = jax.jit(over_leaves, in_shardings=(tree_sharding, batch_sharding_), out_shardings=out_shardings,
                         donate_argnums=self._donate, compiler_options=self._options)
        return jitted, out_treedefs

    def _get(self, tree):
        leaves, treedef = jax.tree.flatten(tree)
        if treedef not in self._jitted:
            self._jitted[treedef] = self._jit(treedef, tree)
        return leaves, self._jitted[treedef]

    def __call__(self, tree, batch):
        leaves, (jitted, out_treedefs) = self._get(tree)
        out = jitted(leaves, batch)
        if not self._with_state_out:
            return out
        state_leaves, metrics = out
        return jax.tree.unflatten(out_treedefs[-1], state_leaves), metrics

    def lower(self, tree, batch):
        """Lower for the given arguments (for inspecting the compiled program)."""
        leaves, (jitted, _) = self._get(tree)
        return jitted.lower(leaves, batch)


def _validate_dot_backend(dot_backend: str, axis_name, mesh: Mesh | None):
    check_dot_backend(dot_backend)
    if dot_backend != "xla" and axis_name is not None and mesh is None:
        raise ValueError(f"dot_backend={dot_backend!r} is a compile option of the top-level jit; with axis_name and no "
                         "mesh the step runs inside the caller's pmap/shard_map: pass mesh=, or give "
                         "flaxlm.train.dot_backend.compiler_options() to the caller's own jit")


def _validate_axis_name(axis_name, mesh: Mesh | None):
    if axis_name is None or mesh is None:
        return
    for axis in (axis_name,) if isinstance(axis_name, str) else axis_name:
        if axis not in mesh.axis_names:
            raise ValueError(f"axis_name {axis!r} is not a mesh axis {mesh.axis_names}")


def _compile(body, *, mesh, rules, axis_name, donate, with_state_out: bool, dot_backend: str):
    """jit `body(tree, batch)`: plain, sharded per structure, or shard_map'd over `axis_name`."""
    options = compiler_options(dot_backend, None if mesh is None else mesh.devices.flat)
    if mesh is None:
        return _JitOverLeaves(body, donate=donate, with_state_out=with_state_out, options=options)
    replicated = NamedSharding(mesh, PartitionSpec())
    if axis_name is not None:
        batch_spec = PartitionSpec(axis_name)
        out_specs = (PartitionSpec(), PartitionSpec()) if with_state_out else PartitionSpec()
        mapped = jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(), batch_spec), out_specs=out_specs)
        return _JitOverLeaves(mapped, donate=donate, with_state_out=with_state_out, options=options,
                              shardings=lambda tree: (replicated, NamedSharding(mesh, batch_spec), replicated))
    return _JitOverLeaves(body, donate=donate, with_state_out=with_state_out, options=options,
                          shardings=lambda tree: (state_shardings(tree, mesh, rules), batch_sharding(mesh, rules),
                                                  replicated))


def make_train_step(
    loss_fn: LossFn,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    grad_accum_steps: int = 1,
    compute_dtype=None,
    nonfinite: str = "skip",
    axis_name: str | tuple[str, ...] | None = None,
    donate: bool = True,
    dot_backend: str = "xla",
) -> Callable[[TrainState, object], tuple[TrainState, dict[str, jax.Array]]]:
    """Build `train_step(state, batch) -> (state, metrics)`; see the module docstring for the contract.

    The input state is donated (its buffers are reused for the output) unless `donate=False`: do not use
    a state after passing it in. A step built with a `dot_backend` other than 'xla' must be called at the top
    level, not inside the caller's own `jax.jit` (JAX takes compile options only there): give
    `flaxlm.train.dot_backend.compiler_options(name)` to that outer jit instead, as `make_ablation_step` does.
    `nonfinite='raise'` needs the result on the host, so it cannot be used with `axis_name` and no mesh (inside
    the caller's pmap/shard_map).
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    if nonfinite == "raise" and axis_name is not None and mesh is None:
        raise ValueError("nonfinite='raise' checks metrics on the host; it needs mesh= when axis_name is set")
    _validate_axis_name(axis_name, mesh)
    _validate_dot_backend(dot_backend, axis_name, mesh)
    micro_sharding = None
    if mesh is not None and axis_name is None and grad_accum_steps > 1:
        axes = batch_axes(rules, mesh)
        micro_sharding = NamedSharding(mesh, PartitionSpec(None, axes[0] if len(axes) == 1 else axes))
    body = _train_body(loss_fn, grad_accum_steps, compute_dtype, nonfinite, axis_name, micro_sharding)
    step = _compile(body, mesh=mesh, rules=rules, axis_name=axis_name, donate=donate, with_state_out=True,
                    dot_backend=dot_backend)
    if nonfinite != "raise":
        return step

    @functools.wraps(body)
    def train_step(state, batch):
        new_state, metrics = step(state, batch)
        if float(metrics["nonfinite"]):
            number = int(new_state.step) - 1
            raise FloatingPointError(
                f"non-finite loss or gradient at step {number} (loss={float(metrics['loss'])}, "
                f"grad_norm={float(metrics['grad_norm'])}); parameters were left unchanged"
            )
        return new_state, metrics

    return train_step


def make_eval_step(
    loss_fn: LossFn,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    compute_dtype=None,
    axis_name: str | tuple[str, ...] | None = None,
    dot_backend: str = "xla",
) -> Callable[[nnx.Module, object], dict[str, jax.Array]]:
    """Build `eval_step(model, batch) -> metrics`, calling `loss_fn(model, batch, None)` (no dropout).

    Metrics: `loss` and `accuracy` (when aux has `correct`) for this batch, plus the sums `loss_sum`,
    `tokens` and `correct` that add up exactly over an evaluation set: loss = sum(loss_sum) / sum(tokens).
    """
    _validate_axis_name(axis_name, mesh)
    _validate_dot_backend(dot_backend, axis_name, mesh)

    def eval_step(model, batch):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model = nnx.merge(graphdef, _cast_floats(params, compute_dtype), rest)
        loss_sum, sums = _checked_loss(loss_fn, model, batch, None)
        if axis_name is not None:
            loss_sum, sums = jax.lax.psum((loss_sum, sums), axis_name)
        metrics = _metrics(loss_sum, sums)
        metrics["loss_sum"] = loss_sum
        if "correct" in sums:
            metrics["correct"] = sums["correct"]
        return metrics

    return _compile(eval_step, mesh=mesh, rules=rules, axis_name=axis_name, donate=False, with_state_out=False,
                    dot_backend=dot_backend)
