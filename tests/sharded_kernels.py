"""Checks that need several devices, run by tests/test_splash.py with 4 CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4); prints one JSON line.

1. The activation constraints reach the lowered program: on fsdp=4 the logits come out split over the batch
   as RULES say (with the constraints dropped, XLA split them over nothing and every device held them whole).
2. Splash attention (interpreted here) inside jax.shard_map over data=2,tensor=2, in the LM loss: the loss and
   the gradients equal the reference form's.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import jaxlm
from jaxlm import kernels
from jaxlm.model.loss import lm_loss
from jaxlm.parallel import sharding
from jaxlm.train.step import Batch

assert jax.device_count() == 4, jax.devices()
out = {}
c = jaxlm.GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=256)
params = jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(0))
tokens = jax.random.randint(jax.random.key(1), (4, 129), 0, c.vocab_size)

mesh = sharding.make_mesh("fsdp=4")
on_mesh = jax.device_put(params, sharding.param_shardings(c, mesh))
forward = jax.jit(lambda p, t: jaxlm.GPT(c).apply({"params": p}, t))
with sharding.activate(mesh):
    lowered = forward.lower(on_mesh, tokens[:, :-1])
out["constraints"] = lowered.as_text().count("sdy.sharding_constraint")
batch_split = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
out["logits_split_over_batch"] = lowered.compile().output_shardings.is_equivalent_to(batch_split, 3)

mesh = sharding.make_mesh("data=2,tensor=2")
on_mesh = jax.device_put(params, sharding.param_shardings(c, mesh))
splash = kernels.resolve(mesh, attention="splash")
results = {}
for name, k in (("splash", splash), ("reference", kernels.PORTABLE)):
    loss_fn = lm_loss(c, kernels=k)
    step = jax.jit(jax.value_and_grad(lambda p, t, f=loss_fn: f(p, {}, Batch(t), None)[0]))
    with sharding.activate(mesh):
        lowered = step.lower(on_mesh, tokens)
        out[f"{name}_shard_map"] = "sdy.manual_computation" in lowered.as_text()
        results[name] = lowered.compile()(on_mesh, tokens)
(loss, grads), (ref_loss, ref_grads) = results["splash"], results["reference"]
out["loss"] = [float(loss), float(ref_loss)]
diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), grads, ref_grads)
out["grad_max_diff"] = max(jax.tree.leaves(diffs))
out["grad_max"] = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
print(json.dumps(out))
