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
from pathlib import Path

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rl_reason_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # Tiny models compile in well under the default 1 s threshold; cache them all.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Compiling is most of many tests' time (tests/test_engine.py: 99 s cold, 40 s with a warm
# cache), yet XLA_FLAGS=--xla_backend_optimization_level=0 does not pay here: it cut that
# test's compile time by a third, but the whole suite took 1,028 s against ~1,000 s (the long
# decode tests run slower) and three tolerance checks failed. Kept at XLA's default.


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


_NEEDS = pytest.StashKey[dict]()

# The README's test command runs two pytest-xdist workers, each taking whole files. Files that
# run for a minute or more go out first, so the short ones fill in around them at the end
# instead of one long file running alone while the other worker idles.
HEAVY_FIRST = (
    "test_multihost",
    "test_research_smoke",
    "test_resume",
    "test_recipes",
    "test_benchmarks_smoke",
    "test_sharding",
    "test_parity_gate",
    "test_r1_zero_smoke",
    "test_bad_input",
    "test_notebook",
    "test_checkpoint_sharded",
    "test_pretrained_sharded",
    "test_evaluate",
    "test_off_policy",
    "test_divergence",
)


# Files whose tests start code sandboxes and check that none is left over: `no_leftovers` sees
# every sandbox on the host, so they run as one unit on one worker, never beside each other.
SANDBOX_FILES = (
    "test_verifiers_code",
    "test_verifiers_pool",
    "test_verifiers_dataset_forms",
    "test_code_tasks",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class Scheduler(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "sandbox files" if Path(path).stem in SANDBOX_FILES else path

    return Scheduler(config, log)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):
        return  # one process: keep the files' own order

    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: tests keep their order inside a file


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    by_module: dict[str, list[str]] = {}
    for item in session.items:
        needs = getattr(getattr(item, "module", None), "multidevice_needs", None)
        if needs is not None and "multidevice" in getattr(item, "fixturenames", ()):
            callspec = getattr(item, "callspec", None)
            names = by_module.setdefault(item.module.__name__, [])
            names += [n for n in needs(callspec.params if callspec else {}) if n not in names]
    session.config.stash[_NEEDS] = by_module
    # Under pytest-xdist every worker collects every test but runs only some files: each
    # schedules a module's computations when that module first asks (see the fixture).
    if by_module and not hasattr(session.config, "workerinput"):
        _shared(session.config).schedule([n for names in by_module.values() for n in names])


def pytest_unconfigure(config):
    if _SHARED in config.stash:
        config.stash[_SHARED].close()


@pytest.fixture(scope="module")
def multidevice(request) -> SharedProcess:
    shared = _shared(request.config)
    shared.schedule(request.config.stash.get(_NEEDS, {}).get(request.module.__name__, []))
    return shared
