"""A real local HTTP server speaking the OpenAI chat-completions protocol, for the judge tests.

``StubServer(answer)`` listens on 127.0.0.1 (a free port) in a background thread. Every
``POST /v1/chat/completions`` is recorded (body, headers) and answered by ``answer(request,
n)`` where ``n`` counts requests from 0; the answer is either the assistant's text or a
``Reply(status, text, headers, delay)`` for errors, throttling and slow responses.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    text: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Answer = Callable[[dict[str, Any], int], "str | Reply"]


@dataclass
class Seen:
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def prompt(self) -> str:
        """The last (user) message."""
        return self.body["messages"][-1]["content"]


class StubServer:
    """OpenAI-compatible chat endpoint with scripted answers; use as a context manager."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def hits(self) -> int:
        return len(self.requests)

    def __enter__(self) -> StubServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with stub._lock:
                    n = len(stub.requests)
                    stub.requests.append(Seen(body, dict(self.headers.items())))
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    if self.path != "/v1/chat/completions":
                        self._send(Reply(404, "unknown path"))
                        return
                    answer = stub.answer(body, n)
                    self._send(answer if isinstance(answer, Reply) else Reply(text=answer))
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

            def _send(self, reply: Reply) -> None:
                time.sleep(reply.delay)
                if reply.status == 200:
                    payload = _completion(reply.text)
                else:
                    payload = {"error": {"message": reply.text or "error", "type": "stub"}}
                data = json.dumps(payload).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "model": "stub",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 90, "completion_tokens": 10, "total_tokens": 100},
    }
