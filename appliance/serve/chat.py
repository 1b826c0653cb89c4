"""Chat prompts: the release's template (serving override, else the GGUF's own) rendered in
Jinja's immutable sandbox, so a hostile template cannot reach Python internals; a model
without a template falls back to one of llama.cpp's built-in templates."""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.errors import ApplianceError
from appliance.serve.engine import Engine

BUILTIN_FOR_ARCHITECTURE = {"gemma3": "gemma", "gemma2": "gemma", "gemma": "gemma"}
MAX_RENDERED_CHARS = 1 << 20


class ChatTemplateError(ApplianceError):
    """The chat template could not render these messages."""

    exit_code = 31


@dataclass(frozen=True)
class ChatFormatter:
    engine: Engine
    template: str | None  # Jinja source; None: llama.cpp's built-in template for the model

    def render(self, messages: list[tuple[str, str]]) -> str:
        if self.template is None:
            builtin = BUILTIN_FOR_ARCHITECTURE.get(self.engine.architecture, "chatml")
            return self.engine.apply_builtin_template(builtin, messages)
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_exception
        try:
            rendered = environment.from_string(self.template).render(
                messages=[{"role": r, "content": c} for r, c in messages],
                add_generation_prompt=True,
                bos_token=self.engine.special_token_text("bos"),
                eos_token=self.engine.special_token_text("eos"),
            )
        except (TemplateError, ValueError, TypeError) as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        if len(rendered) > MAX_RENDERED_CHARS:
            raise ChatTemplateError("chat template output is implausibly long")
        return rendered


def _raise_exception(message: str) -> None:
    raise ValueError(message)
