"""Docs that cannot drift: every relative link in README.md and docs/*.md resolves (files, and #anchors by
GitHub's heading slugs), and every `python train.py ...`, `python sample.py ...` and `python -m jaxlm.X ...`
line in their fenced code blocks parses with the command's real argument parser.

Commands map to their parsers through COMMANDS: a `python -m jaxlm.X` the table lacks fails, so a new
command gets registered here (and `test_every_command_is_registered` finds the ones no page mentions yet).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT, shared_cache  # noqa: F401  (one JAXLM_CACHE for the module)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = ("", "sh", "bash", "shell", "console")  # fenced blocks whose lines are commands (```text: not)
SEPARATORS = {"&&", "||", ";", "|", "&"}


# ---- the commands and their parsers --------------------------------------------------------------------------


def _train(argv: list[str]):
    """train.py: `--config PRESET` picks the defaults the other flags override; values validated by TrainConfig."""
    from jaxlm.config import DEFAULT_TRAIN_PRESET, TrainConfig

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=DEFAULT_TRAIN_PRESET)
    preset = pre.parse_known_args(argv)[0].config
    values = vars(_train_parser(preset).parse_args(argv))
    values.pop("config")
    TrainConfig(**values)  # the checks train.py makes before any work (--dataset required, n_embd % n_head, ...)


@functools.cache
def _train_parser(preset: str) -> argparse.ArgumentParser:
    from jaxlm.train.flags import train_arg_parser

    return train_arg_parser(preset)


@functools.cache
def _parser(name: str) -> argparse.ArgumentParser:
    if name == "sample":
        from jaxlm.generation.cli import build_parser
    elif name == "data":
        from jaxlm.data.cli import build_parser
    elif name == "eval":
        from jaxlm.eval.cli import build_parser
    elif name == "convert":
        from jaxlm.io.convert import build_parser
    elif name == "serve":
        from jaxlm.serve.cli import build_parser
    return build_parser()


# How each command's argv is parsed, as its main() parses it. `python -m jaxlm.X` commands are keyed "jaxlm.X".
COMMANDS = {
    "train.py": _train,
    "sample.py": lambda argv: _parser("sample").parse_args(argv),
    "jaxlm.data": lambda argv: _parser("data").parse_args(argv),
    "jaxlm.eval": lambda argv: _parser("eval").parse_intermixed_args(argv),
    "jaxlm.convert": lambda argv: _parser("convert").parse_args(argv),
    "jaxlm-convert": lambda argv: _parser("convert").parse_args(argv),  # the installed entry point
    "jaxlm.serve": lambda argv: _parser("serve").parse_args(argv),
    "jaxlm.aot": lambda argv: _aot_args(argv),  # its own flags, then train.py's, validated as train.py does
}


def _aot_args(argv: list[str]):
    from jaxlm.aot.cli import parse_args

    return parse_args(argv)


# ---- finding them in the pages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    where: str  # FILE:LINE of the line the command starts on
    name: str  # a COMMANDS key, or "jaxlm.X" not in it
    argv: tuple[str, ...]
    text: str

    def __str__(self):
        return f"{self.where}: {self.text}"


def code_blocks(text: str):
    """(info string, [(line number, line)]) of each fenced code block (``` or ~~~, indented or not)."""
    block, fence, info = None, None, ""
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if block is None:
            m = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                block, fence, info = [], m.group(1), m.group(2).lower()
        elif stripped.startswith(fence) and not stripped[len(fence) :].strip():
            yield info, block
            block = None
        else:
            block.append((n, line))


def logical_lines(lines):
    """(first line number, text) of each shell line: backslash continuations joined with a space, and a quote
    left open (`--command='...` over several lines) joined with the lines that close it."""
    start, text = None, ""
    for n, line in lines:
        if start is None:
            start, text = n, ""
        if line.rstrip().endswith("\\") and not _open_quote(text + line.rstrip()[:-1]):
            text += line.rstrip()[:-1].strip() + " "
            continue
        text += line.strip() if not text.endswith("\n") else line
        if _open_quote(text):
            text += "\n"
            continue
        yield start, text
        start = None
    if start is not None:
        yield start, text


def _open_quote(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return True
    return False


def split_commands(line: str) -> list[list[str]]:
    """The shell words of each simple command on the line: `#` comments dropped, split at && || ; | &."""
    lexer = shlex.shlex(line.removeprefix("$ "), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current, redirect = [], [], False
    for word in lexer:
        if word in SEPARATORS:
            commands.append(current)
            current = []
        elif redirect:  # the file of `> FILE`
            redirect = False
        elif re.match(r"^\d*(>>?|<)", word):  # `> out.txt`, `2>err`, `<in`: the shell's, not the command's
            redirect = bool(re.fullmatch(r"\d*(>>?|<)", word))
        elif "\n" in word or "&&" in word:  # a script passed as one word (`--command='...'`, `bash -c "..."`)
            commands += split_commands(word.partition("=")[2] if word.startswith("--") else word)
            current.append(word)
        else:
            current.append(word)
    return [c for c in commands + [current] if c]


def command_of(words: list[str]) -> tuple[str, list[str]] | None:
    """(COMMANDS key or "jaxlm.X", argv) when `words` run one of jaxlm's commands; None otherwise."""
    while words and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]) or words[0] in ("time", "env")):
        words = words[1:]  # VAR=value prefixes, time
    if not words:
        return None
    if words[0] == "jaxlm-convert":
        return "jaxlm-convert", words[1:]
    if words[0] not in ("python", "python3") or len(words) < 2:
        return None
    if words[1] in ("train.py", "sample.py"):
        return words[1], words[2:]
    if words[1] == "-m" and len(words) > 2 and (words[2] == "jaxlm" or words[2].startswith("jaxlm.")):
        return words[2], words[3:]
    return None


