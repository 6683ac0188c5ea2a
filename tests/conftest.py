"""The test session's JAX settings, set before anything imports JAX; subprocesses and xdist's workers (started
after this runs in the controlling process) inherit them through the environment.

- JAX runs on the CPU: libtpu (in the test extra, for tests/test_aot.py's TPU compiles) would otherwise be probed
  by every JAX process, costing ~0.6 s and a screenful of warnings on a machine with no TPU. Compiling for a TPU
  topology still works under it (libtpu is loaded when a topology is asked for).
- XLA:CPU compiles quickly rather than well (helpers.TEST_XLA_FLAGS; the subprocesses that choose a device count
  add them too): the tests' programs are tiny, and compiling them is most of the suite's CPU time. The
  benchmarks and every user's run keep XLA's defaults.
- One persistent compilation cache for the session, every program kept: the suite compiles the same tiny steps
  in many processes (each train.py run, each resume), and a program compiled once is then loaded, not compiled
  again. It starts empty, so a run tests nothing a previous run left behind; it is removed at the end.
- The longest test files run first (FIRST): xdist hands files to its two workers in collection order (with
  `--no-loadscope-reorder` in pyproject.toml; by default it orders them by their number of tests), and a long
  file started last leaves one worker idle while the other finishes it.
"""

import os
import shutil
import tempfile

from helpers import TEST_XLA_FLAGS

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jaxlm-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
else:
    _CACHE = None  # the caller's (or, in an xdist worker, the controlling process's)


# the files that take longest on a 2-core machine (`--junitxml` times, summed per file), longest first
FIRST = ["test_aot", "test_sharding", "test_multiprocess", "test_train", "test_eval", "test_faults",
         "test_train_library", "test_sft_train", "test_bench_gpu", "test_notebook", "test_serve"]  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(FIRST)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    if _CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_CACHE, ignore_errors=True)
