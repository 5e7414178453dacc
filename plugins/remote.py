"""One policy for every call to a remote service: keys, limits, retries, errors, cost.

Plugins that talk to a remote API (an LLM, a VLM, a WebUI farm) build their client with
the library's own retries switched off and send each request through ``Remote.call``,
which

- holds a process-wide semaphore per service, so all components of a run together
  keep at most ``concurrency`` requests in flight to one server;
- retries rate limits (429), overload (529), server errors (5xx), timeouts and broken
  replies with tenacity: the server's ``retry-after`` when it sends one, else
  exponential backoff with jitter;
- turns quota and billing errors into ``QuotaExhausted`` (the run stops and resumes
  later), a rejected key into ``ConfigError`` naming the variable that holds it, and
  any other refusal of the request into ``ConfigError``;
- never lets the key reach a message: every text it raises is scrubbed.

``Meter`` counts calls, retries and tokens and estimates the cost from ``PRICES``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from chatroom.errors import ConfigError, MissingDependency, QuotaExhausted

log = logging.getLogger(__name__)

T = TypeVar("T")

# USD per million tokens (input, output): list prices as published in late 2025.
# They are estimates for the summary and the budget cap, not an invoice; a model
# missing here has no estimate (cost null) unless its options give prices.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "claude-opus-4-5": (5.00, 25.00),
}
PRICES_NOTE = "cost_usd is an estimate from list prices per million tokens"

# Error types and codes that mean "no more money", whatever the HTTP status.
QUOTA_MARKERS = ("insufficient_quota", "billing", "credit balance", "quota exceeded")
MAX_RETRY_AFTER = 120.0
SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")
LOOPBACK_ONLY_ENV = "CHATROOM_LOOPBACK_ONLY"


class RemoteError(Exception):
    """A remote call failed for good on these items; the run goes on without them."""


def need(library: str, extra: str, component: str):
    """Import an optional client library, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(library)
    except ImportError:
        raise MissingDependency(library, extra, component) from None


def read_key(env: str, who: str) -> str:
    """The API key from the environment variable named ``env``."""
    key = os.environ.get(env, "")
    if not key:
        raise ConfigError(f"{who}: the environment variable {env} holds no API key")
    return key


def loopback_only() -> bool:
    """True under pytest or when CHATROOM_LOOPBACK_ONLY is set: no public hosts."""
    return bool(
        os.environ.get(LOOPBACK_ONLY_ENV) or os.environ.get("PYTEST_CURRENT_TEST")
    )


def check_base_url(url: str, who: str) -> None:
    """Refuse a non-loopback host where only loopback servers may be called."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{who}: base_url {safe_url(url)!r} is not an http(s) URL")
    if not loopback_only():
        return
    host = parts.hostname
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(
            f"{who}: refusing to call {host} while tests run ({LOOPBACK_ONLY_ENV} or "
            "pytest): point base_url at a server on 127.0.0.1"
        )


def safe_url(url: str) -> str:
    """A URL without user:password, fit for logs and run.json."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return parts.geturl()


# --- concurrency -------------------------------------------------------------------

_limits: dict[str, threading.BoundedSemaphore] = {}
_limits_lock = threading.Lock()


