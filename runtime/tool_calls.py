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
            calls.append({"id": _call_id(), "type": "function",
                          "function": {"name": body["name"],
                                       "arguments": json.dumps(body.get("arguments", {}), ensure_ascii=False)}})
    if not calls:
        return text, []
    content = _CALL.sub("", text).strip()
    return content or None, calls


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def held_back(text: str) -> int:
    """How many trailing characters of streamed text may begin a call (held back until it is known)."""
    start = text.find(OPEN)
    if start >= 0:
        return len(text) - start
    return _marker_start(text, OPEN)


def _marker_start(text: str, marker: str) -> int:
    """The length of text's longest ending that begins marker (0 if none)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


class StreamParser:
    """A streamed choice's text split into content deltas and tool-call deltas, as vLLM's Hermes parser streams
    them: a call's first delta carries its id, type and name (once `{"name": ..., "arguments": ` has arrived),
    later ones fragments of its arguments text, which concatenate to the arguments JSON. Text that may begin a
    call is held back. A call whose body does not start with its name is sent whole at its </tool_call>, and a
    malformed one stays text (it could not be streamed before it was known)."""

    def __init__(self):
        self.buffer, self.num_calls = "", 0
        self._call: str | None = None  # the open call's text after <tool_call>, None outside a call
        self._args_from = None  # where its arguments begin in _call, once its first delta went out
        self._args_sent = 0

    def feed(self, text: str, final: bool) -> tuple[str, list[dict]]:
        """(content to send now, tool-call deltas to send now, each with its `index`)."""
        self.buffer += text
        content, deltas = "", []
        while True:
            if self._call is None:
                start = self.buffer.find(OPEN)
                if start < 0:
                    break
                content += self.buffer[:start]
                self._call, self.buffer = "", self.buffer[start + len(OPEN):]
            self._call += self.buffer
            self.buffer = ""
            end = self._call.find(CLOSE)
            if end < 0:
                deltas += self._open_call_deltas(self._call, _ready(self._call))
                break
            content += self._close_call(end, deltas)
        if self._call is None:
            keep = 0 if final else held_back(self.buffer)
            content += self.buffer[:len(self.buffer) - keep]
            self.buffer = self.buffer[len(self.buffer) - keep:]
        elif final:  # the text ended inside a call (max_tokens)
            deltas += self._open_call_deltas(self._call, len(self._call))
            if self._args_from is None:
                content += OPEN + self._call
            self._call = None
        return ("" if self.num_calls and not content.strip() else content), deltas

    def _open_call_deltas(self, call: str, ready: int) -> list[dict]:
        """The call's header once its name is known, then its arguments text up to `ready` in `call`."""
        deltas = []
        if self._args_from is None:
            match = _HEADER.match(call)
            if match is None:
                return []
            self._args_from = match.end()
            deltas.append({"index": self.num_calls, "id": _call_id(), "type": "function",
                           "function": {"name": json.loads(match.group(1)), "arguments": ""}})
            self.num_calls += 1
        if ready > self._args_from + self._args_sent:
            deltas.append({"index": self.num_calls - 1,
                           "function": {"arguments": call[self._args_from + self._args_sent:ready]}})
            self._args_sent = ready - self._args_from
        return deltas

    def _close_call(self, end: int, deltas: list[dict]) -> str:
        """Finish the open call at its </tool_call> (at `end` in _call); returns what becomes content."""
        body, self.buffer = self._call[:end], self._call[end + len(CLOSE):] + self.buffer
        content = ""
        whole = body.rstrip()
        if whole.endswith("}"):  # the rest of its arguments, less the body's own closing brace
            deltas += self._open_call_deltas(body, len(whole[:-1].rstrip()))
        if self._args_from is None:
            _, parsed = parse(OPEN + body + CLOSE)
            for call in parsed:
                deltas.append({"index": self.num_calls, **call})
                self.num_calls += 1
            if not parsed:
                content = OPEN + body + CLOSE  # a malformed call stays text
        self._call, self._args_from, self._args_sent = None, None, 0
        return content


def _ready(call: str) -> int:
    """How much of an open call's text can be sent: all but trailing whitespace, a trailing `}` (it may close the
    call's body, not its arguments) and a trailing prefix of </tool_call>."""
    call = call[:len(call) - _marker_start(call, CLOSE)].rstrip()
    return len(call) - 1 if call.endswith("}") else len(call)
