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


# --- one shared process with 8 fake CPU devices ------------------------------------------------
#
# A test that requests the `multidevice` fixture (tests/multidevice/runner.py) reads the results of
# computations named by its module's multidevice_needs(the test's parameters). After collection
# one background process starts on just those that the selected tests need, in the order the
# tests come, so it computes while the tests before them run; a computation asked for but not
# named there is run on demand. It inherits the compilation cache variables set above.

import pytest  # noqa: E402

from tests.multidevice.runner import SharedProcess  # noqa: E402

_SHARED = pytest.StashKey[SharedProcess]()


def _shared(config) -> SharedProcess:
    if _SHARED not in config.stash:
        out = tempfile.mkdtemp(prefix="rl_reason_test_multidevice_")
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        config.stash[_SHARED] = SharedProcess(out)
    return config.stash[_SHARED]


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    names = []
    for item in session.items:
        needs = getattr(getattr(item, "module", None), "multidevice_needs", None)
        if needs is not None and "multidevice" in getattr(item, "fixturenames", ()):
            callspec = getattr(item, "callspec", None)
            names += [n for n in needs(callspec.params if callspec else {}) if n not in names]
    if names:
        _shared(session.config).schedule(names)


def pytest_unconfigure(config):
    if _SHARED in config.stash:
        config.stash[_SHARED].close()


@pytest.fixture(scope="session")
def multidevice(pytestconfig) -> SharedProcess:
    return _shared(pytestconfig)
