"""Prompt templates: a JSONL row -> (prompt, completion) text, shared by fine-tuning data and task scoring.

One module for both so that a model fine-tuned on `summarize` pairs is scored on the very prompt it was
trained on. The built-ins follow GPT-2's paper ("TL;DR:", "Q: A:") and lm-evaluation-harness's GPT-3-style
translation prompt ("English phrase: ...\nGerman phrase:").

GPT-2's BPE attaches a space to the word after it (" The" is one token), so a prompt ending in a space
tokenizes differently alone than in front of its completion: with `{document}\nTL;DR: ` -> `{summary}`
every example would be a prompt/prefix mismatch. The built-ins therefore end the prompt at ":" and start
the completion with the space (`{document}\nTL;DR:` -> ` {summary}`); generation strips it again.

Custom templates: "PROMPT=>COMPLETION" with `{field}` names of the row's string fields; `\\n` and `\\t`
in the string stand for a newline and a tab (so shell quoting stays simple), `{{`/`}}` for literal braces.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from ..errors import JaxlmError

SEPARATOR = "=>"
LANGUAGES = {
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "fr": "French",
    "ha": "Hausa",
    "is": "Icelandic",
    "ja": "Japanese",
    "ru": "Russian",
    "zh": "Chinese",
}


@dataclass(frozen=True)
class Template:
    """Two `str.format` strings over a row's fields; `name` is a built-in's name or "custom"."""

    name: str
    prompt: str
    completion: str

    def fields(self) -> list[str]:
        return list(dict.fromkeys(_field_names(self.prompt) + _field_names(self.completion)))

    def render(self, row: dict, where: str) -> tuple[str, str]:
        """(prompt, completion) for `row`; `where` ("FILE line N") starts any error."""
        values = _derived(self.name, row, where)
        for name in self.fields():
            value = values.get(name)
            if not isinstance(value, str):
                what = "has no field" if name not in values else f"has a non-string field ({type(value).__name__})"
                raise JaxlmError(
                    f"{where} {what} {name!r}, which --template {self.name} needs "
                    f"(fields used: {', '.join(self.fields())}); fix the row or the template"
                )
        return self.prompt.format_map(values), self.completion.format_map(values)


BUILTIN = {
    "summarize": Template("summarize", "{document}\nTL;DR:", " {summary}"),
    "translate": Template("translate", "{src_name} phrase: {source}\n{tgt_name} phrase:", " {reference}"),
    "qa": Template("qa", "{context}\nQ: {question}\nA:", " {answer}"),
}
_QA_CLOSED_BOOK = Template("qa", "Q: {question}\nA:", " {answer}")


def parse(spec: str) -> Template:
    """A built-in name (summarize, translate, qa) or a custom "PROMPT=>COMPLETION" string."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if SEPARATOR not in spec:
        raise JaxlmError(
            f"--template {spec!r} is neither {', '.join(BUILTIN)} nor a custom 'PROMPT=>COMPLETION' string "
            "(e.g. 'Question: {question}\\nAnswer:=> {answer}')"
        )
    prompt, completion = spec.replace("\\n", "\n").replace("\\t", "\t").split(SEPARATOR, 1)
    t = Template("custom", prompt, completion)
    for part in (prompt, completion):
        _field_names(part)  # raises on a malformed part
    if not _field_names(completion):
        raise JaxlmError(f"--template {spec!r}: the completion part names no {{field}}; every example would be equal")
    return t


def for_row(template: Template, row: dict) -> Template:
    """The closed-book qa form for rows without a context (NQ-Open); otherwise `template` itself."""
    return _QA_CLOSED_BOOK if template is BUILTIN["qa"] and "context" not in row else template


def _field_names(fmt: str) -> list[str]:
    try:
        parts = list(string.Formatter().parse(fmt))
    except ValueError as e:
        raise JaxlmError(f"template {fmt!r} is malformed ({e}); use {{name}}, braces as {{{{ }}}}") from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise JaxlmError(f"template field {{{name}}} in {fmt!r} is not a plain field name; use {{name}}")
        names.append(name)
    return names


def _derived(name: str, row: dict, where: str) -> dict:
    """The row plus the fields a built-in derives: language names, the first answer."""
    if name == "translate":
        out = dict(row)
        for code, named in (("src_lang", "src_name"), ("tgt_lang", "tgt_name")):
            if isinstance(row.get(code), str):
                out[named] = LANGUAGES.get(row[code], row[code])
        return out
    if name == "qa":
        answers = row.get("answers")
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise JaxlmError(f"{where} needs 'answers', a non-empty list of strings, for --template qa")
        return {**row, "answer": answers[0]}
    return row
