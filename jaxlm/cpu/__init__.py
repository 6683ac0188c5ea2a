"""What exists only for CPUs: the native decode kernels (their C++ source beside them), glibc's malloc
setting, CPU cores as devices, the query-block causal attention and the chunked eval head.

None of it is chosen by testing `jax.default_backend()` inside an op: `jaxlm.kernels` picks it from the
platform of the mesh a program runs on, so nothing tuned for a CPU reaches a GPU or TPU program.
May import: jaxlm.errors, jaxlm.config, jaxlm.utils.
"""