def scripts_of(words: list[str]) -> list[str]:
    """Repository scripts a command runs (`python bench/x.py`, `python examples/hello.py`)."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    if len(words) > 1 and words[0] in ("python", "python3") and words[1].endswith(".py") and "/" in words[1]:
        return [words[1]]
    return []


def commands_in(path: Path, text: str | None = None) -> tuple[list[Command], list[tuple[str, str]]]:
    """(jaxlm commands, (where, script) for repository scripts) in the page's shell code blocks."""
    rel = path.relative_to(ROOT) if path.is_absolute() else path
    found, scripts = [], []
    for info, block in code_blocks(path.read_text() if text is None else text):
        if info not in SHELL_BLOCKS:
            continue
        for n, line in logical_lines(block):
            try:
                words_list = split_commands(line)
            except ValueError as e:  # unbalanced quotes
                raise AssertionError(f"{rel}:{n}: cannot split {line!r} into shell words: {e}") from None
            for words in words_list:
                hit = command_of(words)
                if hit:
                    found.append(Command(f"{rel}:{n}", hit[0], tuple(hit[1]), shlex.join(words)))
                scripts += [(f"{rel}:{n}", s) for s in scripts_of(words)]
    return found, scripts


def parse_error(command: Command) -> str | None:
    """None when the command's parser accepts its argv; else what the parser (or the config check) said."""
    if command.name not in COMMANDS:
        return f"unknown command {command.name!r}: register its parser in COMMANDS (tests/test_docs.py)"
    from jaxlm.errors import JaxlmError

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            COMMANDS[command.name](list(command.argv))
    except SystemExit as e:
        if e.code not in (0, None):  # --help exits 0
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    except JaxlmError as e:
        return f"error: {e}"
    return None


