"""bench/gpu.py --smoke: the GPU check's every part on the CPU at tiny sizes, so the command a GPU session runs
(docs/accelerators.md) works before it spends device time. The rows it prints are checked for what they claim."""

import json

from helpers import run_py


def test_gpu_check_smoke_runs_every_part():
    r = run_py("bench/gpu.py", "--smoke", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])["rows"]
    parts = [row["part"] for row in rows]
    assert parts.count("parity") == 2 and parts.count("train") == 2 and parts.count("nanogpt") == 1
    assert parts.count("decode") == 2 and not any("error" in row for row in rows)

    parity = {row["dtype"]: row for row in rows if row["part"] == "parity"}
    assert parity["float32"]["max_abs_logit_diff"] < 1e-4
    # bfloat16: jaxlm's error against PyTorch float32 is of the order of PyTorch's own bfloat16 error
    assert parity["bfloat16"]["max_abs_logit_diff"] < 4 * parity["bfloat16"]["torch_bf16_max_abs_logit_diff"] + 1e-3

    train = [row for row in rows if row["part"] == "train"]
    assert {(row["attention"], row["remat"]) for row in train} == {("reference", False), ("xla", True)}
    losses = [row["loss"] for row in train]  # one init, one batch: remat and the attention form change no math
    assert max(losses) - min(losses) < 0.02 and 9 < losses[0] < 12  # ~ln(50257) at init
    assert all(row["tokens_per_s"] > 0 and row["program_peak_gib"] > 0 for row in train)

    nanogpt = next(row for row in rows if row["part"] == "nanogpt")
    assert nanogpt["n_layer"] == 2 and nanogpt["block_size"] == 128 and 9 < nanogpt["loss"] < 12

    for row in (row for row in rows if row["part"] == "decode"):
        assert row["same_greedy_tokens"] == 1.0, row  # float32 greedy decoding: transformers' tokens exactly
        assert row["jaxlm_tokens_per_s"] > 0 and row["torch_tokens_per_s"] > 0
