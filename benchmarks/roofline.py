"""The machine's limits, measured in the same run as the figure they bound.

    python -m benchmarks.roofline [--json=PATH] [--smoke]

* compute: FLOP/s of a large square matmul through XLA (float32 and bfloat16), the best a
  dense kernel reaches on this machine; the figures of the other benchmarks are also given as a
  fraction of it (MFU).
* memory: bytes/s of a reduction over an array far larger than the last-level cache (a pure
  read stream, the traffic of weights read once per decode step) and of an in-place update of
  one (read + write; the buffer is donated, so no fresh pages are faulted in).

A shared machine's load slows every figure; each is the best of `repeats` calls.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common


def _best_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    return min(common.time_calls(lambda: jax.block_until_ready(fn(*args)), repeats))


def matmul_flops_per_s(size: int = 2048, dtype: Any = jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a [size, size] x [size, size] matmul (2 size^3 FLOPs)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
    return 2 * size**3 / _best_seconds(mm, (a, b), repeats)


def torch_matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float | None:
    """The same float32 matmul through PyTorch (None without torch): what its kernels reach."""
    try:
        import torch
    except ImportError:
        return None
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    return 2 * size**3 / min(common.time_calls(lambda: torch.mm(a, b), repeats))


def read_bytes_per_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of summing a float32 array of `megabytes` (read once)."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    return megabytes * 2**20 / _best_seconds(jax.jit(jnp.sum), (x,), repeats)


def update_bytes_per_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s (read + write) of x + 1 in place on a float32 array of `megabytes`."""
    step = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = step(jnp.zeros((megabytes * 2**20 // 4,), jnp.float32))
    seconds = []
    for _ in range(repeats):
        holder = [x]

        def run(holder=holder):
            holder[0] = jax.block_until_ready(step(holder[0]))

        seconds += common.time_calls(run, 1)
        x = holder[0]
    return 2 * megabytes * 2**20 / min(seconds)


def measure(smoke: bool = False, repeats: int = 5) -> dict[str, Any]:
    """The roofline record every benchmark embeds: peak matmul FLOP/s and memory bytes/s."""
    size, megabytes = (256, 16) if smoke else (2048, 256)
    repeats = 2 if smoke else repeats
    f32 = matmul_flops_per_s(size, jnp.float32, repeats)
    bf16 = matmul_flops_per_s(size, jnp.bfloat16, repeats)
    record = {
        "matmul_size": size,
        "torch_matmul_f32_flops_per_s": torch_matmul_flops_per_s(size, repeats),
        "matmul_f32_flops_per_s": f32,
        "matmul_bf16_flops_per_s": bf16,
        "stream_megabytes": megabytes,
        "read_bytes_per_s": read_bytes_per_s(megabytes, repeats),
        "update_bytes_per_s": update_bytes_per_s(megabytes, repeats),
        "load_average_1_5_15": list(os.getloadavg()),
    }
    return record


def describe(record: dict[str, Any]) -> str:
    return (
        f"roofline: matmul {record['matmul_f32_flops_per_s'] / 1e9:.0f} GFLOP/s f32, "
        f"{record['matmul_bf16_flops_per_s'] / 1e9:.0f} bf16 ({record['matmul_size']}^2); "
        f"memory {record['read_bytes_per_s'] / 1e9:.1f} GB/s read, "
        f"{record['update_bytes_per_s'] / 1e9:.1f} GB/s read+write "
        f"({record['stream_megabytes']} MiB)"
    )


def bound_seconds(flops: float, bytes_moved: float, record: dict[str, Any], dtype: str) -> dict:
    """The least time `flops` and `bytes_moved` can take here: the larger of the two limits."""
    peak = record["matmul_bf16_flops_per_s" if dtype == "bfloat16" else "matmul_f32_flops_per_s"]
    compute, memory = flops / peak, bytes_moved / record["read_bytes_per_s"]
    return {
        "compute_s": compute,
        "memory_s": memory,
        "bound_s": max(compute, memory),
        "bound_by": "compute" if compute >= memory else "memory",
    }


def main(argv: list[str]) -> None:
    del argv
    flag_values = flags.FLAGS
    record = {
        "benchmark": "roofline",
        "roofline": measure(flag_values.smoke),
        "environment": common.environment(),
    }
    print(describe(record["roofline"]))
    if flag_values.json:
        common.write_json(flag_values.json, record)


if __name__ == "__main__":
    # Defined here, not at import: the other benchmarks import this module and define their own.
    flags.DEFINE_string("json", None, "Write the results to this JSON file.")
    flags.DEFINE_bool("smoke", False, "Tiny sizes: checks that the code runs.")
    app.run(main)
