"""Tool calling: tools rendered into the prompt, the model's calls parsed out of its text, and a required or
named tool_choice enforced by a grammar (so the arguments always validate against the function's parameters).

The call format is Hermes' (Qwen2.5, SmolLM3, Hermes models): `<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>`. A chat template that reads `tools` renders them itself; for one that does not (as
SmolLM2's), llmc's default rendering, documented in docs/serving.md, adds the tools to the system message and
writes earlier calls and tool results in the same format.
"""

from __future__ import annotations

import json
import re
import uuid

from llmc.errors import RequestError
from llmc.runtime.sequence import StructuredOutput

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def default_rendering(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The conversation for a template without tool support: the tools (if any) in the system message,
    assistant calls as <tool_call> blocks, tool results as user turns in <tool_response> blocks."""
    out = []
    if tools:
        system = _SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] in ("system", "developer"):
            system = f"{messages[0]['content']}\n\n{system}"
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = [f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _arguments(c)})}\n{CLOSE}"
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m["content"], *calls]))})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def _arguments(call: dict):
    try:
        return json.loads(call["function"]["arguments"])
    except ValueError:
        return call["function"]["arguments"]


def call_constraint(tools: list[dict], name: str | None) -> StructuredOutput:
    """A grammar for exactly one call: of the function `name`, or of any of the tools (tool_choice required)."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise RequestError(f"tool_choice: no tool named {name!r} in tools", "tool_choice")
    schema = {"anyOf": [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for t in chosen],
        "x-guidance": {"whitespace_flexible": False}}
    lark = f"start: {json.dumps(OPEN + chr(10))} call {json.dumps(chr(10) + CLOSE)}\ncall: %json {json.dumps(schema)}"
    return StructuredOutput("grammar", lark)


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a model's text: each well-formed <tool_call> block becomes a call (id, name,
    arguments as a JSON string); the rest is the content (None when nothing else was said)."""
    calls = []
    for match in _CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except ValueError:
            continue
        if isinstance(body, dict) and isinstance(body.get("name"), str):
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": body["name"],
                                       "arguments": json.dumps(body.get("arguments", {}), ensure_ascii=False)}})
    if not calls:
        return text, []
    content = _CALL.sub("", text).strip()
    return content or None, calls


def held_back(text: str) -> int:
    """How many trailing characters of streamed text may begin a call (held back until it is known)."""
    start = text.find(OPEN)
    if start >= 0:
        return len(text) - start
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0


class StreamParser:
    """A streamed choice's text split into content deltas and completed calls (each call whole, in one delta)."""

    def __init__(self):
        self.buffer, self.num_calls = "", 0

    def feed(self, text: str, final: bool) -> tuple[str, list[dict]]:
        """(content to send now, calls completed now, with their `index`); text that may begin a call waits."""
        self.buffer += text
        content, calls = "", []
        while (start := self.buffer.find(OPEN)) >= 0 and (end := self.buffer.find(CLOSE, start)) >= 0:
            end += len(CLOSE)
            _, parsed = parse(self.buffer[start:end])
            content += self.buffer[:start] if parsed else self.buffer[:end]  # a malformed call stays text
            for call in parsed:
                calls.append({"index": self.num_calls, **call})
                self.num_calls += 1
            self.buffer = self.buffer[end:]
        keep = 0 if final else held_back(self.buffer)
        content += self.buffer[:len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return ("" if self.num_calls and not content.strip() else content), calls
