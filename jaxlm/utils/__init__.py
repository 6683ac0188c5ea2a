"""Small internal utilities every layer may use: publishing files and directories atomically, the cache
directory, and nested-dict trees split and joined by leaf path.

May import: jaxlm.errors only.
"""
