"""Params as nested dicts: split into parts and put back together (e.g. trainable and frozen), counted.

Paths are "a/b/leaf" strings, as HF-style names read ("h/attn/c_attn/kernel").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax


def partition(params, keep: Callable[[str], bool] | None):
    """(kept, rest): two partial trees of `params` split by a predicate on leaf paths (None: keep all)."""
    if keep is None:
        return params, {}

    def split(tree, prefix):
        kept, rest = {}, {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                k, r = split(value, path + "/")
                if k:
                    kept[key] = k
                if r:
                    rest[key] = r
            else:
                (kept if keep(path) else rest)[key] = value
        return kept, rest

    return split(params, "")


def combine(a, b):
    """The union of two partial nested dicts with disjoint leaves (either may be empty)."""
    if not b:
        return a
    if not a:
        return b
    out = dict(b)
    for key, value in a.items():
        out[key] = combine(value, b[key]) if isinstance(value, dict) and key in b else value
    return out


def leaf_paths(tree, prefix: str = "") -> list[str]:
    """The "a/b/leaf" path of every leaf, in key order."""
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths += leaf_paths(value, path + "/") if isinstance(value, dict) else [path]
    return paths


def count(tree) -> int:
    """Number of scalars in a pytree of arrays or shapes (params, adapters)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
