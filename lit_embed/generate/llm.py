"""One prompt in, the answer out, from any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, llama.cpp's
server, a hosted API), with the standard library only.

The client makes one try per call. A failure worth another try (HTTP 429 and 5xx, a timeout, a dropped connection, a
malformed answer) raises :class:`LLMRequestError`, carrying the server's ``Retry-After``, and the caller retries
(``lit_embed.generate``'s retries with back-off); one no retry can mend (a wrong URL or model, a refused key, a
server that cannot be reached at all) raises :class:`~lit_embed.errors.LitEmbedError` with what to fix. Calls may
come from several threads at once; ``requests_per_minute`` spaces their starts.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from lit_embed.errors import LitEmbedError

# Reasoning models (Qwen3, DeepSeek-R1 on vLLM or Ollama) may put their thinking into the content; its lines are
# not questions.
_THINKING = re.compile(r"<think>.*?</think>", re.S)


class LLMRequestError(Exception):
    """One failed try that another try may mend; ``retry_after``: the seconds the server asked to wait, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ChatCompletions:
    """``complete(prompt) -> answer`` through ``POST {url}/chat/completions``.

    Args:
        url: the server's OpenAI-compatible base URL, with or without ``/v1`` (``http://localhost:8000/v1``,
            ``http://localhost:11434``), or the full ``.../chat/completions`` URL.
        model: the model name the server knows.
        api_key: sent as ``Authorization: Bearer`` when given (local servers need none).
        temperature: sampling temperature.
        timeout: seconds to wait for the connection and then for each read of the answer.
        requests_per_minute: at most this many request starts in any minute, over all threads (None: no limit).
    """

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        temperature: float = 0.1,
        timeout: float = 120.0,
        requests_per_minute: float | None = None,
    ) -> None:
        self.url = chat_completions_url(url)
        self.model, self.temperature, self.timeout = model, temperature, timeout
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_start = 0.0
        self._lock = threading.Lock()
        self._reached = False  # once the server has answered, a refused connection is a restart, not a wrong URL
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # A proxy from the environment is for the internet, never for a server on this machine.
        local = host in ("localhost", "::1") or host.startswith("127.")
        handlers = [urllib.request.ProxyHandler({})] if local else []
        self._opener = urllib.request.build_opener(*handlers)

    def __call__(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": self.temperature}
        request = urllib.request.Request(self.url, json.dumps(body).encode(), self._headers, method="POST")
        self._wait_for_slot()
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            self._reached = True
            raise self._http_error(err) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise LLMRequestError(f"no connection within {self.timeout:g} s") from None
            if not self._reached:
                raise LitEmbedError(
                    f"--llm {self.url}: cannot connect ({err.reason}). Start the server, or fix the URL "
                    "(e.g. http://localhost:8000/v1 for vLLM, http://localhost:11434/v1 for Ollama)."
                ) from None
            raise LLMRequestError(f"cannot connect ({err.reason})") from None
        except TimeoutError:
            raise LLMRequestError(f"no answer within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as err:  # reset or dropped mid-answer
            raise LLMRequestError(f"the connection broke ({type(err).__name__}: {err})") from None
        self._reached = True
        return _answer_text(raw)

    def _wait_for_slot(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self._interval
        time.sleep(start - now)

    def _http_error(self, err: urllib.error.HTTPError) -> Exception:
        detail = _error_detail(err)
        if err.code in (401, 403):
            return LitEmbedError(
                f"--llm {self.url} refused the request: HTTP {err.code} {detail}. Set the API key in the environment "
                "variable --api-key-env names (default OPENAI_API_KEY)."
            )
        if err.code == 404:
            return LitEmbedError(
                f"--llm {self.url}: HTTP 404 {detail}. Check the URL (the server's OpenAI-compatible base, e.g. "
                f"http://localhost:8000/v1) and that the server serves --model {self.model}."
            )
        return LLMRequestError(f"HTTP {err.code} {detail}", retry_after=_retry_after(err.headers.get("Retry-After")))


def chat_completions_url(url: str) -> str:
    """The chat-completions URL of a base URL: a bare host gets ``/v1``, any other path is taken as the API's base."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LitEmbedError(
            f"--llm {url}: not an http(s) URL. Pass the server's base URL, e.g. http://localhost:8000/v1"
        )
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path = (path or "/v1") + "/chat/completions"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _answer_text(raw: bytes) -> str:
    """The first choice's message text; anything else is a malformed answer, worth another try."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LLMRequestError(f"malformed answer (no choices[0].message.content): {raw[:200]!r}") from None
    if not isinstance(content, str):
        raise LLMRequestError(f"malformed answer (the content is {type(content).__name__}, not text)")
    return _THINKING.sub("", content)


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read(300).decode("utf-8", "replace").strip()
    except OSError:
        body = ""
    return f"{err.reason} {body}".strip() if body else str(err.reason)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
