"""`python sample.py`: load a model (a training run, HF GPT-2 or jaxlm checkpoint), stream samples."""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

import jax
import numpy as np

from ..config import ATTENTIONS, DTYPES
from ..errors import JaxlmError
from ..io import load as loader
from ..kernels import resolve
from ..lora import peft as peft_io
from ..parallel import sharding
from ..tokenizer import from_spec
from .generator import Generator
from .sampling import Sampling

DEFAULT_MAX_NEW_TOKENS = 500
SEPARATOR = "---------------"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python sample.py",
        description="Sample text from a GPT: a training run (default: the one `python train.py` wrote), "
        "a Hugging Face GPT-2 or a jaxlm checkpoint. Samples stream to stdout; timings go to stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def flag(name, **kw):  # --max-new-tokens and nanoGPT's --max_new_tokens both work
        names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
        p.add_argument(*names, **kw)

    flag(
        "--init-from",
        default="resume",
        help="resume (the run in --out-dir) | an HF hub id (gpt2, gpt2-medium, ...) | an HF directory "
        "| a jaxlm checkpoint or run directory",
    )
    flag(
        "--adapter",
        default=None,
        help="a Hugging Face PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) for the "
        "--init-from model, merged into it before sampling",
    )
    flag("--out-dir", default="out", help="the training run that --init-from resume samples from")
    flag("--start", default="\n", help="the prompt, or FILE:path to read it from a file; '<|endoftext|>' for none")
    flag("--num-samples", type=int, default=3, help="samples, generated together as one batch")
    flag(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens per sample (default: {DEFAULT_MAX_NEW_TOKENS}, or what the block size leaves after the prompt)",
    )
    flag("--temperature", type=float, default=0.8, help="0 is greedy; higher is more random")
    flag("--top-k", type=int, default=200, help="draw from the k most likely tokens only (0: all)")
    flag("--top-p", type=float, default=1.0, help="draw from the smallest set with this much probability (1: all)")
    flag("--seed", type=int, default=1337, help="same seed, same samples")
    flag("--max-length", type=int, default=None, help="prompt + new tokens, as transformers' max_length")
    flag("--min-new-tokens", type=int, default=0, help="no <|endoftext|> before this many new tokens")
    flag(
        "--do-sample",
        default="auto",
        choices=("auto", "true", "false"),
        help="auto: sample unless --temperature 0 (beam search with --num-beams > 1); false: greedy / beam search",
    )
    flag("--num-beams", type=int, default=1, help="beam search with this many beams (1: none)")
    flag(
        "--num-return-sequences",
        type=int,
        default=None,
        help="sequences per prompt: the best beams with --num-beams (then one prompt), else draws per sample",
    )
    flag("--length-penalty", type=float, default=1.0, help="beam scores are log-prob / new_tokens ** this")
    flag(
        "--early-stopping",
        default="false",
        choices=("true", "false", "never"),
        help="when beam search stops, as transformers' early_stopping",
    )
    flag("--repetition-penalty", type=float, default=1.0, help="> 1 penalizes tokens already in the text")
    flag("--no-repeat-ngram-size", type=int, default=0, help="no n-gram of this size twice (0: off)")
    flag("--dtype", default="float32", choices=DTYPES, help="weights and KV cache while decoding")
    flag(
        "--attention",
        default="auto",
        choices=ATTENTIONS,
        help="the prompt's attention kernel: auto picks by platform and dtype (cuDNN on a GPU in bfloat16, splash "
        "on a TPU, jaxlm's reference form on a CPU); each new token always attends in the reference form",
    )
    flag(
        "--mesh",
        default=None,
        help="sample sharded over a device mesh, e.g. tensor=2 or data=2,fsdp=2,tensor=2 (the first devices "
        "when the sizes multiply to fewer than all): tensor splits heads, MLP and vocab, for a model too big for "
        "one device, and must divide n_head. None: one device, the fastest path for a model that fits",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples < 1:
        raise JaxlmError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.top_k < 0:
        raise JaxlmError(f"--top-k must be >= 1 (or 0 for no top-k), got {args.top_k}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise JaxlmError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
    text = _read_start(args.start)

    source = _source(args.init_from, args.out_dir)
    resolve(None, dtype=args.dtype, attention=args.attention)  # an impossible --attention fails before loading
    if args.adapter:
        peft_io.check_adapter(args.adapter)  # a bad adapter fails before the base is loaded
    mesh, shardings, load_from = None, None, source
    if args.mesh:
        mesh = sharding.make_mesh(args.mesh, fewer=True)  # a bad spec fails before any loading
        kind, path = loader.resolve(source)
        shardings = sharding.param_shardings(loader.read_config(path), mesh)
        sizes = ",".join(f"{a}={n}" for a, n in mesh.shape.items())
        print(f"mesh {sizes} on {mesh.size} of {jax.device_count()} devices", file=sys.stderr, flush=True)
        load_from = path if kind == "hf" else source  # a hub id: its local copy, downloaded once
    print(f"loading {source} ...", file=sys.stderr, flush=True)
    config, params, spec = loader.load_with_tokenizer(load_from, adapter=args.adapter, shardings=shardings)
    tokenizer = _tokenizer(spec, config, source)
    ids = tokenizer.encode(text)
    if not ids:
        hint = "--start '<|endoftext|>'" if tokenizer.eot_id is not None else "a --start the model knows"
        raise JaxlmError(f"the prompt is empty; to sample without one, pass {hint}")
    if len(ids) >= config.block_size:
        what = "is longer than" if len(ids) > config.block_size else "leaves no room in"
        raise JaxlmError(f"the prompt ({len(ids)} tokens) {what} the model's block_size ({config.block_size})")
    max_new = args.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, config.block_size - len(ids))

    generator = Generator(params, config, mesh=mesh, dtype=args.dtype, attention=args.attention)
    k = generator.kernels
    shown = [f"prompt attention: {k.attention_for('prefill')}", k.describe("decode_products")]
    print(f"kernels: {'; '.join(x for x in shown if x)}", file=sys.stderr, flush=True)
    del params  # the generator holds its own decode-layout copy (with a mesh: these same sharded arrays)
    beams = args.num_beams > 1
    prompts = [ids] if beams else [ids] * args.num_samples
    options = dict(
        max_new_tokens=args.max_new_tokens if args.max_new_tokens or args.max_length else max_new,
        max_length=args.max_length,
        min_new_tokens=args.min_new_tokens,
        do_sample={"auto": None, "true": True, "false": False}[args.do_sample],
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        seed=sampling.seed,
        num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences or 1,
        length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False, "never": "never"}[args.early_stopping],
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        eos_id=tokenizer.eot_id,
    )
    if beams:  # beams reorder as they go: printed once done, best first
        rows = generator(prompts, **options)
        printer = StreamPrinter(tokenizer, [ids] * len(rows))
        for step in range(max(len(r) for r in rows)):
            printer(
                np.array([r[step] if step < len(r) else 0 for r in rows]),
                step,
                np.array([len(r) <= step + 1 for r in rows]),
            )
    else:
        printer = StreamPrinter(tokenizer, [r for r in prompts for _ in range(options["num_return_sequences"])])
        generator(prompts, on_tokens=printer, **options)
    printer.finish()
    s = generator.stats
    print(
        f"{s.new_tokens} tokens in {s.decode_s:.2f} s: {s.tokens_per_s:.1f} tokens/s "
        f"(batch {s.batch}; compile excluded) | compile {s.compile_s:.1f} s | prefill {1e3 * s.prefill_s:.0f} ms",
        file=sys.stderr,
    )
    return 0


