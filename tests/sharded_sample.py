"""Run by tests/test_sharded_sampling.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS).

    python tests/sharded_sample.py MESH[:sampled] [MESH[:sampled] ...]

Generates with one tiny random model on one device (the `jaxlm.generation.decode` path), then on each mesh
(`Generator(..., mesh=...)`): greedy on a batch of 4, and with ":sampled" also a seeded draw on a
batch of 3 (which data=2 does not divide). Prints one JSON line: "RESULT {...}" with the tokens of each, the
first device's shard shapes of some params and of the KV cache, and what streamed.
"""

import json
import sys

import jax
import numpy as np

import jaxlm
from jaxlm.generation.generator import EXECUTABLES, Generator
from jaxlm.parallel import sharding

# n_head 8 splits over tensor=8; vocab 100 splits over tensor 2 and 4 but stays whole for 8.
CONFIG = jaxlm.GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_head=8, n_embd=64)
PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79], [50]]
MAX_NEW = 20
SAMPLED = dict(do_sample=True, temperature=1.0, top_k=20, top_p=0.9, seed=3)


def random_params():
    def init(key):
        params = jaxlm.init_params(CONFIG, key)
        # std 0.5 instead of 0.02: random weights whose greedy text does not collapse into one token
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x * 25 if str(getattr(path[-1], "key", "")) in ("kernel", "embedding") else x, params
        )

    return jax.jit(init)(jax.random.key(0))


def with_eos(eos: int) -> list[list[int]]:
    return [*PROMPTS, [7, 21, eos]]  # one prompt ends at EOS


def pick_eos(one: Generator) -> int:
    """A token that greedy row 0 produces a few steps in (and not before): rows then stop at different steps.

    (The batch has the shapes of the one used next, so the executable compiled here is reused.)"""
    row = one(with_eos(0), max_new_tokens=MAX_NEW, temperature=0.0, eos_id=None)[0]
    return next(t for i, t in enumerate(row) if i >= 4 and t not in row[:i])


def main():
    meshes = sys.argv[1:]
    params = random_params()
    one = Generator(params, CONFIG)
    eos = pick_eos(one)
    prompts = with_eos(eos)
    report = {
        "devices": jax.device_count(),
        "eos": eos,
        "single": {
            "greedy": one(prompts, max_new_tokens=MAX_NEW, temperature=0.0, eos_id=eos),
            "sampled": one(prompts[:3], max_new_tokens=MAX_NEW, eos_id=eos, **SAMPLED),
        },
    }
    host = jax.device_get(params)
    for i, arg in enumerate(meshes):
        spec, _, what = arg.partition(":")
        mesh = sharding.make_mesh(spec, fewer=True)
        # The first mesh gets params on one device (the Generator places them); the others, params already
        # sharded on the mesh (the Generator keeps them as they are).
        given = params if i == 0 else jax.device_put(host, sharding.param_shardings(CONFIG, mesh))
        gen = Generator(given, CONFIG, mesh=mesh)
        streamed = []

        def on_tokens(tokens_B, step, done_B, streamed=streamed):
            streamed.append((step, tokens_B.tolist(), done_B.tolist()))

        greedy = gen(prompts, max_new_tokens=MAX_NEW, temperature=0.0, eos_id=eos, on_tokens=on_tokens)
        stats = gen.stats
        sampled = None
        if what == "sampled":  # through `generate`, which passes the mesh on
            sampled = jaxlm.generate(
                given, CONFIG, prompts[:3], max_new_tokens=MAX_NEW, eos_id=eos, mesh=mesh, **SAMPLED
            )
        kernel = gen.params["h"]["mlp"]["c_fc"]["kernel"]
        report[spec] = {
            "devices": mesh.devices.size,
            "greedy": greedy,
            "sampled": sampled,
            "shards": sharding.shard_summary(gen.params),
            "kept": i > 0 and kernel is given["h"]["mlp"]["c_fc"]["kernel"],
            "cache_shard": cache_shard(mesh, len(prompts), stats.prompt_bucket),
            "streamed": stream_rows(streamed, len(prompts)),
            "stats": {"compile_s": stats.compile_s, "prefill_s": stats.prefill_s, "tokens_per_s": stats.tokens_per_s},
        }
    print("RESULT " + json.dumps(report))


def cache_shard(mesh, B, P) -> list[int]:
    """The first device's shard of the prefill's K cache, from the compiled prefill's output sharding."""
    for key, exe in EXECUTABLES.items():
        if key[0] == "prefill" and getattr(key[1], "mesh", None) == mesh and key[2] == B:
            c = CONFIG
            return list(exe.output_shardings[1]["k"].shard_shape((c.n_layer, B, P, c.n_head, c.head_dim)))
    raise AssertionError("no compiled prefill for this mesh")


def stream_rows(streamed, B) -> list[list[int]]:
    """Each row's tokens as `on_tokens` saw them, up to the step its `done` turned on."""
    rows, done = [[] for _ in range(B)], np.zeros(B, bool)
    for _, tokens, done_B in sorted(streamed, key=lambda s: s[0]):
        for b in np.flatnonzero(~done):
            rows[b].append(tokens[b])
        done |= np.array(done_B)
    return rows


if __name__ == "__main__":
    main()
