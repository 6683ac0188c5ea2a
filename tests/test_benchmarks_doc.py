"""docs/benchmarks.md is generated from bench/results/*.json and must stay in step with them; every bench
script that measures something writes a result (bench/record.py) and bench/run_all.py runs it. Nothing here
runs or times a benchmark."""

import importlib.util
import json
import re

import pytest
from helpers import ROOT, run_py

BENCH = ROOT / "bench"
MAKE = ROOT / "docs" / "make_benchmarks.py"
# An absolute path of some machine (a results file names none: see bench/record.py's _portable).
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|tmp|root|Users|opt|mnt)/")


def _module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make():
    return _module(MAKE)


@pytest.fixture(scope="module")
def record():
    return _module(BENCH / "record.py")


MACHINE = {"cpu": "Test CPU", "cpu_flags": ["avx2"], "cores": 2, "platform": "cpu", "device_kind": "cpu"}
MACHINE |= {"device_count": 1, "python": "3.11", "jax": "0.10.2", "jaxlib": "0.10.2"}
MACHINE |= {"matmul_f32_gflops": 100.0, "read_gbps": 20.0}


def test_benchmarks_doc_is_current():
    r = run_py(str(MAKE), "--check")
    assert r.returncode == 0, r.stderr


def test_every_bench_script_is_accounted_for(make):
    run_all = _module(BENCH / "run_all.py")
    run = {argv[0] for _, _, argv in run_all.RUNS}
    for path in sorted(BENCH.glob("*.py")):
        if path.name in make.HELPERS:
            continue
        src = path.read_text()
        hint = "add it to make_benchmarks.HELPERS if it measures nothing itself"
        assert "record.save(" in src, f"bench/{path.name} writes no result with record.save ({hint})"
        assert path.name in make.SCRIPTS, f"bench/{path.name}: give it a title in docs/make_benchmarks.py SCRIPTS"
        if path.name not in make.NOT_IN_RUN_ALL:
            assert path.name in run, f"bench/{path.name}: add its default command to bench/run_all.py RUNS"
    for name in [*make.SCRIPTS, *make.HELPERS]:
        assert (BENCH / name).is_file(), f"docs/make_benchmarks.py names bench/{name}, which does not exist"
    names = [name for name, _, _ in run_all.RUNS]
    assert len(names) == len(set(names)), "two RUNS write the same result"


def test_results_record_the_run(make):
    results = sorted((BENCH / "results").glob("*.json"))
    assert results, "bench/results/ is empty: run python bench/run_all.py"
    for path in results:
        text = path.read_text()
        r = json.loads(text)
        assert r["name"] == path.stem
        assert {"command", "date", "commit", "machine", "versions", "notes", "rows", "load_avg"} <= set(r), path.name
        assert make._script(r["command"]) in make.SCRIPTS, f"{path.name}: {r['command']}"
        m = r["machine"]
        assert {"cpu", "cpu_flags", "cores", "jax", "jaxlib", "matmul_f32_gflops", "read_gbps"} <= set(m), path.name
        assert m["matmul_f32_gflops"] > 0 and m["read_gbps"] > 0
        scalar = str | int | float | bool | type(None)
        assert r["rows"] and all(isinstance(v, scalar) for row in r["rows"] for v in row.values()), path.name
        assert not MACHINE_PATH.search(text), f"{path.name} names a path of the machine it ran on"


def test_a_result_renders_into_its_own_section(tmp_path, record, make):
    rows = [{"impl": "jaxlm", "tok_per_s": 56.5, "ok": True}, {"impl": "PyTorch", "tok_per_s": None}]
    argv = [str(BENCH / "bench_generate.py"), "--hf-flax-python", "/opt/peer/bin/python"]
    record.save("generate", rows, machine_info=MACHINE, notes="PyTorch: absent here.", argv=argv, results=tmp_path)
    saved = json.loads((tmp_path / "generate.json").read_text())
    assert saved["command"].endswith("python bench/bench_generate.py --hf-flax-python PATH")
    text = make.render(tmp_path)
    section = text[text.index("## Decode speed: `generate`") :]
    assert "- Command: `" in section and "bench/bench_generate.py --hf-flax-python PATH`" in section
    assert "Test CPU, 2 cores (flags: avx2)" in section and "100.0 GFLOP/s, read 20.0 GB/s" in section
    assert "| impl | tok_per_s | ok |" in section and "| jaxlm | 56.5 | yes |" in section
    assert "| PyTorch | - | - |" in section and "PyTorch: absent here." in section
    assert "No result yet:" in text and "`python bench/bench_train.py`" in text
    assert make.render(tmp_path) == text  # deterministic


def test_check_fails_on_a_stale_page(tmp_path, record):
    out = tmp_path / "benchmarks.md"
    args = ["--results", str(tmp_path), "--out", str(out)]
    record.save("eval_head", [{"form": "plain", "ms": 1.0}], machine_info=MACHINE, results=tmp_path, argv=["x.py"])
    assert run_py(str(MAKE), *args).returncode == 0
    assert run_py(str(MAKE), "--check", *args).returncode == 0
    record.save("eval_head", [{"form": "plain", "ms": 2.0}], machine_info=MACHINE, results=tmp_path, argv=["x.py"])
    r = run_py(str(MAKE), "--check", *args)
    assert r.returncode == 1
    assert r.stderr.strip() == "benchmarks.md is out of date: run python docs/make_benchmarks.py"


def test_record_refuses_rows_that_are_not_flat(tmp_path, record):
    with pytest.raises(ValueError, match="flat dicts"):
        record.save("x", [{"nested": {"a": 1}}], machine_info=MACHINE, results=tmp_path)
    with pytest.raises(ValueError, match="flat dicts"):
        record.save("x", [], machine_info=MACHINE, results=tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_command_names_the_environment_that_changes_results():
    code = "import record; print(record.command(['bench/x.py', '--data', '/elsewhere/data']))"
    r = run_py("-c", code, env={"JAXLM_NATIVE": "0", "PYTHONPATH": str(BENCH)})
    assert r.returncode == 0, r.stderr
    assert "JAXLM_NATIVE=0 " in r.stdout and r.stdout.strip().endswith("python bench/x.py --data PATH")
