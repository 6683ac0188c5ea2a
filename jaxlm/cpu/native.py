"""The CPU decode kernels (`decode_linear.cc`, `decode_attention.cc`): built on first use, then called from jit.

`jaxlm.generation.decode` uses them for a step's rows when the program's `jaxlm.kernels` record says
"native": a CPU program on an x86-64 CPU with AVX-512F or AVX2 and FMA (float32) or AVX-512 BF16
(bfloat16), where XLA's own few-row products run below memory bandwidth. They are compiled with the
system's C++ compiler ($CXX, else c++ or g++) against the XLA FFI headers jax ships, once per source and
jax version, into the cache
($JAXLM_CACHE/native). Where they cannot be had (another CPU, no compiler, JAXLM_NATIVE=0) decoding takes
XLA's forms as before; `unavailable(dtype)` says why.

A serving step's attention (`attend_rows`: each row at its own length in its own cache slot) has a float32
kernel too, on the same CPUs as the float32 products (AVX2 and FMA); `attention_unavailable(dtype)` says why not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..utils.cache import cache_dir
from ..utils.publish import write_file

SOURCES = ("decode_linear.cc", "decode_attention.cc", "parallel.h")  # one library
# dtype: (FFI target, its implementations as (symbol in the library, CPU level it needs, rows it runs at most:
# beyond, XLA's matmul is faster; None: any), the best first, inputs per packed lane). Every implementation of a
# target gives the same bits (one FMA chain per output). AVX2's runs any row count as a small matmul (as fast as
# XLA's at 64-256 rows); AVX-512's were built for a decode step's few rows (XLA's matmul wins at 256).
KERNELS = {
    "float32": ("jaxlm_f32_linear", (("JaxlmF32Linear", 2, 64), ("JaxlmF32LinearAvx2", 1, None)), 1),
    "bfloat16": ("jaxlm_bf16_linear", (("JaxlmBf16Linear", 3, 64),), 2),
}
NEEDS = {1: "AVX2 and FMA", 2: "AVX-512F", 3: "AVX-512 BF16"}
ATTENTION = ("jaxlm_attend_rows", "JaxlmAttendRows", 1)  # (FFI target, symbol, CPU level): float32 only
TARGETS = (*(target for target, *_ in KERNELS.values()), ATTENTION[0])  # every FFI target, all CPU-only


def _compile(sources: dict[str, bytes]) -> str:
    """Path of the built library, compiled into the cache unless these sources and jax already have one."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise OSError("no C++ compiler (set CXX)")
    key = hashlib.sha256(b"".join(sources.values()) + jax.__version__.encode() + cxx.encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"decode_kernels-{key}.so"
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for name, src in sources.items():
            Path(tmp, name).write_bytes(src)
        so = os.path.join(tmp, out.name)
        units = [os.path.join(tmp, name) for name in sources if name.endswith(".cc")]
        cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", *units, "-o", so]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(f"{cxx} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        # concurrent first uses each build; one rename wins and no process loads half a file
        write_file(out, Path(so).read_bytes())
    return str(out)


@functools.cache
def probe() -> tuple[int, str | None]:
    """(what this CPU runs: 0, 1 = AVX2 and FMA, 2 = AVX-512F, 3 = and BF16; why nothing, or None), registering
    each kernel's best implementation for this CPU."""
    if os.environ.get("JAXLM_NATIVE", "1") == "0":
        return 0, "JAXLM_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0, f"not an x86-64 CPU ({platform.machine()})"
    try:
        files = resources.files("jaxlm.cpu")
        lib = ctypes.CDLL(_compile({name: files.joinpath(name).read_bytes() for name in SOURCES}))
    except OSError as e:
        return 0, f"cannot build the kernels: {e}"
    level = lib.JaxlmCpuLevel()
    for target, implementations, _ in KERNELS.values():
        symbol = next((name for name, needs, _ in implementations if level >= needs), None)
        if symbol is not None:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    if level >= ATTENTION[2]:
        jax.ffi.register_ffi_target(ATTENTION[0], jax.ffi.pycapsule(getattr(lib, ATTENTION[1])), platform="cpu")
    return level, None


def unavailable(dtype) -> str | None:
    """None when the `dtype` kernel is registered and this CPU runs it; else why not, in a few words."""
    name = jnp.dtype(dtype).name
    if name not in KERNELS:
        return f"no kernel for {name}"
    level, why = probe()
    least = min(needs for _, needs, _ in KERNELS[name][1])
    return why or (None if level >= least else f"this CPU has no {NEEDS[least]}")


def attention_unavailable(dtype) -> str | None:
    """None when the slot attention kernel (`attend_rows`) is registered and runs `dtype` here; else why not."""
    name = jnp.dtype(dtype).name
    if name != "float32":
        return f"no attention kernel for {name}"
    level, why = probe()
    return why or (None if level >= ATTENTION[2] else f"this CPU has no {NEEDS[ATTENTION[2]]}")


def max_rows(dtype) -> int | None:
    """The most rows the `dtype` kernel in use here runs (None: any count; 0: no kernel runs here); beyond, XLA's
    matmul does."""
    level, why = probe()
    if why or jnp.dtype(dtype).name not in KERNELS:
        return 0
    return next((rows for _, needs, rows in KERNELS[jnp.dtype(dtype).name][1] if level >= needs), 0)


def usable(dtype) -> bool:
    """Whether this CPU runs the `dtype` kernel (`jaxlm.kernels` decides whether a program takes it)."""
    return unavailable(dtype) is None


def _per(dtype) -> int:
    return KERNELS[jnp.dtype(dtype).name][2]


def pack(w_OxD: np.ndarray) -> np.ndarray:
    """[O, D] -> the kernel's layout, zero-padded to whole blocks of 16 outputs (and bf16 input pairs):
    float32 [O/16, D, 16], bfloat16 [O/16, D/2, 16, 2]."""
    (O, D), per = w_OxD.shape, _per(w_OxD.dtype)
    w = np.pad(w_OxD, ((0, -O % 16), (0, -D % per)))
    packed = w.reshape(w.shape[0] // 16, 16, w.shape[1] // per, per).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(packed if per > 1 else packed[..., 0])


def _blocks(w_packed):
    """The packed array as [O/16, D/per, 16, per] (a view)."""
    return w_packed.reshape(*w_packed.shape[:3], _per(w_packed.dtype))


def unpack(w_packed, O: int, D: int):
    """The packed kernel back as [O, D] (traced: for a prefill of many rows, which XLA's matmul runs faster)."""
    nb, steps, _, per = _blocks(w_packed).shape
    return _blocks(w_packed).transpose(0, 2, 1, 3).reshape(nb * 16, steps * per)[:O, :D]


def rows(w_packed, ids, D: int):
    """Rows `ids` of the packed [O, D] matrix (the embedding lookup of a packed wte), shape ids.shape + (D,)."""
    ids = jnp.asarray(ids)
    return _blocks(w_packed)[ids // 16, :, ids % 16, :].reshape(*ids.shape, -1)[..., :D]


def linear(x_NxD, w_packed, O: int):
    """x @ W.T [N, O] in float32 for x [N, D] in W's dtype and packed W (the FFI call)."""
    per = _per(w_packed.dtype)
    if x_NxD.shape[1] % per:
        x_NxD = jnp.pad(x_NxD, ((0, 0), (0, -x_NxD.shape[1] % per)))
    out = jax.ShapeDtypeStruct((x_NxD.shape[0], 16 * w_packed.shape[0]), jnp.float32)
    target = KERNELS[jnp.dtype(w_packed.dtype).name][0]
    return jax.ffi.ffi_call(target, out)(x_NxD.astype(w_packed.dtype), w_packed)[:, :O]


def attend_rows(q_BxHxK, k_NxHxSxK, v_NxHxSxK, slots_B, positions_B):
    """softmax(q . k / sqrt(K)) . v over positions 0..positions_B[b] of cache row slots_B[b], [B, H, K] float32
    (the FFI call; float32 cache, K a multiple of 8)."""
    out = jax.ShapeDtypeStruct(q_BxHxK.shape, jnp.float32)
    i32 = jnp.int32
    args = (q_BxHxK.astype(jnp.float32), k_NxHxSxK, v_NxHxSxK, slots_B.astype(i32), positions_B.astype(i32))
    return jax.ffi.ffi_call(ATTENTION[0], out)(*args)
