"""Run by tests/test_sharding.py in a subprocess with simulated CPU devices (XLA_FLAGS).

    python tests/sharded_train.py OUT_ROOT MESH [MESH ...]

For each mesh ("single" = no mesh flag; "lora:MESH" = LoRA r=4 on c_attn,c_proj,c_fc of a fixed random
base, the adapters then being the "shards" reported; "permuted:MESH" = MESH over a shuffled device order, with
--peak-flops 1e12 and each train row's "rows" {"tokens_per_s", "mfu"}), trains the same tiny model STEPS (6) steps
into OUT_ROOT/<mesh>, and prints one JSON line: {mesh: {"losses": [...], "shards": {param: shard shape}, ...}}.
Then: the first mesh's run is restored onto every other mesh (params saved to OUT_ROOT/restored-<mesh>.npz,
with their shard shapes), and a run of 3 steps on the first mesh is resumed to 6 on the last ("resumed").
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

import jaxlm.train as trainer
from jaxlm.config import GPTConfig, TrainConfig
from jaxlm.parallel import sharding

STEPS = 6
TINY = dict(
    n_layer=2,
    n_head=4,
    n_embd=64,
    block_size=32,
    batch_size=8,
    max_iters=STEPS,
    warmup_iters=2,
    lr_decay_iters=STEPS,
    learning_rate=1e-3,
    log_interval=1,
    eval_interval=STEPS,
    eval_iters=1,
    tensorboard=False,
    dataset="shakespeare_char",
)


def config_for(out: Path, mesh: str | None, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(out), "mesh": mesh, **overrides})


def lora_config_for(root: Path, out: Path, mesh: str | None) -> TrainConfig:
    """A LoRA run on a random base saved once per process (the same weights in every process: seed 0)."""
    base = root / "lora-base"
    if not base.exists():
        import jaxlm

        config = GPTConfig(vocab_size=65, **{k: TINY[k] for k in ("n_layer", "n_head", "n_embd", "block_size")})
        jaxlm.save(base, config, jax.jit(jaxlm.init_params, static_argnums=0)(config, jax.random.key(0)))
    lora = dict(lora_rank=4, lora_alpha=8.0, lora_targets="c_attn,c_proj,c_fc", learning_rate=1e-2)
    return config_for(out, mesh, init_from=str(base), **lora)


def losses(out: Path) -> list[float]:
    rows = trainer.read_metrics(out / "metrics.jsonl")
    return [r["loss"] for r in sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])]


def main():
    root, meshes = Path(sys.argv[1]), sys.argv[2:]
    report = {"devices": jax.device_count()}
    for mesh in meshes:
        is_lora, permuted = mesh.startswith("lora:"), mesh.startswith("permuted:")
        plain = mesh.removeprefix("lora:").removeprefix("permuted:")
        spec = None if plain == "single" else plain
        out = root / _name(mesh)
        cfg = lora_config_for(root, out, spec) if is_lora else config_for(out, spec)
        m = None
        if permuted:  # the mesh's device order shuffled: each device holds other rows, the same math
            order = np.random.default_rng(0).permutation(jax.device_count())
            m = sharding.make_mesh(spec, devices=[jax.devices()[i] for i in order])
            cfg = config_for(out, spec, peak_flops=1e12)
        s = trainer.setup(cfg, log=lambda *a, **k: None, mesh=m)
        with sharding.activate(s.mesh):
            state = s.init_state()
        shards = sharding.shard_summary(state["params"])
        opt_shards = {
            k: v for k, v in sharding.shard_summary(state["opt_state"]).items() if k.endswith(("c_fc/kernel", "lora_b"))
        }
        del s, state
        trainer.train(cfg, log=lambda *a, **k: None, mesh=m)
        report[mesh] = {"losses": losses(out), "shards": shards, "opt_shards": opt_shards, "out": str(out)}
        if permuted:
            rows = trainer.read_metrics(out / "metrics.jsonl")
            report[mesh]["rows"] = [{k: r[k] for k in ("tokens_per_s", "mfu")} for r in rows if "loss" in r]
            report[mesh]["order"] = [int(i) for i in order]
    meshes = [m for m in meshes if not m.startswith(("lora:", "permuted:"))]  # restores and resume: plain runs
    first, last = meshes[0], meshes[-1]
    saved = Path(report[first]["out"])
    for mesh in meshes[1:]:
        m = sharding.make_mesh(None if mesh == "single" else mesh)
        config, params, _ = trainer.load_run(saved, shardings=None)
        config, params, _ = trainer.load_run(saved, shardings=sharding.param_shardings(config, m))
        report[f"restored-{mesh}"] = sharding.shard_summary(params)
        flat = {k: np.asarray(v) for k, v in _flatten(params).items()}
        np.savez(root / f"restored-{_name(mesh)}.npz", **flat)
    out = root / "resumed"
    trainer.train(config_for(out, None if first == "single" else first, max_iters=STEPS // 2), log=lambda *a, **k: None)
    cfg = config_for(out, None if last == "single" else last, init_from="resume", max_iters=STEPS)
    trainer.train(cfg, explicit=frozenset({"init_from", "max_iters", "mesh"}), log=lambda *a, **k: None)
    report["resumed"] = {"losses": losses(out)}
    print("RESULT " + json.dumps(report))


def _name(mesh: str) -> str:
    return mesh.replace(",", "_").replace("=", "").replace(":", "-")


def _flatten(params) -> dict:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(params)
    }


if __name__ == "__main__":
    main()