def _read_start(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    path = Path(start.removeprefix("FILE:")).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JaxlmError(f"--start {start}: no such file {path}") from None
    except UnicodeDecodeError:
        raise JaxlmError(f"--start {start}: {path} is not UTF-8 text") from None


def _source(init_from: str, out_dir: str) -> str:
    if init_from != "resume":
        return init_from
    if not Path(out_dir).expanduser().exists():
        flag = "" if out_dir == "out" else f" --out-dir {out_dir}"
        raise JaxlmError(
            f"no training run in {out_dir}/: train one first with `python train.py{flag}`, "
            "or sample from another model with --init-from (gpt2, an HF directory, a jaxlm checkpoint)"
        )
    return out_dir


def _tokenizer(spec, config, source):
    if spec is None:  # a jaxlm checkpoint saved without a tokenizer
        if config.vocab_size < 50257:
            raise JaxlmError(f"{source} stores no tokenizer and is not GPT-2 sized; cannot encode the prompt")
        spec = {"kind": "gpt2"}
    tokenizer = from_spec(spec)
    if tokenizer.vocab_size > config.vocab_size:
        raise JaxlmError(
            f"{source}: its {tokenizer.name} tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size}"
        )
    return tokenizer


class StreamPrinter:
    """Prints sample 1 as its tokens arrive, then each next sample (its backlog first) once the one
    before has ended, so samples of one batch appear in order, separated as nanoGPT does."""

    def __init__(self, tokenizer, prompts, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.new = [[] for _ in prompts]
        self.shown = [0] * len(prompts)
        self.done = np.zeros(len(prompts), bool)
        self.prompts = prompts
        self.row = 0
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._start_row()

    def __call__(self, tokens_B, step, done_B):
        for b in np.flatnonzero(~self.done):
            self.new[b].append(int(tokens_B[b]))
        self.done |= done_B
        self._flush()

    def finish(self):
        self.done[:] = True
        self._flush()

    def _start_row(self):
        self.utf8.reset()
        self._write(self.prompts[self.row])

    def _write(self, ids):
        self.out.write(self.utf8.decode(self.tokenizer.decode_bytes(ids)))

    def _flush(self):
        while self.row < len(self.new):
            b = self.row
            self._write(self.new[b][self.shown[b] :])
            self.shown[b] = len(self.new[b])
            if not self.done[b]:
                break
            self.out.write(self.utf8.decode(b"", final=True) + "\n" + SEPARATOR + "\n")
            self.row += 1
            if self.row < len(self.new):
                self._start_row()
        self.out.flush()
