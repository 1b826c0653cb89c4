"""Chat prompts: the release's template (serving override, else the GGUF's own) rendered in
Jinja's immutable sandbox, so a hostile template cannot reach Python internals; a model
without a template falls back to one of llama.cpp's built-in templates."""

from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.errors import ApplianceError
from appliance.serve.engine import Engine

BUILTIN_FOR_ARCHITECTURE = {"gemma3": "gemma", "gemma2": "gemma", "gemma": "gemma"}
MAX_RENDERED_CHARS = 1 << 20


class ChatTemplateError(ApplianceError):
    """The chat template could not render these messages."""

    exit_code = 31


class ChatFormatter:
    """Renders chat messages into a prompt; the template is compiled once, at model load,
    so a broken template fails the load instead of every request."""

    def __init__(self, engine: Engine, template: str | None) -> None:
        self.engine = engine
        self._builtin = BUILTIN_FOR_ARCHITECTURE.get(engine.architecture, "chatml")
        self._special = {
            "bos_token": engine.special_token_text("bos"),
            "eos_token": engine.special_token_text("eos"),
        }
        self._compiled = None
        if template is not None:  # None: llama.cpp's built-in template for the model
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = _raise_exception
            try:
                self._compiled = environment.from_string(template)
            except TemplateError as exc:
                raise ChatTemplateError(f"chat template does not compile: {exc}") from exc

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


def _raise_exception(message: str) -> None:
    raise ValueError(message)
