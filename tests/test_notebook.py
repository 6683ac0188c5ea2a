"""notebooks/colab_tpu.ipynb runs end to end on the CPU with tiny settings, so it cannot rot."""

import nbformat
from helpers import ROOT, cpu_devices, save_random_hf
from nbclient import NotebookClient

NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"


def _with_parameters(nb, **values):
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    for name, value in values.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{name} = ")]
        assert hits, f"parameter {name} missing from the notebook"
        lines[hits[0]] = f"{name} = {value!r}"
    cell.source = "\n".join(lines)
    return nb


def test_colab_notebook_runs_on_cpu(tmp_path, monkeypatch):
    hf_dir = tmp_path / "tiny-gpt2"
    save_random_hf(hf_dir, n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb = _with_parameters(
        nb,
        REPO_DIR=str(ROOT),
        INSTALL=False,
        MODEL=str(hf_dir),
        MAX_NEW_TOKENS=8,
        MAX_ITERS=4,
        BATCH_SIZE=4,
        BLOCK_SIZE=32,
        LEARNING_RATE=1e-3,
        EVAL_INTERVAL=2,
        DTYPE="float32",
    )
    # Four simulated devices stand in for the TPU cores; the run dir goes to tmp, not the repo.
    for name, value in cpu_devices(4).items():
        monkeypatch.setenv(name, value)
    nb.cells = [_redirect_outputs(c, tmp_path) for c in nb.cells]
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "4 cpu devices" in text
    assert "converted" in text and "final train loss" in text
    assert (tmp_path / "out-shakespeare" / "metrics.jsonl").is_file()


def _redirect_outputs(cell, tmp_path):
    # The notebook writes gpt2-jaxlm/ and out-shakespeare/ into the checkout; in the test, into tmp.
    if cell.cell_type == "code":
        for name in ("gpt2-jaxlm", "out-shakespeare"):
            cell.source = cell.source.replace(f'"{name}', f'"{tmp_path / name}')
    return cell
