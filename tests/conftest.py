"""One persistent XLA compilation cache for the whole test session, subprocesses included.

Many tests start fresh Python processes (resume after SIGKILL, two-process JAX, the experiment
entry points, the notebook) that compile the same small programs again; on two CPU cores the
compiles are most of their time. A cache hit returns the same executable a compile would, so
results are unchanged (a smoke run of the default experiment with a cold and with a warm
cache gave bitwise equal metrics and final params). The
variables are set before anything imports jax and are inherited by every subprocess; a cache
directory the caller set already is kept.
"""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rl_reason_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # Tiny models compile in well under the default 1 s threshold; cache them all.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
