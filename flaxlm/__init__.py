"""flaxlm: classic NLP model families in functional JAX/Flax NNX.

Importing flaxlm turns off Flax's eager variable sharding: parameters carry
logical axis names as metadata only, and `flaxlm.train.sharding` maps them to
mesh axes when a mesh is built. Models never mention devices.
"""

import flax

flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