# ---- links ------------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def prose_lines(text: str, blank_code: bool = True):
    """(line number, line) outside fenced code blocks, inline code spans blanked unless not `blank_code`."""
    in_block, fence = False, None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        m = re.match(r"(`{3,}|~{3,})", stripped)
        if not in_block and m:
            in_block, fence = True, m.group(1)
            continue
        if in_block:
            if stripped.startswith(fence) and not stripped[len(fence) :].strip():
                in_block = False
            continue
        yield n, re.sub(r"(`+)(.+?)\1", lambda s: " " * len(s.group(0)), line) if blank_code else line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but - and _ removed, spaces -> -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(
        ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN" or unicodedata.category(ch) == "Mn"
    )
    return kept.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """Every #anchor a link into `path` may use: heading slugs (repeats numbered -1, -2, ...) and <a name/id>."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(), blank_code=False):
        m = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
        out.update(HTML_ANCHOR.findall(line))
    return frozenset(out)


def links_in(path: Path):
    """(line number, target) of every markdown link and reference definition outside code."""
    for n, line in prose_lines(path.read_text()):
        for m in LINK.finditer(line):
            yield n, m.group(1)
        m = REFERENCE.match(line)
        if m:
            yield n, m.group(1)


def broken_link(page: Path, target: str, root: Path = ROOT) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
        return None  # http:, https:, mailto:: not checked here
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.exists():
        return f"{path_part} does not exist"
    if root.resolve() not in dest.parents and dest != root.resolve():
        return f"{path_part} is outside the repository"
    if anchor:
        if dest.suffix != ".md":
            return None  # #L10 line anchors of source files: GitHub's, not checked
        if anchor not in anchors(dest):
            return f"no heading with anchor #{anchor} in {dest.relative_to(root.resolve())}"
    return None


# ---- tests --------------------------------------------------------------------------------------------------------


def test_the_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert "README.md" in names and "docs/scaling.md" in names
    assert len(PAGES) >= 3


def test_every_relative_link_resolves():
    broken, count = [], 0
    for page in PAGES:
        for n, target in links_in(page):
            count += 1
            why = broken_link(page, target)
            if why:
                broken.append(f"{page.relative_to(ROOT)}:{n}: ({target}) {why}")
    assert count > 20  # the pages link to each other; a broken link finder would find none
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_command_line_parses():
    commands = [c for page in PAGES for c in commands_in(page)[0]]
    # The front door shows each command at least once, so an extractor that finds nothing fails here.
    assert {"train.py", "sample.py", "jaxlm.data", "jaxlm.eval", "jaxlm.convert"} <= {c.name for c in commands}
    failures = [f"{c}\n    -> {why}" for c in commands if (why := parse_error(c))]
    assert not failures, f"{len(failures)} of {len(commands)} command lines do not parse:\n" + "\n".join(failures)


def test_every_script_named_exists():
    missing = [f"{where}: {s}" for page in PAGES for where, s in commands_in(page)[1] if not (ROOT / s).is_file()]
    assert not missing, "scripts that do not exist:\n" + "\n".join(missing)


def test_every_command_is_registered():
    """Each `python -m jaxlm.X` the package provides (a __main__.py, or a module run as __main__) is in COMMANDS."""
    runnable = set()
    for p in (ROOT / "jaxlm").rglob("*.py"):
        module = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        if p.name == "__main__.py":
            runnable.add(module.removesuffix(".__main__"))
        elif p.name != "__init__.py" and 'if __name__ == "__main__":' in p.read_text():
            runnable.add(module)
    # jaxlm.io.convert is the implementation behind `python -m jaxlm.convert`, which is what users type.
    runnable.discard("jaxlm.io.convert")
    assert runnable, "found no runnable jaxlm modules"
    assert not runnable - set(COMMANDS), f"register these commands' parsers in COMMANDS: {runnable - set(COMMANDS)}"


def test_every_public_name_is_documented():
    """Each name `import jaxlm` exports appears in docs/python-api.md (as `name` or `name(...)`)."""
    import jaxlm

    page = (ROOT / "docs" / "python-api.md").read_text()
    missing = [n for n in jaxlm.__all__ if not re.search(rf"`(jaxlm\.)?{re.escape(n)}[`(\[ ]", page)]
    assert not missing, f"document these in docs/python-api.md: {missing}"


# The extraction itself, on lines shaped like the pages' (a finder that finds nothing would pass the tests above).
SNIPPET = """
Text with `python train.py --not-a-flag` in an inline span, which is prose, not a command.

