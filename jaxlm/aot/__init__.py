"""Ahead-of-time compilation: a run's programs compiled for a TPU slice from a CPU host (`python -m jaxlm.aot`).

May import: errors, config, cli, io, parallel, lora, model, generation, train, and its own modules.
"""

from .programs import Program, train_programs
from .report import Compiled, compile_program
from .topology import Slice, open_slice

__all__ = ["Compiled", "Program", "Slice", "compile_program", "open_slice", "train_programs"]
