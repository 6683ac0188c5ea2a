"""What exists only for CPUs: the native decode kernels (their C++ source beside them) and decode's other
product forms, the query-block causal attention, the chunked eval head, glibc's malloc setting and CPU cores
as devices.

None of it is chosen by testing `jax.default_backend()` inside an op: `jaxlm.kernels` picks it from the
platform of the devices a program runs on, and the host settings are decided from the platform a command
will use before JAX starts, so nothing tuned for a CPU reaches a GPU or TPU program.
May import: jaxlm.errors, jaxlm.config, jaxlm.utils.
"""
