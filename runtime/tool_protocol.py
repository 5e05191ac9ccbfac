"""The tool-calling parts of a chat request: tools, tool_choice, and the calls in an assistant message."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class FunctionDefinition(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(BaseModel):
    """tools[i]: a function the model may call."""

    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    """tool_choice naming one function: the model calls it."""

    model_config = _STRICT
    type: Literal["function"]
    function: _FunctionName


class _CallFunction(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    """One call in an assistant message of the history."""

    model_config = _STRICT
    id: str
    type: Literal["function"]
    function: _CallFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
