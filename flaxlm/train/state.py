"""TrainState: everything a training run carries from step to step, as one pytree."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """Model, optimizer state, step counter, dropout key and skipped-step counter; `tx` is static.

    Fields (all pytree leaves except `tx`, so `jax.tree.map`, `jax.jit`, `jax.vmap` and checkpointing
    see the whole state and nothing hides in Python objects):

    - `model`: the NNX module itself (modules are pytrees). Its `nnx.Param` variables are trained; any
      other variables are carried through the step unchanged.
    - `opt_state`: Optax state for the Param variables, initialised on `nnx.state(model, nnx.Param)` (an
      `nnx.State` whose `Param` nodes keep their logical-axis metadata, so optimizer moments are sharded
      like the parameters they follow).
    - `step`: int32 scalar, the number of train steps taken (skipped ones included).
    - `rng`: PRNG key; each step splits it, using one half for dropout and keeping the other.
    - `skipped`: int32 scalar, how many steps were skipped for a non-finite loss or gradient.
    - `tx`: the `optax.GradientTransformation` (static metadata, not a leaf).
    """

    model: nnx.Module
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array
    skipped: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, rng: jax.Array | int) -> "TrainState":
        """A fresh state at step 0; `rng` is a PRNG key or an int seed for the dropout stream."""
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        return cls(
            model=model,
            opt_state=tx.init(nnx.state(model, nnx.Param)),
            step=jnp.zeros((), jnp.int32),
            rng=rng,
            skipped=jnp.zeros((), jnp.int32),
            tx=tx,
        )

    @property
    def params(self) -> nnx.State:
        """The trained parameters: `nnx.state(model, nnx.Param)`."""
        return nnx.state(self.model, nnx.Param)
