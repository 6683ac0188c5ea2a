"""Library calls leave the process as they found it: `import jaxlm`, `jaxlm.save`, `jaxlm.load` and
`jaxlm.generate` add no logging filter or handler, no warnings filter, no hook, do not redirect stderr or file
descriptor 2, and leave sys.modules alone. The noise handling is the commands' (jaxlm.cli.run_cli;
tests/test_disk_full.py checks that they still print one line)."""

import json

from helpers import run_py

PROBE = r"""
import json, logging, os, sys, tempfile, threading, warnings
import flax.linen, jax, numpy, optax, orbax.checkpoint, safetensors, tiktoken  # jaxlm's dependencies: theirs to set up

def loggers():
    found = {"": logging.getLogger()}
    found.update((n, l) for n, l in logging.root.manager.loggerDict.items() if isinstance(l, logging.Logger))
    return {
        n: {"filters": [f"{type(f).__module__}.{type(f).__qualname__}" for f in l.filters],
            "handlers": [f"{type(h).__module__}.{type(h).__qualname__}" for h in l.handlers],
            "level": l.level, "disabled": l.disabled, "propagate": l.propagate}
        for n, l in found.items()
    }

def state():
    st = os.fstat(2)
    return {
        "loggers": loggers(),
        "warnings": [repr(f) for f in warnings.filters],
        "hooks": [repr(sys.unraisablehook), repr(sys.excepthook), repr(threading.excepthook)],
        "stderr": [id(sys.stderr), st.st_dev, st.st_ino],
        "none_modules": sorted(k for k, v in sys.modules.items() if v is None and "jaxlm" in k or k == "torch"),
    }

snapshots = {"before": state()}
import jaxlm
snapshots["import"] = state()
config = jaxlm.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=64)
params = jaxlm.init_params(config, jax.random.key(0))
path = os.path.join(tempfile.mkdtemp(), "ck")
jaxlm.save(path, config, params, jaxlm.CharTokenizer("abc"))
snapshots["save"] = state()
config, params = jaxlm.load(path)
snapshots["load"] = state()
jaxlm.generate(params, config, [[1, 2, 3]], max_new_tokens=3)
snapshots["generate"] = state()
print(json.dumps(snapshots))
"""


def test_import_save_load_generate_leave_the_process_as_they_found_it(tmp_path):
    r = run_py("-c", PROBE, env={"JAXLM_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    snaps = json.loads(r.stdout.strip().splitlines()[-1])
    before = snaps.pop("before")
    for after_what, st in snaps.items():
        for key in ("warnings", "hooks", "stderr", "none_modules"):
            assert st[key] == before[key], (after_what, key)
        for name, logger in st["loggers"].items():
            assert not any("jaxlm" in x for x in logger["filters"] + logger["handlers"]), (after_what, name, logger)
            if name in before["loggers"]:
                assert logger == before["loggers"][name], (after_what, name)


def test_the_commands_install_their_noise_handling_and_the_library_does_not(tmp_path):
    """run_cli drops the records that only repeat a reported failure (a full disk, a requested stop); importing
    jaxlm alone does not (checked in a fresh process, where no earlier test ran a command)."""
    code = (
        "import logging, sys, jaxlm; from jaxlm.cli import run_cli;"
        "names = ('absl', 'asyncio', 'jax._src.callback');"
        "before = [len(logging.getLogger(n).filters) for n in names];"
        "run_cli(lambda argv: 0, []);"
        "print(before, [len(logging.getLogger(n).filters) for n in names])"
    )
    r = run_py("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[0, 0, 0] [1, 1, 1]"