def limiter(service: str, size: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore for one service; the first caller sets its size."""
    with _limits_lock:
        if service not in _limits:
            _limits[service] = threading.BoundedSemaphore(max(1, size))
        return _limits[service]


# --- errors ------------------------------------------------------------------------


def _body_error(exc: BaseException) -> dict[str, Any]:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner
    return {}


def classify(exc: BaseException) -> str:
    """``quota``, ``auth``, ``retry``, ``refused`` (a bad request) or ``other``.

    Works on the exceptions of openai and anthropic (both carry ``status_code`` and
    the parsed ``body``) and on connection and timeout errors of either.
    """
    error = _body_error(exc)
    marks = " ".join(
        str(error.get(k) or "") for k in ("type", "code", "message")
    ).lower()
    status = getattr(exc, "status_code", None)
    if any(m in marks for m in QUOTA_MARKERS) or status == 402:
        return "quota"
    if status == 401:
        return "auth"
    if status is None:
        if getattr(exc, "retryable", False):  # a plugin's own transient error
            return "retry"
        name = type(exc).__name__
        # Timeouts, refused connections, cut bodies and unparsable replies.
        if name in ("APITimeoutError", "APIConnectionError", "JSONDecodeError"):
            return "retry"
        if name == "APIResponseValidationError":
            return "retry"
        return "other"
    if status in (408, 409, 429) or status >= 500:
        return "retry"
    if 400 <= status < 500:
        return "refused"
    return "other"


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait, from retry-after-ms or retry-after."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if 0 <= seconds <= MAX_RETRY_AFTER:
            return seconds
    return None


def scrub(text: str, secret: str) -> str:
    """Text with the secret (and any long tail of it) replaced."""
    if secret:
        text = text.replace(secret, "<redacted>")
        if len(secret) > 8:
            text = text.replace(secret[-6:], "<redacted>")
    return text


# --- metering ----------------------------------------------------------------------


@dataclass
class Meter:
    """Calls, retries, tokens and estimated cost of one component's remote calls."""

    model: str
    prices: tuple[float, float] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        if self.prices is None:
            self.prices = PRICES.get(self.model) or PRICES.get(_base_model(self.model))

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    @property
    def cost(self) -> float | None:
        if self.prices is None:
            return None
        price_in, price_out = self.prices
        usd = self.prompt_tokens * price_in + self.completion_tokens * price_out
        return round(usd / 1e6, 6)

    def usage(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = dict(sorted(self.counts.items()))
            out["prompt_tokens"] = self.prompt_tokens
            out["completion_tokens"] = self.completion_tokens
        out["cost_usd"] = self.cost
        return out


def _base_model(model: str) -> str:
    """``gpt-4o-2024-08-06`` -> ``gpt-4o``: a snapshot costs what its alias does."""
    return SNAPSHOT.sub("", model)


# --- the call ----------------------------------------------------------------------


@dataclass
class Remote:
    """How one component calls one service."""

    who: str  # "prompter (llm)": names the component in every message
    service: str  # the base URL: the semaphore's key
    key: str
    key_env: str
    meter: Meter
    max_retries: int = 4
    concurrency: int = 4
    max_cost_usd: float | None = None
    backoff: tuple[float, float] = (0.5, 30.0)  # first and longest wait, seconds
    extra: str = "openai"  # the extra that installs tenacity with the client

    def call(self, request: Callable[[], T]) -> T:
        """Send one request under the policy; return its reply or raise."""
        tenacity = need("tenacity", self.extra, self.who)
        self._check_budget()
        first, longest = self.backoff
        fallback = tenacity.wait_exponential_jitter(
            multiplier=first, max=longest, jitter=first
        )

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            seconds = retry_after(exc) if exc is not None else None
            return seconds if seconds is not None else fallback(state)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception()
            self.meter.count("retries")
            self.meter.count(f"retried_{_reason(exc)}")
            log.info(
                "%s: %s, retry %d of %d",
                self.who,
                scrub(_describe(exc), self.key),
                state.attempt_number,
                self.max_retries,
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: classify(e) == "retry"),
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        semaphore = limiter(self.service, self.concurrency)
        try:
            for attempt in retrying:
                with attempt, semaphore:
                    self.meter.count("calls")
                    reply = request()
        except Exception as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from None
        return reply

    def _check_budget(self) -> None:
        cost = self.meter.cost
        if self.max_cost_usd is not None and cost is not None:
            if cost >= self.max_cost_usd:
                raise QuotaExhausted(
                    f"{self.who}: estimated cost ${cost:.4f} reached max_cost_usd "
                    f"(${self.max_cost_usd:.2f}); raise it and run the same command "
                    "again to continue"
                )

    def _translate(self, exc: Exception) -> Exception:
        kind = classify(exc)
        what = scrub(_describe(exc), self.key)
        if kind == "quota":
            head = what.split(":")[0]  # status and error type, not the long text
            return QuotaExhausted(
                f"{self.who}: the service reports no quota or credit left ({head}); "
                "top up and run the same command again to continue"
            )
        if kind == "auth":
            return ConfigError(
                f"{self.who}: the server rejected the API key in ${self.key_env} "
                "(401); check that variable"
            )
        if kind == "refused":
            return ConfigError(f"{self.who}: the server refused the request ({what})")
        if kind == "retry":
            return RemoteError(f"{what}, after {self.max_retries} retries")
        if hasattr(exc, "status_code") or hasattr(exc, "body"):
            return RemoteError(what)
        return exc  # not the service's doing: a bug shows as itself


def _reason(exc: BaseException | None) -> str:
    status = getattr(exc, "status_code", None)
    if status is not None:
        return str(status)
    name = type(exc).__name__
    return (
        "timeout"
        if "Timeout" in name
        else "connection"
        if "Connection" in name
        else "reply"
    )


def _describe(exc: BaseException | None) -> str:
    """One line: status, error type and the server's message, short."""
    status = getattr(exc, "status_code", None)
    error = _body_error(exc) if exc is not None else {}
    kind = error.get("type") or error.get("code") or type(exc).__name__
    message = str(error.get("message") or (exc if status is None else "") or "")
    message = " ".join(message.split())[:160]
    head = f"{status} {kind}" if status is not None else str(kind)
    return f"{head}: {message}" if message else head
