"""A small client for OpenAI-compatible chat endpoints, built for LLM judges.

Everything the judges need from a model behind ``POST {base_url}/chat/completions``:

* configuration from the environment (:meth:`JudgeSettings.from_env`, :func:`judge_available`);
* bounded concurrency (a thread pool over one shared ``httpx.Client``);
* retries with exponential back-off on 429, 5xx, timeouts and dropped connections, honouring
  ``Retry-After`` / ``retry-after-ms``;
* an on-disk cache, one JSON file per request keyed by a hash of (model, messages, params),
  written atomically, so rerunning a judge makes no request at all;
* a budget (maximum requests and/or maximum total tokens as reported in ``usage``) after which
  the client stops cleanly and the judges return partial results.

The API key goes into the ``Authorization`` header and nowhere else: it is not part of the
settings' ``repr``, the cache, the results, log lines or exception messages.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from tqdm.auto import tqdm

from hsae.errors import HSAEError
from hsae.io import read_json, write_json

log = logging.getLogger(__name__)

Message = dict[str, str]
"""One chat message: {"role": "system" | "user" | "assistant", "content": text}."""

DEFAULT_BASE_URL = "https://api.openai.com/v1"
CACHE_FORMAT = 1
_RETRY_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
_OFF = {"", "0", "off", "none", "false", "no"}


class JudgeError(HSAEError, RuntimeError):
    """The judge endpoint cannot be used (not configured, refused, kept failing)."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal
        """True when retrying other requests is pointless (bad key, unknown model, bad URL)."""


class BudgetExhaustedError(JudgeError):
    """The request or token budget is spent; no further request is sent."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge model lives and how hard the client may use it."""

    base_url: str
    """Endpoint root; requests go to ``{base_url}/chat/completions``."""
    model: str
    """Model name sent with every request (also part of the cache key)."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer token; None for local servers that need none. Never logged or stored."""
    max_concurrency: int = 4
    """Requests in flight at once."""
    max_retries: int = 5
    """Retries of one request after a 429, 5xx, timeout or dropped connection."""
    backoff_s: float = 1.0
    """First back-off delay; doubles with each retry (with jitter), capped by max_backoff_s."""
    max_backoff_s: float = 60.0
    """Longest single wait, including one asked for by Retry-After."""
    timeout_s: float = 120.0
    """Seconds before one HTTP request times out."""
    max_requests: int | None = None
    """Budget: HTTP requests sent (retries included; cache hits are free). None: no limit."""
    max_total_tokens: int | None = None
    """Budget: total tokens reported by the endpoint's ``usage``. None: no limit."""
    cache_dir: Path | None = None
    """Response cache folder; None disables the cache."""
    temperature: float = 0.0
    max_tokens: int = 400
    """Completion tokens asked for per request (the ``max_tokens`` parameter)."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise JudgeError(
                f"judge base URL must start with http:// or https://, got "
                f"{_public_url(self.base_url)!r}",
                fatal=True,
            )
        if not self.model:
            raise JudgeError("judge model name is empty", fatal=True)
        for name, low in (("max_concurrency", 1), ("max_retries", 0), ("max_tokens", 1)):
            if getattr(self, name) < low:
                raise JudgeError(f"judge setting {name} must be >= {low}", fatal=True)
        for name in ("max_requests", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise JudgeError(f"judge setting {name} must be >= 0 or unset", fatal=True)
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.timeout_s <= 0:
            raise JudgeError("judge back-off must be >= 0 and the timeout > 0", fatal=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> JudgeSettings:
        """Settings from ``HSAE_JUDGE_*`` variables (see docs/judges.md); keywords override."""
        env = os.environ if env is None else env
        endpoint_set = _first(env, *_URL_ENV, *_KEY_ENV) is not None or "base_url" in overrides
        model = overrides.get("model", _first(env, "HSAE_JUDGE_MODEL"))
        if not endpoint_set or not model:
            raise JudgeError(_missing(endpoint_set), fatal=True)
        values: dict[str, Any] = {
            "base_url": _base_url(env),
            "model": _first(env, "HSAE_JUDGE_MODEL"),
            "api_key": _first(env, *_KEY_ENV),
            "cache_dir": _cache_dir(env),
        }
        for name, key, kind in _NUMERIC_ENV:
            raw = env.get(key)
            if raw not in (None, ""):
                values[name] = _parse_number(key, raw, kind)
        return cls(**(values | overrides))

    @property
    def endpoint(self) -> str:
        """The base URL without credentials or query string: safe to record in results."""
        return _public_url(self.base_url)

    def __repr__(self) -> str:
        """Every setting, the base URL without user:password@ or query (keys live there too)
        and the API key only as set / not set."""
        shown = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("base_url", "api_key")
        }
        fields = ", ".join(f"{name}={value!r}" for name, value in shown.items())
        key = "<set>" if self.api_key else None
        return f"JudgeSettings(base_url={self.endpoint!r}, api_key={key!r}, {fields})"

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for results and labels.json (no key)."""
        return {"endpoint": self.endpoint, "model": self.model}