```
python train.py --n-layer 6 --n_embd=192 \\
    --max-iters 5000   # a comment --bogus
JAX_PLATFORMS=cpu python sample.py --init-from gpt2 && python -m jaxlm.eval SRC --task lambada
python -m jaxlm.data prepare SRC OUT > log.txt; python bench/bench_train.py --case default 2>err
python -m jaxlm.nothing here
ssh pod --command='
  cd jaxlm && python train.py --mesh data=16 --config gpt2-124m --dataset DIR'
```

```python
print("python train.py --bogus")
```
"""


def test_extraction_on_a_snippet():
    found, scripts = commands_in(Path("snippet.md"), SNIPPET)
    assert [(c.where.split(":")[1], c.name, c.argv) for c in found] == [
        ("5", "train.py", ("--n-layer", "6", "--n_embd=192", "--max-iters", "5000")),
        ("7", "sample.py", ("--init-from", "gpt2")),
        ("7", "jaxlm.eval", ("SRC", "--task", "lambada")),
        ("8", "jaxlm.data", ("prepare", "SRC", "OUT")),
        ("9", "jaxlm.nothing", ("here",)),
        ("10", "train.py", ("--mesh", "data=16", "--config", "gpt2-124m", "--dataset", "DIR")),
    ]
    assert [s for _, s in scripts] == ["bench/bench_train.py"]
    assert [parse_error(c) is None for c in found] == [True, True, True, True, False, True]
    bad = Command("x:1", "train.py", ("--n-layer", "four"), "")
    assert "invalid int value: 'four'" in parse_error(bad)
    assert "unrecognized arguments: --bogus" in parse_error(Command("x:1", "sample.py", ("--bogus",), ""))
    assert "n_embd (100) must be divisible by n_head (3)" in parse_error(
        Command("x:1", "train.py", ("--n-embd", "100", "--n-head", "3"), "")
    )


def test_slugs_follow_githubs_rules(tmp_path):
    assert slug("Use it from Python") == "use-it-from-python"
    assert slug("Train from Python: `jaxlm.train`") == "train-from-python-jaxlmtrain"
    assert slug("CPU cores as devices (train/runtime.py)") == "cpu-cores-as-devices-trainruntimepy"
    assert slug("Prompt/completion data") == "promptcompletion-data"
    page = tmp_path / "p.md"
    page.write_text("# Title\n## Notes\n## Notes\n```\n## not a heading\n```\n[a](#notes-1) [b](q.md)\n")
    assert anchors(page) == {"title", "notes", "notes-1"}
    assert broken_link(page, "#notes-1", tmp_path) is None
    assert "does not exist" in broken_link(page, "q.md", tmp_path)
    assert "no heading" in broken_link(page, "#not-a-heading", tmp_path)
    assert "outside the repository" in broken_link(page, "../", tmp_path)


# ---- the README's Python example runs ---------------------------------------------------------------------------


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's first Python block, on a random-init GPT-2-vocabulary HF directory instead of the hub's gpt2
    (written by jaxlm.to_hf, which tests/test_hf.py holds to transformers: no torch import here)."""
    import jax

    import jaxlm

    blocks = [b for info, b in code_blocks((ROOT / "README.md").read_text()) if info == "python"]
    assert blocks, "README.md has no python example"
    code = "\n".join(line for _, line in blocks[0])
    assert 'jaxlm.load("gpt2")' in code
    config = jaxlm.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
    jaxlm.to_hf(config, jaxlm.init_params(config, jax.random.key(0)), tmp_path / "tiny")
    code = code.replace('jaxlm.load("gpt2")', f'jaxlm.load("{tmp_path / "tiny"}")')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXLM_NATIVE", "0")  # the API is under test here, not the kernels: no C++ build
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "ft" / "jaxlm.json").is_file()
    assert (tmp_path / "ft-peft" / "adapter_config.json").is_file()
    assert (tmp_path / "ft-hf" / "model.safetensors").is_file()
