"""Placing the model on devices: the one logical-axis rules table and meshes, memory per device, and joining
a multi-process job.

May import: jaxlm.errors, jaxlm.config, jaxlm.model, jaxlm.lora, jaxlm.utils.
"""
