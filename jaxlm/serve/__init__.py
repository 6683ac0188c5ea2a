"""jaxlm.serve: an OpenAI-compatible HTTP server (`python -m jaxlm.serve MODEL`) with continuous batching.

engine.py (slots, the device loop), programs.py (its compiled prefill / step / sampling programs),
sampler.py (per-row sampling), jobs.py + text.py (a request's token events to text, stop strings),
protocol.py (request bodies), responses.py (OpenAI's response and stream shapes), app.py (FastAPI routes),
httperrors.py (OpenAI's error shape, API key and body-size guards), metrics.py (Prometheus), chat.py (chat
templates), cli.py (the command), static/index.html (the page at GET /). docs/serving.md is the guide.

May import: jaxlm.errors, config, tokenizer, utils, cli, cpu, kernels, lora, model, parallel, io and generation; nothing
imports it but the command. FastAPI, uvicorn, prometheus-client and Jinja2 come with `pip install
'jaxlm[serve]'` and are imported by the modules that use them, so `import jaxlm` never needs them.
"""
