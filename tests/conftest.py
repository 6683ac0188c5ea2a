"""The test session runs JAX on the CPU: libtpu (in the test extra, for tests/test_aot.py's TPU compiles) would
otherwise be probed by every JAX process, costing ~0.6 s and a screenful of warnings on a machine with no TPU.
Compiling for a TPU topology still works under it (libtpu is loaded when a topology is asked for). Subprocesses
inherit it through the environment."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
