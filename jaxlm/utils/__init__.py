"""Small internal utilities every layer may use: publishing files and directories atomically (publish), the
cache directory (cache), nested-dict trees split, joined and counted (tree), small JSON description files
(files), optional packages behind pip extras (extras), padded-length buckets for jitted shapes (buckets).

May import: jaxlm.errors only.
"""
