"""Shape buckets: a few padded lengths, so a jitted program compiles once per bucket, not once per length."""

from __future__ import annotations


def buckets(limit: int, smallest: int) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit` itself."""
    sizes, b = [], smallest
    while b < limit:
        sizes.append(b)
        b *= 2
    return sizes + [limit]


def fine_buckets(limit: int, smallest: int) -> list[int]:
    """Multiples of `smallest` up to 8 x `smallest`, then four sizes per doubling (each a quarter of its power
    of two apart) below `limit`, then `limit`: a length is padded by less than `smallest` or a quarter of it."""
    sizes, b = [], smallest
    while b < limit:
        sizes.append(b)
        b += smallest if b < 8 * smallest else (1 << (b.bit_length() - 1)) // 4
    return sizes + [limit]


def bucket(n: int, sizes: list[int]) -> int:
    """The smallest of `sizes` (ascending) that holds `n`."""
    return next(b for b in sizes if b >= n)
