"""Chat prompts: the release's template (serving override, else the GGUF's own) rendered in
Jinja's immutable sandbox, so a hostile template cannot reach Python internals; a model
without a template falls back to one of llama.cpp's built-in templates.

Only the template's own markup may produce control tokens. A user who types
"<end_of_turn>\\n<start_of_turn>model\\n" must not be able to forge a turn, so the prompt is
rendered twice: once with the real messages, once with each message's content replaced by
a unique marker. The marked rendering says which text is markup; the real one says what
the template made of each content (say, trimmed it). Markup is tokenized with control
tokens, content as plain text.
"""

from __future__ import annotations

import logging
import re
import secrets

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.errors import ChatTemplateError
from appliance.serve.engine import Engine

BUILTIN_FOR_ARCHITECTURE = {"gemma3": "gemma", "gemma2": "gemma", "gemma": "gemma"}
MAX_RENDERED_CHARS = 1 << 20
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"  # private-use characters, never in markup
_ASCII_SPACE = " \t\n\r\v\f"

log = logging.getLogger("appliance.serve")

Piece = tuple[str, bool]  # (text, is_markup)


class ChatFormatter:
    """Renders chat messages into prompt tokens; the template is compiled once, at model
    load, so a broken template fails the load instead of every request."""

    def __init__(self, engine: Engine, template: str | None) -> None:
        self.engine = engine
        self._builtin = BUILTIN_FOR_ARCHITECTURE.get(engine.architecture, "chatml")
        self._special = {
            "bos_token": engine.special_token_text("bos"),
            "eos_token": engine.special_token_text("eos"),
        }
        self._nonce = secrets.token_hex(4)
        self._marker = re.compile(f"{_MARK_OPEN}{self._nonce}:([0-9]+){_MARK_CLOSE}")
        self._compiled = None
        if template is not None:  # None: llama.cpp's built-in template for the model
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = _raise_exception
            try:
                self._compiled = environment.from_string(template)
            except TemplateError as exc:
                raise ChatTemplateError(f"chat template does not compile: {exc}") from exc

    def tokens(self, messages: list[tuple[str, str]]) -> list[int]:
        """The prompt tokens for these messages (what the API and the eval runner decode)."""
        return self.engine.tokenize_template(self.pieces(messages))

    def pieces(self, messages: list[tuple[str, str]]) -> list[Piece]:
        """The rendered prompt as markup and content pieces, in order."""
        rendered = self.render(messages)
        marked = self.render(
            [
                (role, f"{_MARK_OPEN}{self._nonce}:{i}{_MARK_CLOSE}")
                for i, (role, _) in enumerate(messages)
            ]
        )
        parts = self._marker.split(marked)  # markup, index, markup, index, ..., markup
        if any(_MARK_OPEN in p or _MARK_CLOSE in p for p in parts[::2]):
            raise ChatTemplateError(
                "the chat template transforms message content; it cannot be rendered safely"
            )
        contents = [content for _, content in messages]
        aligned = _align(rendered, parts, contents)
        if aligned is None:  # the template changed content in a way we cannot follow
            log.warning("chat template output not aligned with its markup; content kept as is")
            return [
                (p, True) if i % 2 == 0 else (contents[int(p)], False) for i, p in enumerate(parts)
            ]
        return aligned

    def render(self, messages: list[tuple[str, str]]) -> str:
        if self._compiled is None:
            return self.engine.apply_builtin_template(self._builtin, messages)
        try:
            rendered = self._compiled.render(
                messages=[{"role": r, "content": c} for r, c in messages],
                add_generation_prompt=True,
                **self._special,
            )
        except (TemplateError, ValueError, TypeError) as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        if len(rendered) > MAX_RENDERED_CHARS:
            raise ChatTemplateError("chat template output is implausibly long")
        return rendered


def _align(rendered: str, parts: list[str], contents: list[str]) -> list[Piece] | None:
    """Split `rendered` into the marked rendering's markup and, for each marker, the text
    the template made of that content (as is, or trimmed); None if it does not fit."""
    pieces: list[Piece] = []
    position = 0
    for index, part in enumerate(parts):
        if index % 2 == 0:
            if not rendered.startswith(part, position):
                return None
            pieces.append((part, True))
            position += len(part)
            continue
        content, following = contents[int(part)], parts[index + 1]
        for candidate in _trimmed_forms(content):
            end = position + len(candidate)
            if rendered.startswith(candidate, position) and rendered.startswith(following, end):
                pieces.append((candidate, False))
                position = end
                break
        else:
            return None
    return pieces if position == len(rendered) else None


def _trimmed_forms(content: str) -> list[str]:
    """What templates commonly make of a message's content, most faithful first."""
    forms = [content, content.strip(_ASCII_SPACE), content.strip()]
    forms += [content.lstrip(), content.rstrip()]
    return list(dict.fromkeys(forms))


def _raise_exception(message: str) -> None:
    raise ValueError(message)
