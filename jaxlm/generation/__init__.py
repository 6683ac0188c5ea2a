"""Generation: `Generator` / `generate` with transformers' options, the compiled loops (greedy, sampling, beam
search), sampling and logits processors, the decode layout of the weights, where the model runs (one device
or a mesh), streaming, and the `sample.py` command.

May import: jaxlm.errors, jaxlm.config, jaxlm.tokenizer, jaxlm.utils, jaxlm.cpu, jaxlm.kernels, jaxlm.model,
jaxlm.lora, jaxlm.parallel, jaxlm.io (the sample command loads models).
"""
