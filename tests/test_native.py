"""jaxlm.cpu.native: the CPU decode kernels equal a float32 matmul of the same numbers, decode through them
stays as close to float32 as XLA's path, and without them decoding falls back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm import kernels
from jaxlm.cpu import native
from jaxlm.generation import decode

STATE = native.probe()
PREFILL = jax.jit(decode.prefill, static_argnames=("c", "kernels"))
STEP = jax.jit(decode.step, static_argnames=("c", "kernels"))
DTYPES = ["float32", "bfloat16"]


def needs(dtype):
    why = native.unavailable(dtype)
    return pytest.mark.skipif(why is not None, reason=f"the {dtype} kernel cannot run here: {why}")


def each_dtype():
    return pytest.mark.parametrize("dtype", [pytest.param(d, marks=needs(d)) for d in DTYPES])


@pytest.fixture
def xla_only(monkeypatch):
    """The library as on a machine without the kernel (JAXLM_NATIVE=0), restored afterwards."""
    monkeypatch.setenv("JAXLM_NATIVE", "0")
    native.probe.cache_clear()
    yield
    monkeypatch.undo()  # this and whatever else the test set (CXX, JAXLM_CACHE)
    native.probe.cache_clear()
    assert native.probe() == STATE


def _rand(rng, dtype, *shape):
    return jnp.asarray(rng.standard_normal(shape), dtype)


@each_dtype()
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("O, D", [(96, 64), (80, 96), (33, 95)])  # whole blocks; a short block; odd D
def test_kernel_equals_a_float32_matmul_of_the_same_numbers(dtype, rows, O, D):
    rng = np.random.default_rng(rows * O)
    x, w = _rand(rng, dtype, rows, D), _rand(rng, dtype, O, D)
    ref = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T
    y = jax.jit(native.linear, static_argnums=2)(x, native.pack(np.asarray(w)), O)
    assert y.shape == (rows, O) and y.dtype == jnp.float32
    # bf16 x bf16 products are exact in float32, float32's are the matmul's: only the order of the sums differs
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@each_dtype()
@pytest.mark.parametrize("O, D", [(16 * 27, 300), (48, 64)])  # an odd block count, D past one slice; small
def test_a_rows_bits_do_not_depend_on_the_row_count_or_its_place(dtype, O, D):
    """Each output is one chain of FMAs over D in order, whatever the rows around it: what lets a server
    batch requests without changing their logits (`jaxlm.serve.programs.for_serving`)."""
    rng = np.random.default_rng(O)
    x, w = np.asarray(_rand(rng, dtype, 64, D)), native.pack(np.asarray(_rand(rng, dtype, O, D)))
    linear = jax.jit(native.linear, static_argnums=2)
    every = np.asarray(linear(x, w, O))
    for n in (1, 2, 3, 5, 7, 12, 13, 31, 64):
        order = rng.permutation(64)[:n]
        np.testing.assert_array_equal(np.asarray(linear(x[order], w, O)), every[order], err_msg=f"{n} rows")


@each_dtype()
@pytest.mark.parametrize("rows", [4, 65])
def test_decode_linear_takes_the_kernel_for_few_rows_and_xla_for_many(dtype, rows):
    rng = np.random.default_rng(rows)
    x, w, b = _rand(rng, dtype, rows, 64), _rand(rng, dtype, 48, 64), _rand(rng, dtype, 48)
    wp = jnp.asarray(native.pack(np.asarray(w)))
    assert wp.shape == {"float32": (3, 64, 16), "bfloat16": (3, 32, 16, 2)}[dtype]
    y = jax.jit(decode._linear, static_argnames="out_dtype")(x, wp, b, out_dtype=jnp.float32)
    ref = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T + np.asarray(b, np.float32)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)
    uses_kernel = native.KERNELS[dtype][0] in jax.jit(decode._linear).lower(x, wp, b).as_text()
    limit = native.max_rows(dtype)  # AVX2's float32 kernel: any count; AVX-512's: 64
    assert uses_kernel == (limit is None or rows <= limit)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_rows_are_the_embedding_rows(dtype):
    rng = np.random.default_rng(0)
    wte = np.asarray(_rand(rng, dtype, 97, 33))
    ids = np.array([[0, 15, 16, 96], [50, 1, 1, 95]])
    np.testing.assert_array_equal(np.asarray(native.rows(native.pack(wte), ids, 33)), wte[ids])
    np.testing.assert_array_equal(np.asarray(native.unpack(native.pack(wte), 97, 33)), wte)


def _step_logits(c, params, dtype):
    """Logits of a prefill of 5 tokens then 3 steps through jaxlm.generation.decode in `dtype`, [4, B, V]."""
    c16 = c.replace(dtype=dtype, param_dtype=dtype)
    cpu = kernels.resolve("cpu", dtype=dtype, decode=True)  # native where it can run, else the CPU's XLA forms
    dp = decode.prepare(params, c16, cpu)
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]], np.int32)
    P, S = 5, 8
    pos = np.broadcast_to(np.arange(8, dtype=np.int32), tokens.shape)
    logits, kv = PREFILL(dp, tokens[:, :P], pos[:, :P], np.ones((2, P), bool), c=c16, kernels=cpu)
    cache = [tuple(jnp.zeros((2, c.n_head, S, c.head_dim), k.dtype).at[:, :, :P].set(k) for k in layer) for layer in kv]
    out = [logits]
    for t in range(P, 8):
        logits, cache = STEP(dp, tokens[:, t], pos[:, t], cache, t, np.ones((2, S), bool), c=c16, kernels=cpu)
        out.append(logits)
    return dp, np.stack([np.asarray(x, np.float32) for x in out])


@each_dtype()
def test_decode_through_the_kernel_is_as_close_to_float32_as_xla(dtype, xla_only, monkeypatch):
    c = jaxlm.GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=97, block_size=16)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(1))
    _, ref = _step_logits(c, params, "float32")  # JAXLM_NATIVE=0 here: XLA's float32
    dp_xla, xla = _step_logits(c, params, dtype)
    monkeypatch.delenv("JAXLM_NATIVE")
    native.probe.cache_clear()
    dp_native, ours = _step_logits(c, params, dtype)
    assert dp_xla["layers"][0]["mlp"]["c_fc"]["kernel"].shape == (4 * 64, 64) and dp_xla["wte"].shape == (97, 64)
    assert dp_native["layers"][0]["mlp"]["c_fc"]["kernel"].shape == native.pack(np.zeros((4 * 64, 64), dtype)).shape
    assert dp_native["wte"].shape[:3] == (7, 64 // native._per(dtype), 16)  # 97 rows padded to 7 blocks
    err_native, err_xla = np.abs(ours - ref).max(), np.abs(xla - ref).max()
    if dtype == "float32":
        assert err_native <= 1e-5, err_native  # the order of float32 sums only
    else:
        assert 0 < err_native <= 2 * err_xla + 1e-3, (err_native, err_xla)  # bf16 rounding, not a wrong product
    assert np.abs(ref).max() > 0.1
    # and a whole generate through it (the FFI call inside the compiled loop) picks the step's argmax
    gen = jaxlm.Generator(params, c, dtype=dtype)
    assert gen.dparams["wte"].ndim > 2
    out = gen([[3, 1, 4], [2, 7]], max_new_tokens=6, temperature=0, eos_id=None)
    cd = c.replace(dtype=dtype, param_dtype=dtype)
    assert out == [_greedy(dp_native, cd, p, 6) for p in ([3, 1, 4], [2, 7])]


def _greedy(dp, c, prompt, n):
    """Greedy tokens one row at a time through decode.prefill / decode.step (no padding, no loop)."""
    P, S = len(prompt), len(prompt) + n
    pos = np.arange(S, dtype=np.int32)[None]
    logits, kv = PREFILL(dp, np.array([prompt], np.int32), pos[:, :P], np.ones((1, P), bool), c=c)
    cache = [tuple(jnp.zeros((1, c.n_head, S, c.head_dim), k.dtype).at[:, :, :P].set(k) for k in layer) for layer in kv]
    out = [int(jnp.argmax(logits[0]))]
    for t in range(P, S - 1):
        logits, cache = STEP(dp, np.array([out[-1]]), pos[:, t], cache, t, np.ones((1, S), bool), c=c)
        out.append(int(jnp.argmax(logits[0])))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_the_kernel_decoding_keeps_xla_layout(dtype, xla_only):
    assert native.unavailable(dtype) == "JAXLM_NATIVE=0" and not native.usable(dtype)
    c = jaxlm.GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=97, block_size=32)
    params = jax.jit(jaxlm.init_params, static_argnums=0)(c, jax.random.key(0))
    gen = jaxlm.Generator(params, c, dtype=dtype)
    assert {x.ndim for x in jax.tree.leaves(gen.dparams)} <= {1, 2}
    assert len(gen([[1, 2, 3]], max_new_tokens=4, temperature=0, eos_id=None)[0]) == 4


def test_a_compiler_that_fails_is_a_reason_not_a_crash(xla_only, monkeypatch, tmp_path):
    monkeypatch.delenv("JAXLM_NATIVE")
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CXX", "false")
    native.probe.cache_clear()
    why = native.unavailable("float32")
    assert why == "cannot build the kernels: false failed: ?" or why.startswith("not an x86-64"), why
    assert native.unavailable("bfloat16") == why and native.unavailable("float16") == "no kernel for float16"
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left in the cache


slot_kernel = pytest.mark.skipif(
    native.attention_unavailable("float32") is not None,
    reason=f"the slot attention kernel cannot run here: {native.attention_unavailable('float32')}",
)


@slot_kernel
@pytest.mark.parametrize("K", [16, 64])
def test_slot_attention_is_the_chunked_attention_and_a_row_sees_only_its_slot(K):
    """The serving step's attention kernel against XLA's chunks (`decode.attend_chunks`) on rows at their own
    lengths (the first position, the last, in between) in any slots; and a row's output keeps its bits whatever
    the other rows are, how many run and which slot holds it."""
    rng = np.random.default_rng(K)
    N, H, S = 6, 3, 128
    k, v = (jnp.asarray(rng.standard_normal((N, H, S, K)), jnp.float32) for _ in "kv")
    q = jnp.asarray(rng.standard_normal((4, H, 1, K)), jnp.float32)
    slots, positions = jnp.asarray([4, 0, 5, 2], jnp.int32), jnp.asarray([0, 127, 70, 5], jnp.int32)
    ours = jax.jit(lambda *a: decode._attend_native(*a[:3], slots_B=a[3], positions_B=a[4]))
    xla = decode.attend_chunks(q, k, v, positions_B=positions, chunk=32, slots_B=slots)
    got = ours(q, k, v, slots, positions)
    assert got.shape == (4, H, 1, K)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla), rtol=1e-5, atol=1e-6)
    # the first row alone, and moved to another slot with the others changed around it
    alone = ours(q[:1], k, v, slots[:1], positions[:1])
    np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(got[0]))
    k2, v2 = k.at[1].set(k[4]).at[4].set(0.0), v.at[1].set(v[4]).at[4].set(7.0)
    moved = ours(q[::-1], k2, v2, jnp.asarray([2, 5, 0, 1], jnp.int32), positions[::-1])
    np.testing.assert_array_equal(np.asarray(moved[3]), np.asarray(got[0]))


@slot_kernel
def test_slot_attention_refuses_shapes_it_does_not_take():
    q, kv = jnp.zeros((1, 2, 12)), jnp.zeros((2, 2, 8, 12))
    with pytest.raises(Exception, match="K a multiple of 8"):
        jax.block_until_ready(native.attend_rows(q, kv, kv, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32)))
    with pytest.raises(Exception, match="a slot out of range"):
        q, kv = jnp.zeros((1, 2, 8)), jnp.zeros((2, 2, 8, 8))
        jax.block_until_ready(native.attend_rows(q, kv, kv, jnp.full(1, 2, jnp.int32), jnp.zeros(1, jnp.int32)))