_NUMERIC_ENV = (
    ("max_concurrency", "HSAE_JUDGE_CONCURRENCY", int),
    ("max_retries", "HSAE_JUDGE_MAX_RETRIES", int),
    ("timeout_s", "HSAE_JUDGE_TIMEOUT", float),
    ("max_requests", "HSAE_JUDGE_MAX_REQUESTS", int),
    ("max_total_tokens", "HSAE_JUDGE_MAX_TOKENS", int),
)


def judge_available(env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """(True, where) when an endpoint and a model are configured, else (False, what is missing)."""
    env = os.environ if env is None else env
    model = _first(env, "HSAE_JUDGE_MODEL")
    endpoint_set = _first(env, *_URL_ENV, *_KEY_ENV) is not None
    if not endpoint_set or model is None:
        return False, _missing(endpoint_set)
    return True, f"judge {model} at {_public_url(_base_url(env))}"


_URL_ENV = ("HSAE_JUDGE_BASE_URL", "OPENAI_BASE_URL")
_KEY_ENV = ("HSAE_JUDGE_API_KEY", "OPENAI_API_KEY")


def _missing(endpoint_set: bool) -> str:
    if not endpoint_set:
        return (
            "no judge endpoint configured: set HSAE_JUDGE_BASE_URL (any OpenAI-compatible "
            "server) or HSAE_JUDGE_API_KEY / OPENAI_API_KEY (api.openai.com)"
        )
    return "no judge model configured: set HSAE_JUDGE_MODEL"


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def _base_url(env: Mapping[str, str]) -> str:
    url = _first(env, *_URL_ENV) or DEFAULT_BASE_URL
    return url.rstrip("/")


def _cache_dir(env: Mapping[str, str]) -> Path | None:
    raw = env.get("HSAE_JUDGE_CACHE_DIR")
    if raw is not None:
        return None if raw.strip().lower() in _OFF else Path(raw).expanduser()
    root = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "hsae" / "judge"


def _parse_number(key: str, raw: str, kind: type) -> int | float:
    try:
        return kind(raw)
    except ValueError:
        raise JudgeError(f"{key} must be a number, got {raw!r}", fatal=True) from None


def _public_url(url: str) -> str:
    """``url`` without user:password@ and without a query string or fragment."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


# --------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class Completion:
    """One answer of the judge model."""

    text: str
    tokens: int
    """Total tokens the endpoint reported for this request (0 when it reports none)."""
    cached: bool


@dataclass
class Usage:
    """What a client has spent so far (all counters cumulative)."""

    requests: int = 0
    """HTTP requests sent, retries included."""
    retries: int = 0
    cache_hits: int = 0
    tokens: int = 0
    failures: int = 0
    """Prompts that got no answer after all retries (or a malformed response)."""

    def snapshot(self) -> Usage:
        return Usage(**self.as_dict())

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _USAGE_FIELDS}

    def since(self, before: Usage) -> dict[str, int]:
        """What was spent after ``before`` (a :meth:`snapshot`)."""
        return {name: getattr(self, name) - getattr(before, name) for name in _USAGE_FIELDS}


_USAGE_FIELDS = ("requests", "retries", "cache_hits", "tokens", "failures")


@dataclass
class Batch:
    """Answers to many prompts, in order; None where a prompt got none."""

    completions: list[Completion | None]
    errors: list[str | None]
    """Why a prompt failed; None for answered prompts and those never sent."""
    stopped: str | None = None
    """Why the batch ended early (budget spent), else None."""


class JudgeClient:
    """Chat completions with concurrency, retries, an on-disk cache and a budget."""

    def __init__(self, settings: JudgeSettings, http: httpx.Client | None = None) -> None:
        self.settings = settings
        self.usage = Usage()
        self._lock = threading.Lock()
        self._http = http or httpx.Client(timeout=settings.timeout_s)
        self._owns_http = http is None

    def __repr__(self) -> str:
        return f"JudgeClient(model={self.settings.model!r}, endpoint={self.settings.endpoint!r})"

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    # --- one prompt ----------------------------------------------------------------------
    def complete(self, messages: Sequence[Message], **params: Any) -> Completion:
        """The model's answer to ``messages``, from the cache when it holds it.

        Raises :class:`BudgetExhaustedError` before a request the budget does not allow and
        :class:`JudgeError` when the endpoint refuses the request or keeps failing.
        """
        params = {
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
        } | params
        key = cache_key(self.settings.model, messages, params)
        cached = self._cache_read(key)
        if cached is not None:
            with self._lock:
                self.usage.cache_hits += 1
            return cached
        text, tokens = self._post_with_retries(list(messages), params)
        self._cache_write(key, messages, params, text, tokens)
        return Completion(text=text, tokens=tokens, cached=False)

    # --- many prompts --------------------------------------------------------------------
    def complete_many(
        self, prompts: Sequence[Sequence[Message]], desc: str = "judge", progress: bool = True
    ) -> Batch:
        """Answer every prompt with at most ``max_concurrency`` requests in flight.

        A prompt whose request keeps failing is counted and left as None; a fatal error (bad
        key, unknown model) is raised; once the budget is spent the remaining prompts are left
        as None and ``Batch.stopped`` says why.
        """
        batch = Batch([None] * len(prompts), [None] * len(prompts))
        stop = threading.Event()
        with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:

            def one(index: int) -> None:
                if stop.is_set():
                    return
                try:
                    batch.completions[index] = self.complete(prompts[index])
                except BudgetExhaustedError as error:
                    stop.set()
                    batch.stopped = batch.stopped or str(error)
                except JudgeError as error:
                    batch.errors[index] = str(error)
                    if error.fatal:
                        stop.set()
                        raise
                    with self._lock:
                        self.usage.failures += 1
                finally:
                    bar.update(1)

            with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
                futures = [pool.submit(one, index) for index in range(len(prompts))]
                for future in as_completed(futures):
                    error = future.exception()
                    if error is not None:
                        stop.set()
                        for pending in futures:
                            pending.cancel()
                        raise error
        return batch

    # --- HTTP ----------------------------------------------------------------------------
    def _post_with_retries(
        self, messages: list[Message], params: dict[str, Any]
    ) -> tuple[str, int]:
        payload = {"model": self.settings.model, "messages": messages} | params
        url = f"{self.settings.base_url}/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        last = "no attempt made"
        for attempt in range(self.settings.max_retries + 1):
            self._reserve_request(retry=attempt > 0)
            try:
                response = self._http.post(url, json=payload, headers=headers)
            except (httpx.TimeoutException, httpx.TransportError) as error:
                last = f"{type(error).__name__}"
                self._back_off(attempt, None, last)
                continue
            if response.status_code in _RETRY_STATUS:
                last = f"HTTP {response.status_code}"
                self._back_off(attempt, response.headers, last)
                continue
            if response.status_code >= 400:
                raise JudgeError(
                    f"judge endpoint {self.settings.endpoint} refused the request: HTTP "
                    f"{response.status_code}: {self._redact(_error_detail(response))}",
                    fatal=response.status_code in (401, 403, 404),
                )
            return self._read_answer(response)
        raise JudgeError(
            f"judge endpoint {self.settings.endpoint} kept failing: {last} after "
            f"{self.settings.max_retries + 1} attempts"
        )

    def _reserve_request(self, retry: bool) -> None:
        """Count one request against the budget, or refuse it."""
        limit_requests = self.settings.max_requests
        limit_tokens = self.settings.max_total_tokens
        with self._lock:
            if limit_requests is not None and self.usage.requests >= limit_requests:
                raise BudgetExhaustedError(
                    f"judge budget spent: {self.usage.requests} of {limit_requests} requests "
                    "(HSAE_JUDGE_MAX_REQUESTS); results are partial"
                )
            if limit_tokens is not None and self.usage.tokens >= limit_tokens:
                raise BudgetExhaustedError(
                    f"judge budget spent: {self.usage.tokens} tokens of {limit_tokens} "
                    "(HSAE_JUDGE_MAX_TOKENS); results are partial"
                )
            self.usage.requests += 1
            self.usage.retries += int(retry)

    def _back_off(self, attempt: int, headers: httpx.Headers | None, reason: str) -> None:
        if attempt >= self.settings.max_retries:
            return
        delay = _retry_after(headers)
        if delay is None:
            delay = self.settings.backoff_s * (2**attempt) * random.uniform(0.5, 1.0)
        delay = min(delay, self.settings.max_backoff_s)
        log.warning("judge request failed (%s); retrying in %.1f s", reason, delay)
        time.sleep(delay)

    def _read_answer(self, response: httpx.Response) -> tuple[str, int]:
        try:
            body = response.json()
            text = body["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"judge endpoint {self.settings.endpoint} sent a response without "
                "choices[0].message.content"
            ) from None
        usage = body.get("usage") or {}
        tokens = usage.get("total_tokens")
        if not isinstance(tokens, int):
            tokens = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
        with self._lock:
            self.usage.tokens += tokens
        return self._redact(text if isinstance(text, str) else ""), tokens

    def _redact(self, text: str) -> str:
        key = self.settings.api_key
        return text.replace(key, "***") if key else text

    # --- cache ---------------------------------------------------------------------------
    def _cache_path(self, key: str) -> Path | None:
        root = self.settings.cache_dir
        return None if root is None else Path(root) / key[:2] / f"{key}.json"

    def _cache_read(self, key: str) -> Completion | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = read_json(path)
            return Completion(text=str(entry["text"]), tokens=int(entry["tokens"]), cached=True)
        except (ValueError, KeyError, TypeError, OSError):
            log.warning("ignoring unreadable judge cache file %s", path)
            return None

    def _cache_write(
        self,
        key: str,
        messages: Sequence[Message],
        params: dict[str, Any],
        text: str,
        tokens: int,
    ) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        entry = {
            "format": CACHE_FORMAT,
            "model": self.settings.model,
            "params": params,
            "messages": [self._redact_message(m) for m in messages],
            "text": text,
            "tokens": tokens,
        }
        write_json(path, entry)

    def _redact_message(self, message: Message) -> Message:
        return {k: self._redact(v) if isinstance(v, str) else v for k, v in message.items()}


def cache_key(model: str, messages: Sequence[Message], params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of (model, messages, params)."""
    canonical = json.dumps(
        {"model": model, "messages": list(messages), "params": dict(params)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _retry_after(headers: httpx.Headers | None) -> float | None:
    """Seconds asked for by ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except ValueError:
        message = None
    text = message if isinstance(message, str) else response.text
    return " ".join(text.split())[:300] or "(empty body)"
