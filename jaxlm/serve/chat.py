"""Chat messages to one prompt. GPT-2 has no chat template; the built-in one is plain text, one turn a line:

    System: You are terse.
    User: Hello!
    Assistant:

and the reply ends where the model starts the next user turn ("\\nUser:", an implicit stop string) or at
<|endoftext|>. `--chat-template FILE` replaces it with a Jinja2 template in Hugging Face's convention
(`messages` with `role` and `content`, `add_generation_prompt`, `bos_token`, `eos_token`), rendered in
Jinja2's sandbox as transformers renders chat templates; a file template has no implicit stop.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import JaxlmError
from ..tokenizer import EOT

PLAIN = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOPS = ["\nUser:"]


class ChatTemplate:
    def __init__(self, path: str | None = None):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if path is None:
            source, self.stops, self.name = PLAIN, list(PLAIN_STOPS), "plain"
        else:
            try:
                source = Path(path).expanduser().read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise JaxlmError(f"--chat-template {path}: cannot read it ({e})") from None
            self.stops, self.name = [], str(path)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise JaxlmError(f"--chat-template {path}: not a valid Jinja2 template ({e})") from None

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages` ([{"role", "content"}]); a template error is a ValueError (a 400)."""
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, bos_token=EOT, eos_token=EOT)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from None
