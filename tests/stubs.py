"""Stub HTTP servers' handlers for tests: loopback endpoints that answer JSON."""

from __future__ import annotations

import json
import re
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import Any


class JsonEndpoint(BaseHTTPRequestHandler):
    """A loopback HTTP handler for stub servers: answers JSON, logs nothing."""

    def send_json(self, payload: dict, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


class StubTeacher(JsonEndpoint):
    """An OpenAI-compatible endpoint: answers by the patient's MMSE (the last one in the
    prompt: few-shot exemplars come first), and lists its model for the preflight."""

    def do_GET(self) -> None:
        self.send_json({"object": "list", "data": [{"id": "stub", "object": "model", "created": 0,
                                                "owned_by": "tests"}]})  # fmt: skip

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        scores = re.findall(r"score of (\d+)/30", request["messages"][-1]["content"])
        mmse = int(scores[-1]) if scores else 30
        letter = "A" if mmse < 24 else "B" if mmse < 28 else "C"
        self.send_json(
            {"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
             "choices": [{"index": 0, "finish_reason": "stop", "message": {
                 "role": "assistant", "content": f"The MMSE is {mmse}.\nFinal Diagnosis: ({letter})"}}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        )  # fmt: skip


class SlowStubTeacher(StubTeacher):
    """`StubTeacher` taking `delay_s` per answer, so a command is still generating when a
    test kills it at a random moment."""

    delay_s = 0.25

    def do_POST(self) -> None:
        time.sleep(self.delay_s)
        super().do_POST()


class S3Server:
    """A real S3-compatible HTTP server on loopback (moto). Its buckets live in this
    process, so `restart` brings it back on the same port with everything it held: what a
    user sees when MinIO or a proxy in front of S3 goes away for a while."""

    def __init__(self) -> None:
        with socket.socket() as sock:  # a free port, kept across restarts
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = self._start()

    def _start(self) -> Any:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        return server

    def stop(self) -> None:
        self._server.stop()

    def restart(self, down_s: float) -> None:
        """Down for `down_s` seconds (connections refused), then up again."""
        self.stop()
        time.sleep(down_s)
        self._server = self._start()
