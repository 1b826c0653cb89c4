"""The request bodies of the OpenAI-compatible API, validated by pydantic."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_TOKENS_LIMIT = 1_000_000


def _encodable(text: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which no UTF-8 tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text holds a lone surrogate; send valid Unicode") from exc
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    """What the answer must be. The release does not constrain its output to it; the
    routing policy checks the answer and escalates one that is not a JSON object."""

    model_config = ConfigDict(extra="allow")  # json_schema and the like reach a cold path

    type: Literal["text", "json_object", "json_schema"] = "text"

    @property
    def wants_json(self) -> bool:
        return self.type != "text"


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-1, le=2**63 - 1)
    stop: Text | list[Annotated[Text, Field(max_length=64)]] | None = Field(None, max_length=4)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # a llama.cpp extension, used by benchmarks
    response_format: ResponseFormat | None = None


class ChatRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)


class CompletionRequest(GenerationParams):
    prompt: Text | list[Text] = Field(min_length=0)
