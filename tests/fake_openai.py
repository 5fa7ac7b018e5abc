"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for the tests, and for trying lit-embed-generate by
hand (``python tests/fake_openai.py --port 8765``).

It answers ``POST .../chat/completions`` with questions made from the chunk in the prompt (the text between the two
``-----`` lines of LlamaIndex's prompt, or the whole prompt), numbered and wrapped in chatter as real models do.
A chunk holding a marker of ``behaviours`` gets, request after request, the behaviours listed for it: slow answers,
429s with Retry-After, 500s, malformed bodies, and answers the quality filters should drop. Every request is logged.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BEHAVIOURS = ("ok", "slow", "429", "500", "malformed", "no_choices", "copy", "short", "same", "vague", "401")
_SEPARATOR = "---------------------\n"


def chunk_of(prompt: str) -> str:
    """The chunk in a prompt built from LlamaIndex's template (the whole prompt for any other)."""
    parts = prompt.split(_SEPARATOR)
    return parts[1].strip() if len(parts) >= 3 else prompt.strip()


def questions_about(chunk: str, count: int) -> list[str]:
    """Questions about this chunk: each names two of its words from the middle on (overlap is at the start)."""
    words = list(dict.fromkeys(re.findall(r"[A-Za-z][A-Za-z-]{3,}", chunk))) or ["this"]
    start = len(words) // 2
    return [
        f"What does the passage explain about {words[(start + i) % len(words)]} and "
        f"{words[(start + i + 1) % len(words)]}?"
        for i in range(count)
    ]


class FakeOpenAI:
    """The server, in a thread of this process; ``requests`` lists what it was asked, in order.

    Args:
        behaviours: marker -> behaviours for successive requests of the chunks that hold the marker (then "ok").
        delay: seconds every answer takes (a slow model).
        slow_seconds: how long a "slow" answer takes (more than the client's timeout).
        retry_after: the Retry-After header of a 429, seconds.
        log_path: also append each request to this JSONL file (for a server in another process).
    """

    def __init__(
        self,
        behaviours: Mapping[str, Sequence[str]] | None = None,
        delay: float = 0.0,
        slow_seconds: float = 2.0,
        retry_after: float = 1.0,
        log_path: str | Path | None = None,
        port: int = 0,
    ) -> None:
        self.behaviours = {marker: list(steps) for marker, steps in (behaviours or {}).items()}
        self.delay, self.slow_seconds, self.retry_after = delay, slow_seconds, retry_after
        self.log_path = Path(log_path) if log_path else None
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._seen: dict[str, int] = defaultdict(int)
        self._vague = 0
        self._in_flight = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def asked(self) -> list[str]:
        """The chunks asked, one per request, in order."""
        return [request["chunk"] for request in self.requests]

    def _next_behaviour(self, chunk: str) -> str:
        with self._lock:
            for marker, steps in self.behaviours.items():
                if marker in chunk:
                    seen = self._seen[chunk]
                    self._seen[chunk] += 1
                    return steps[seen] if seen < len(steps) else "ok"
            return "ok"

    def _record(self, entry: dict) -> None:
        with self._lock:
            self.requests.append(entry)
            if self.log_path is not None:
                with self.log_path.open("a", encoding="utf-8") as log:
                    log.write(json.dumps(entry) + "\n")

    def _answer(self, behaviour: str, chunk: str, count: int) -> str:
        if behaviour == "copy":
            sentences = [s.rstrip(".!?") for s in re.split(r"(?<=[.!?])\s+", chunk) if s.strip()]
            return "\n".join(f"{i + 1}. {sentences[i % len(sentences)]}?" for i in range(count))
        if behaviour == "short":
            return "1. Why?\n2. How so?"
        if behaviour == "same":
            return "1. What is this document about?\n2. Who wrote this document?"
        if behaviour == "vague":
            with self._lock:
                self._vague += 1
                number = self._vague
            return "\n".join(f"{i + 1}. What is said in part {number}-{i} of the text?" for i in range(count))
        lines = "\n".join(f"{i + 1}. {q}" for i, q in enumerate(questions_about(chunk, count)))
        return f"Sure! Here are {count} questions based on the context:\n\n{lines}\n\nLet me know if you need more."

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # the tests' output is not the server's access log
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompt = body["messages"][-1]["content"]
                chunk = chunk_of(prompt)
                count = int(m.group(1)) if (m := re.search(r"generate (\d+) questions", prompt)) else 2
                behaviour = fake._next_behaviour(chunk)
                with fake._lock:
                    fake._in_flight += 1
                    in_flight = fake._in_flight
                fake._record(
                    {
                        "in_flight": in_flight,
                        "path": self.path,
                        "model": body.get("model"),
                        "authorization": self.headers.get("Authorization"),
                        "chunk": chunk,
                        "behaviour": behaviour,
                        "time": time.time(),
                    }
                )
                try:
                    time.sleep(fake.delay + (fake.slow_seconds if behaviour == "slow" else 0.0))
                finally:
                    # Before the answer goes out: a client that has it may ask again before this thread runs on.
                    with fake._lock:
                        fake._in_flight -= 1
                self._respond(behaviour, body, chunk, count)

            def _respond(self, behaviour: str, body: dict, chunk: str, count: int) -> None:
                try:
                    if behaviour in ("429", "500", "401"):
                        self.send_response(int(behaviour))
                        if behaviour == "429":
                            self.send_header("Retry-After", f"{fake.retry_after:g}")
                        self.send_header("Content-Type", "application/json")
                        self.end_headers()
                        self.wfile.write(json.dumps({"error": {"message": f"fake {behaviour}"}}).encode())
                        return
                    if behaviour == "malformed":
                        payload = b'{"choices": [{"message": {"content": "1. What'
                    elif behaviour == "no_choices":
                        payload = json.dumps({"error": {"message": "the model is overloaded"}}).encode()
                    else:
                        content = fake._answer(behaviour, chunk, count)
                        payload = json.dumps(
                            {
                                "id": "chatcmpl-fake",
                                "object": "chat.completion",
                                "model": body.get("model"),
                                "choices": [
                                    {
                                        "index": 0,
                                        "message": {"role": "assistant", "content": content},
                                        "finish_reason": "stop",
                                    }
                                ],
                            }
                        ).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a "slow" answer)

        return Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible chat server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each answer takes")
    parser.add_argument("--log", help="append every request to this JSONL file")
    args = parser.parse_args()
    with FakeOpenAI(delay=args.delay, log_path=args.log, port=args.port) as fake:
        print(f"serving {fake.url}", flush=True)
        threading.Event().wait()
