"""Hugging Face GPT-2 <-> jaxlm: a declarative name map, plus config translation, both ways.

HF GPT-2 `Conv1D` weights are already [in, out] like a Flax kernel, so nothing is transposed.
The one reshape: `c_attn` [D, 3D] <-> jaxlm's [D, 3, D] (q|k|v split out, so that tensor
parallelism shards q, k and v by heads alike). Weights are read from safetensors with numpy only:
no torch, and never a pickle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..config import GPTConfig
from ..errors import JaxlmError, disk_full
from ..model.gpt import param_shapes
from ..utils.files import read_json_object
from ..utils.publish import publishing

# (jaxlm path, HF name under "transformer."); "h/" entries are per layer, stacked on axis 0.
NAME_MAP: list[tuple[str, str]] = [
    ("wte/embedding", "wte.weight"),
    ("wpe/embedding", "wpe.weight"),
    ("ln_f/scale", "ln_f.weight"),
    ("ln_f/bias", "ln_f.bias"),
    ("h/ln_1/scale", "h.{i}.ln_1.weight"),
    ("h/ln_1/bias", "h.{i}.ln_1.bias"),
    ("h/attn/c_attn/kernel", "h.{i}.attn.c_attn.weight"),
    ("h/attn/c_attn/bias", "h.{i}.attn.c_attn.bias"),
    ("h/attn/c_proj/kernel", "h.{i}.attn.c_proj.weight"),
    ("h/attn/c_proj/bias", "h.{i}.attn.c_proj.bias"),
    ("h/ln_2/scale", "h.{i}.ln_2.weight"),
    ("h/ln_2/bias", "h.{i}.ln_2.bias"),
    ("h/mlp/c_fc/kernel", "h.{i}.mlp.c_fc.weight"),
    ("h/mlp/c_fc/bias", "h.{i}.mlp.c_fc.bias"),
    ("h/mlp/c_proj/kernel", "h.{i}.mlp.c_proj.weight"),
    ("h/mlp/c_proj/bias", "h.{i}.mlp.c_proj.bias"),
]
# HF keys that hold no parameters (causal-mask buffers of old checkpoints) or the tied head.
_IGNORED = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)$")
_PREFIX = "transformer."

# HF config fields jaxlm implements only at one value: anything else is an error, never ignored.
_REQUIRED = {
    "model_type": "gpt2",
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# reorder_and_upcast_attn only changes numerics in half precision: jaxlm always computes attention
# scores and softmax in float32, which is exactly what that option asks for, so both values are fine.


class HFFormatError(JaxlmError):
    """An HF directory jaxlm cannot read, or a GPT-2 variant it does not implement."""


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """GPTConfig from an HF GPT-2 config.json dict; rejects options jaxlm does not implement."""
    for key, want in _REQUIRED.items():
        got = hf.get(key, want)
        if got != want:
            raise HFFormatError(
                f"HF config option {key}={got!r} is not supported by jaxlm (only {want!r}); "
                "this is not a plain GPT-2 checkpoint"
            )
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
        raise HFFormatError(
            f"HF config option activation_function={act!r} is not supported by jaxlm "
            f"(GPT-2 uses the tanh GELU: {', '.join(_GELU_TANH)})"
        )
    n_embd = hf.get("n_embd", 768)
    n_inner = hf.get("n_inner")
    if n_inner not in (None, 4 * n_embd):
        raise HFFormatError(f"HF config option n_inner={n_inner} is not supported (jaxlm uses 4 * n_embd)")
    for key in ("vocab_size", "n_positions", "n_ctx", "n_layer", "n_head", "n_embd"):
        if key in hf and not _is_int(hf[key]):
            raise HFFormatError(f"HF config option {key}={hf[key]!r} must be a positive integer; fix config.json")
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon"):
        if key in hf and not (_is_number(hf[key]) and hf[key] >= 0):
            raise HFFormatError(f"HF config option {key}={hf[key]!r} must be a number >= 0; fix config.json")
    pdrops = {hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    fields = dict(
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        # jaxlm has one dropout rate; HF GPT-2s use the same value for all three.
        dropout=max(pdrops),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )
    try:
        return GPTConfig(**{**fields, **overrides})
    except ValueError as e:
        raise HFFormatError(f"HF config is not a valid GPT-2 config: {e}") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def config_to_hf(config: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def is_hf_dir(path) -> bool:
    return (Path(path) / "config.json").is_file()


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise HFFormatError(f"{index} is corrupt ({type(e).__name__}: {e}); re-save the model") from None
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
    if pickles:
        raise HFFormatError(
            f"{path} has no model.safetensors, only {pickles[0]} (jaxlm never loads pickled weights); convert it to "
            "safetensors: load it in transformers and save_pretrained(DIR, safe_serialization=True)"
        )
    raise HFFormatError(
        f"{path} has no model.safetensors; re-save the model with save_pretrained(..., safe_serialization=True)"
    )


def read_config(path, **config_overrides) -> GPTConfig:
    """The GPTConfig of an HF model directory (its config.json; the weights are not read)."""
    path = Path(path)
    cfg_file = path / "config.json"
    hf_cfg = read_json_object(
        cfg_file,
        missing=f"{path} has no config.json; it is not a Hugging Face model directory",
        fix="re-save the model with save_pretrained",
        error=HFFormatError,
    )
    try:
        return config_from_hf(hf_cfg, **config_overrides)
    except HFFormatError as e:
        raise HFFormatError(f"{cfg_file}: {e}") from None


def load_hf_dir(path, progress=None, **config_overrides):
    """(config, params as numpy) from a directory written by `save_pretrained`."""
    path = Path(path)
    config = read_config(path, **config_overrides)

    tensors: dict[str, np.ndarray] = {}
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="np") as sf:
                for key in sf.keys():
                    tensors[key.removeprefix(_PREFIX)] = sf.get_tensor(key)
                    if progress:
                        progress(1)
        except (SafetensorError, OSError) as e:
            raise HFFormatError(f"cannot read {f}: {e}; the file is missing or corrupt") from None
    params = _from_hf_tensors(tensors, config, f"{path}")
    return config, params


def _from_hf_tensors(tensors: dict, config: GPTConfig, where: str):
    shapes = param_shapes(config)
    dtype = np.dtype(config.param_dtype) if config.param_dtype != "bfloat16" else None
    used = set()
    params: dict = {}
    for jpath, hname in NAME_MAP:
        want = _get(shapes, jpath)
        layers = range(config.n_layer) if "{i}" in hname else [None]
        arrays = []
        for i in layers:
            key = hname.format(i=i)
            if key not in tensors:
                raise HFFormatError(f"{where}: weight {_PREFIX}{key} is missing; the checkpoint is incomplete")
            used.add(key)
            t = tensors[key]
            if t.shape != _hf_shape(want.shape, hname):
                raise HFFormatError(
                    f"{where}: weight {_PREFIX}{key} has shape {t.shape}, which does not match the config "
                    f"(expected {_hf_shape(want.shape, hname)}); config.json and the weights disagree"
                )
            if t.dtype.kind != "f" and t.dtype.name != "bfloat16":
                raise HFFormatError(
                    f"{where}: weight {_PREFIX}{key} has dtype {t.dtype}, not floating point; the file is corrupt "
                    "or not a GPT-2 checkpoint"
                )
            if not np.isfinite(t).all():
                raise HFFormatError(f"{where}: weight {_PREFIX}{key} holds NaN or inf; the checkpoint is corrupt")
            arrays.append(t)
        x = np.stack(arrays) if "{i}" in hname else arrays[0]
        x = x.reshape(want.shape)
        _set(params, jpath, x.astype(dtype) if dtype is not None else _to_bf16(x))
    extra = sorted(k for k in tensors if k not in used and not _IGNORED.match(k))
    if extra:
        raise HFFormatError(
            f"{where}: unexpected weights {extra[:3]}{'...' if len(extra) > 3 else ''}; "
            "this is not a plain GPT-2 (GPT2LMHeadModel) checkpoint"
        )
    if "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"], tensors["wte.weight"]):
        raise HFFormatError(f"{where}: lm_head.weight differs from wte.weight; untied heads are not supported")
    return params


def _hf_shape(shape, hname: str):
    s = shape[1:] if "{i}" in hname else shape
    if "c_attn" in hname:
        s = (*s[:-2], s[-2] * s[-1])
    return tuple(s)


def to_hf(config: GPTConfig, params, out_dir, progress=None) -> Path:
    """Write config.json + model.safetensors that `GPT2LMHeadModel.from_pretrained` loads."""
    import jax

    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise JaxlmError(f"{out} already exists and is not empty; choose a new output directory")
    tensors: dict[str, np.ndarray] = {}
    for jpath, hname in NAME_MAP:
        x = np.asarray(jax.device_get(_get(params, jpath)), dtype=np.float32)
        for i in range(config.n_layer) if "{i}" in hname else [None]:
            xi = x[i] if i is not None else x
            tensors[_PREFIX + hname.format(i=i)] = np.ascontiguousarray(xi.reshape(_hf_shape(x.shape, hname)))
            if progress:
                progress(1)
    try:
        with publishing(out) as tmp:  # an empty `out` is replaced; anything else was refused above
            (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
            save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    except Exception as e:  # safetensors reports a full disk as its own SafetensorError
        if disk_full(e):
            raise JaxlmError(f"cannot write {out}: {disk_full(e)}; free some space and convert again") from None
        raise
    return out


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch config.json and safetensors weights of a hub repo (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["config.json", "model.safetensors", "model*.safetensors", "*.safetensors.index.json"],
        )
    except RepositoryNotFoundError:
        raise JaxlmError(f"no model {repo_id!r} on the Hugging Face hub (and no such local path)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JaxlmError(
            f"could not download {repo_id!r} from the Hugging Face hub ({first}); "
            "check the network, or pass a local directory written by save_pretrained"
        ) from None
    return Path(local)


def _get(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _set(tree, path: str, value):
    *head, last = path.split("/")
    for k in head:
        tree = tree.setdefault(k, {})
    tree[last] = value


def _to_bf16(x):
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16)
