"""Models on disk: jaxlm (Orbax) checkpoints, training-run checkpoints, Hugging Face GPT-2 names and files,
`load(source)` over all of them, and the convert command.

May import: jaxlm.errors, jaxlm.config, jaxlm.tokenizer, jaxlm.utils, jaxlm.model, jaxlm.lora, jaxlm.parallel.
"""
