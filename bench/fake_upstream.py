"""A fast fake engine replica speaking the vLLM OpenAI protocol (its own process).

Raw asyncio + httptools, HTTP/1.1 keep-alive, so it answers in microseconds and the gateway's
overhead can be measured against it. Used by ``bench/gateway_overhead.py`` and by the gateway's
routing/failover tests (it is a fake for the logic *around* an engine, never for model output).

- ``GET /health``; ``GET /v1/models`` (base ``fake-base`` with ``max_model_len``, plus loaded
  adapters with ``parent``)
- ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` (400 when already loaded /
  404 when missing, like vLLM); ``--load-delay`` seconds per load
- ``POST /v1/chat/completions`` and ``/v1/completions``: 404 for a model that is neither the base
  nor loaded; the answer's text is ``"<replica>|<model>|<x-request-id>"``; usage 5 in, 3 out.
  Streaming sends a fixed SSE stream (role, 3 content chunks, finish, usage when asked, [DONE]).
  A prompt containing ``FAIL_MIDSTREAM`` makes the stream break after two chunks; ``SLOW`` makes
  it send 100 chunks 0.1 s apart (to observe client-disconnect aborts).
- ``--full-usage``: usage as an engine that always runs to its limit would report it (the
  quota tests): prompt tokens = UTF-8 bytes of the prompt (+4 per message; token ids count as
  they are), completion tokens = ``max_completion_tokens`` or ``max_tokens`` (vLLM's precedence;
  16 on /v1/completions; the room left in ``--max-model-len`` when neither is set), times ``n``.
- ``GET /fake/stats``: loads per adapter, peak concurrent loads per adapter, requests, aborted
  streams, last request id.

Run: ``python bench/fake_upstream.py --port 9001 --name r1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httptools

BASE = "fake-base"


class Fake:
    def __init__(self, name: str, load_delay_s: float, max_model_len: int = 2048,
                 full_usage: bool = False) -> None:
        self.name = name
        self.max_model_len = max_model_len
        self.full_usage = full_usage
        self.load_delay_s = load_delay_s
        self.adapters: dict[str, str] = {}
        self.loads: dict[str, int] = {}
        self.loading_now: dict[str, int] = {}
        self.peak_loading: dict[str, int] = {}
        self.requests = 0
        self.aborted = 0
        self.last_request_id: str | None = None


def _response(status: int, body: bytes, ctype: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
            % (status, reason, ctype, len(body))) + body


def _error(status: int, message: str) -> bytes:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": status}}
    return _response(status, json.dumps(body).encode())


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Conn(asyncio.Protocol):
    def __init__(self, fake: Fake) -> None:
        self.fake = fake
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None and not self.streaming.done():
            self.streaming.cancel()
            self.fake.aborted += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        f = self.fake
        if method == b"GET":
            if path == b"/health":
                self.transport.write(_response(200, b"{}"))
            elif path == b"/v1/models":
                data = [{"id": BASE, "object": "model", "parent": None, "root": BASE,
                         "max_model_len": f.max_model_len}]
                data += [{"id": k, "object": "model", "parent": BASE, "root": v}
                         for k, v in f.adapters.items()]
                self.transport.write(_response(200, json.dumps(
                    {"object": "list", "data": data}).encode()))
            elif path == b"/fake/stats":
                self.transport.write(_response(200, json.dumps({
                    "name": f.name, "loads": f.loads, "peak_loading": f.peak_loading,
                    "requests": f.requests, "aborted_streams": f.aborted,
                    "adapters": sorted(f.adapters), "last_request_id": f.last_request_id,
                }).encode()))
            else:
                self.transport.write(_error(404, "no such path"))
            return
        try:
            body = json.loads(b"".join(self.body) or b"{}")
        except ValueError:
            self.transport.write(_error(400, "invalid JSON"))
            return
        if path == b"/v1/load_lora_adapter":
            asyncio.ensure_future(self._load(body))
        elif path == b"/v1/unload_lora_adapter":
            if f.adapters.pop(body.get("lora_name"), None) is None:
                self.transport.write(_error(404, "adapter not loaded"))
            else:
                self.transport.write(_response(200, b'"Success"', b"text/plain"))
        elif path in (b"/v1/chat/completions", b"/v1/completions"):
            self._complete(path, body)
        else:
            self.transport.write(_error(404, "no such path"))

    async def _load(self, body: dict[str, Any]) -> None:
        f = self.fake
        name = body.get("lora_name")
        if not isinstance(name, str) or not body.get("lora_path"):
            self.transport.write(_error(400, "lora_name and lora_path are required"))
            return
        if name in f.adapters:
            self.transport.write(_error(400, f"The lora adapter '{name}' has already been loaded."))
            return
        f.loading_now[name] = f.loading_now.get(name, 0) + 1
        f.peak_loading[name] = max(f.peak_loading.get(name, 0), f.loading_now[name])
        try:
            if f.load_delay_s:
                await asyncio.sleep(f.load_delay_s)
            f.adapters[name] = str(body["lora_path"])
            f.loads[name] = f.loads.get(name, 0) + 1
        finally:
            f.loading_now[name] -= 1
        self.transport.write(_response(200, b'"Success"', b"text/plain"))

    def _complete(self, path: bytes, body: dict[str, Any]) -> None:
        f = self.fake
        f.requests += 1
        model = body.get("model")
        rid = self.headers.get(b"x-request-id", b"").decode()
        f.last_request_id = rid
        if model != BASE and model not in f.adapters:
            self.transport.write(_error(404, f"The model `{model}` does not exist."))
            return
        text = f"{f.name}|{model}|{rid}"
        chat = path == b"/v1/chat/completions"
        usage = (_full_usage(body, chat, f.max_model_len) if f.full_usage else
                 {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})
        if not body.get("stream"):
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant",
                                                              "content": text},
                                       "finish_reason": "stop"} if chat else
                                      {"index": 0, "text": text, "finish_reason": "stop"})
            out = {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
                   "created": 0, "model": model, "choices": [choice], "usage": usage}
            self.transport.write(_response(200, json.dumps(out).encode()))
            return
        prompt = json.dumps(body.get("messages") or body.get("prompt") or "")
        self.streaming = asyncio.ensure_future(self._stream(chat, model, text, usage, body,
                                                            prompt))

    async def _stream(self, chat: bool, model: Any, text: str, usage: dict[str, int],
                      body: dict[str, Any], prompt: str) -> None:
        w = self.transport.write
        w(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
          b"transfer-encoding: chunked\r\n\r\n")
        obj = "chat.completion.chunk" if chat else "text_completion"

        def ev(choices: list[Any], extra: dict[str, Any] | None = None) -> bytes:
            d = {"id": "cmpl-fake", "object": obj, "created": 0, "model": model,
                 "choices": choices, **(extra or {})}
            return _chunk(b"data: " + json.dumps(d).encode() + b"\n\n")

        def piece(s: str, finish: str | None = None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": s} if s else {},
                        "finish_reason": finish}
            return {"index": 0, "text": s, "finish_reason": finish}

        if chat:
            w(ev([{"index": 0, "delta": {"role": "assistant", "content": ""},
                   "finish_reason": None}]))
        parts = [text[i:i + 8] for i in range(0, len(text), 8)] or [""]
        if "SLOW" in prompt:
            parts = ["x"] * 100
        for i, part in enumerate(parts):
            if "FAIL_MIDSTREAM" in prompt and i == 2:
                self.transport.abort()  # no terminating chunk: the client sees a broken stream
                return
            w(ev([piece(part)]))
            if "SLOW" in prompt:
                await asyncio.sleep(0.1)
        w(ev([piece("", "stop")]))
        if (body.get("stream_options") or {}).get("include_usage"):
            w(ev([], {"usage": usage}))
        w(_chunk(b"data: [DONE]\n\n"))
        w(b"0\r\n\r\n")


def _full_usage(body: dict[str, Any], chat: bool, max_model_len: int) -> dict[str, int]:
    def size(v: Any) -> int:
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, list):
            return sum(1 if isinstance(x, int) else size(x) for x in v)
        if isinstance(v, dict):
            return size(v.get("content")) + size(v.get("text"))
        return 0

    if chat:
        messages = body.get("messages") or []
        prompt = size(messages) + 4 * len(messages)
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
    else:
        prompt = size(body.get("prompt"))
        asked = body.get("max_tokens", 16)
    room = max(0, max_model_len - prompt)
    completion = (room if asked is None else min(int(asked), room)) * int(body.get("n") or 1)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="fake")
    ap.add_argument("--load-delay", type=float, default=0.0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--full-usage", action="store_true")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    fake = Fake(args.name, args.load_delay, args.max_model_len, args.full_usage)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Conn(fake), "127.0.0.1", args.port,
                                          backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
