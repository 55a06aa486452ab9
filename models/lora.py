"""LoRA adapters on the attention (q, k, v, o) and MLP (gate, up, down) projections.

An adapted projection computes x W + (alpha / r) (x A) B: A [in..., r] starts Gaussian with
std 1/sqrt(fan_in), B [r, out...] starts at zero, so a freshly adapted model computes exactly
the base model. W + AB is never formed in the forward. A and B are `nnx.LoRAParam` variables
(a subclass of `nnx.Param`) named like their base weight's axes plus "lora_rank", so they shard
like it; they are attached to the module holding W as `<weight>_lora` (e.g. `attn.q_proj_lora`),
which `models.transformer._dense` picks up.

Training only the adapters, and the reference policy from the same weights:

    add_lora(model, LoRAConfig(rank=16, alpha=32), nnx.Rngs(0))
    graphdef, lora_state, base_state = nnx.split(model, nnx.LoRAParam, nnx.Param)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)
    policy = nnx.merge(graphdef, lora_state, base_state)
    reference = nnx.merge(graphdef, lora_off(lora_state), base_state)  # the base model

`lora_off` zeroes the adapters (x A 0 adds exactly zero), so the reference shares the base
arrays: no second copy of the model. `merge_lora(model)` folds the adapters into W for export.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from models.transformer import Transformer

# What LoRA may target: name -> (submodule of a Block, weight attribute, number of input axes).
TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("attn", "q_proj", 1),
    "k": ("attn", "k_proj", 1),
    "v": ("attn", "v_proj", 1),
    "o": ("attn", "o_proj", 2),
    "gate": ("mlp", "gate", 1),
    "up": ("mlp", "up", 1),
    "down": ("mlp", "down", 1),
}
# The variable type to train and checkpoint: `nnx.state(model, TRAINABLE)`.
TRAINABLE = nnx.LoRAParam
_PARAM_DTYPES = ("float32", "bfloat16", "float16")
_BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r and alpha (the update is scaled by alpha / r); `targets` from `TARGETS`."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS)
    dropout: float = 0.0
    param_dtype: str = "float32"  # adapters are small: keep them (and their updates) in f32

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRAConfig: rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig: alpha must be positive, got {self.alpha!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"LoRAConfig: targets must be distinct names from {list(TARGETS)}, got "
                f"{list(self.targets)}" + (f" (unknown {unknown})" if unknown else "")
            )
        if self.dropout != 0:
            # A random mask in the training forward makes the policy that is optimised differ
            # from the one that sampled, which biases GRPO's importance ratio.
            raise ValueError(
                f"LoRAConfig: dropout={self.dropout} is not supported (only 0): GRPO's "
                "importance ratio needs the training forward to be the sampling policy"
            )
        if self.param_dtype not in _PARAM_DTYPES:
            raise ValueError(f"LoRAConfig: param_dtype must be one of {_PARAM_DTYPES}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAAdapter(nnx.Module):
    """The low-rank term scale * (x A) B of one projection with `n_in` input axes."""

    def __init__(self, weight: nnx.Param, n_in: int, cfg: LoRAConfig, rngs: nnx.Rngs) -> None:
        shape, names = tuple(weight.shape), weight.get_metadata()["out_sharding"]
        fan_in = math.prod(shape[:n_in])
        dtype = jnp.dtype(cfg.param_dtype)
        a = jax.random.normal(rngs.params(), (*shape[:n_in], cfg.rank), dtype) / math.sqrt(fan_in)
        b = jnp.zeros((cfg.rank, *shape[n_in:]), dtype)
        a_names, b_names = (*names[:n_in], "lora_rank"), ("lora_rank", *names[n_in:])
        sharding = getattr(weight.get_value(), "sharding", None)
        if isinstance(sharding, NamedSharding):  # place each adapter like its base weight
            spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
            mesh = sharding.mesh
            a = jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec[:n_in], None)))
            b = jax.device_put(b, NamedSharding(mesh, PartitionSpec(None, *spec[n_in:])))
        self.a = nnx.LoRAParam(a, out_sharding=a_names, eager_sharding=False)
        self.b = nnx.LoRAParam(b, out_sharding=b_names, eager_sharding=False)
        self.n_in = n_in
        self.scale = cfg.scale

    def __call__(self, x: jax.Array, dt: Any) -> jax.Array:
        n = self.n_in
        in_axes = tuple(range(x.ndim - n, x.ndim))
        xa = jnp.tensordot(x, self.a[...].astype(dt), axes=(in_axes, tuple(range(n))))
        return jnp.tensordot(xa * jnp.asarray(self.scale, dt), self.b[...].astype(dt), axes=1)


def add_lora(model: Transformer, cfg: LoRAConfig, rngs: nnx.Rngs) -> Transformer:
    """Attaches adapters to `cfg.targets` in every layer, in place; returns `model`.

    The model then computes exactly what it did before (B = 0) until the adapters are trained.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"add_lora takes a models.Transformer, got {type(model).__name__}")
    if nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first")
    for block in model.layers:
        for target in cfg.targets:
            sub, weight, n_in = TARGETS[target]
            module = getattr(block, sub)
            adapter = LoRAAdapter(getattr(module, weight), n_in, cfg, rngs)
            setattr(module, weight + "_lora", adapter)
    return model


def lora_off(lora_state: nnx.State) -> nnx.State:
    """The adapter state with every adapter zeroed: merged back, the model is the base model.

    Zeros are cheap (adapter-sized) and inside jit XLA folds them away; the base weights are not
    touched or copied.
    """
    return jax.tree.map(jnp.zeros_like, lora_state)


def merge_lora(model: Transformer) -> Transformer:
    """A new plain Transformer with W + (alpha / r) A B folded in, in W's dtype and sharding.

    `model` is left as it is. Folding rounds to the param dtype, so a bfloat16 merge matches
    the adapted model only to bfloat16 precision.
    """
    merged = nnx.eval_shape(lambda: Transformer(model.cfg, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, _BASE)):
        _at(merged, path).set_value(var.get_value())
    for block, merged_block in zip(model.layers, merged.layers, strict=True):
        for sub, weight, _ in TARGETS.values():
            adapter = getattr(getattr(block, sub), weight + "_lora", None)
            if adapter is None:
                continue
            w = getattr(getattr(block, sub), weight).get_value()
            folded = _fold(w, adapter.a.get_value(), adapter.b.get_value(), adapter.scale)
            target = getattr(getattr(merged_block, sub), weight)
            target.set_value(jax.device_put(folded, w.sharding))
    return merged


def _at(model: Transformer, path) -> nnx.Variable:
    node: Any = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


@jax.jit
def _fold(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    delta = scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
    return (w.astype(jnp.float32) + delta).astype(w.dtype)
