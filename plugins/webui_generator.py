"""Generate through a pool of Stable Diffusion WebUI servers (AUTOMATIC1111, Forge).

The paper generated with majicmixRealistic v6 through the WebUI's API. This
generator sends each image to one of ``servers`` through ``webuiapi``, one job per
server at a time, and checks what comes back.

Before the first image, every server is asked for its samplers, schedulers (WebUI
1.9 and newer), upscalers and checkpoints; a sampler, scheduler, upscaler or
checkpoint a server lacks is a ``ConfigError`` that lists what the server offers.
The sampler goes out the way the server's version expects: "DPM++ 2M SDE Karras"
becomes sampler "DPM++ 2M SDE" plus scheduler "karras" where the server lists
schedulers, and stays one name for older servers. The checkpoint is selected through
the server's options and the server must report it loaded.

Every reply is checked: HTTP status, JSON content type, an image present and of the
requested size (times the hires scale), and the seed the server really used, read
from ``info`` and recorded. CLIP skip travels in ``override_settings``.

The pool: a server that refuses connections, times out, or stops making progress
(``/sdapi/v1/progress`` unchanged for ``stall_timeout``; it is then interrupted) is
taken out, and its job moves to another server; a health check brings it back, after
reading its lists and selecting the checkpoint again. Server errors (5xx) and bad
replies send the job elsewhere too. Retries, back-off and ``retry-after`` follow the
shared policy of ``chatroom.plugins.remote``.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator

from chatroom.components import (
    Context,
    Generator,
    ItemFailed,
    Options,
    closest,
)
from chatroom.errors import ChatroomError, ConfigError
from chatroom.hookspecs import hookimpl
from chatroom.models import Candidate, GenerationSettings, HiresSettings, PromptSpec

from . import remote

log = logging.getLogger(__name__)

JOBS_PER_SERVER = 3  # items a batch hands each server, see WebUIOptions.batch_size

WHO = "generator (webui)"
API = "/sdapi/v1"
AUTOMATIC = "automatic"
HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,}\]$")
# A server whose replies fail this many times in a row is taken out until it passes
# a health check, however it failed.
MAX_FAILURES_IN_A_ROW = 3


class WebUIOptions(Options):
    servers: list[str] = Field(
        default_factory=list,
        description="Base URLs of the WebUI servers, e.g. http://127.0.0.1:7860 "
        "(started with --api). One job runs on each at a time.",
    )
    model: str = Field(
        "",
        description="Checkpoint to select, as /sdapi/v1/sd-models names it (title, "
        "model name or file name); empty: whatever each server has loaded.",
    )
    sampler: str = Field(
        "DPM++ 2M SDE Karras",
        description="Sampler; a scheduler suffix (Karras, Exponential) is split off "
        "for servers that take the scheduler apart.",
    )
    scheduler: str = Field(
        "", description="Scheduler (Karras, Exponential...); empty: automatic."
    )
    steps: int = Field(30, ge=1)
    cfg_scale: float = Field(7.0, ge=0)
    width: int = Field(512, ge=8)
    height: int = Field(768, ge=8)
    clip_skip: int = Field(1, ge=1, description="WebUI meaning: 1 = last layer.")
    hires: HiresSettings = Field(default_factory=HiresSettings)
    timeout: float = Field(300.0, gt=0, description="Seconds one request may take.")
    stall_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds without progress before a job is interrupted and sent "
        "to another server.",
    )
    max_retries: int = Field(4, ge=0, le=20, description="Retries of one image.")
    retry_wait: float = Field(
        0.5, gt=0, description="First wait before a retry; doubles up to 30 s."
    )
    health_interval: float = Field(
        5.0, gt=0, description="Seconds between checks of servers taken out."
    )
    wait_for_server: float = Field(
        300.0,
        gt=0,
        description="Seconds with every server out before the run stops (resumably).",
    )

    @field_validator("servers")
    @classmethod
    def _base_urls(cls, value: list[str]) -> list[str]:
        urls = [base_url(url) for url in value]
        twice = sorted({url for url in urls if urls.count(url) > 1})
        if twice:
            raise ValueError(f"servers listed twice: {', '.join(twice)}")
        return urls

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value

    @property
    def batch_size(self) -> int:
        """Items the engine hands over at once: three per server.

        Each server takes the next job as soon as it is free, so a batch only waits
        for its slowest round; with several jobs per server a dead server's share
        spreads over the others instead of costing a whole extra round per batch.
        """
        return JOBS_PER_SERVER * max(1, len(self.servers))


def base_url(url: str) -> str:
    """``http://host:7860/sdapi/v1/`` -> ``http://host:7860``."""
    url = url.strip().rstrip("/")
    return url[: -len(API)] if url.endswith(API) else url


# --- errors --------------------------------------------------------------------------


class WebUIError(Exception):
    """A transient failure of one server: the job may go to another."""

    retryable = True  # read by remote.classify


class WebUIConnectionError(WebUIError):
    """The server refused or dropped the connection."""


class WebUITimeout(WebUIError):
    """The server did not answer in time, or stopped making progress."""


class WebUIStallTimeout(WebUITimeout):
    """The job's progress stood still for ``stall_timeout``; it was interrupted."""


class WebUIBadReply(WebUIError):
    """A reply that is not what was asked for: not JSON, no image, wrong size."""


class WebUIHTTPError(Exception):
    """A reply with an error status; ``status_code`` and ``body`` as remote reads."""

    def __init__(self, response):
        self.status_code = response.status_code
        self.response = response
        try:
            data = response.json()
        except ValueError:
            data = None
        message = response.text
        if isinstance(data, dict):
            message = " ".join(
                str(data.get(k) or "") for k in ("detail", "errors") if data.get(k)
            ) or str(data.get("error") or "")
        kind = data.get("error") if isinstance(data, dict) else None
        self.body = {
            "type": str(kind or "HTTPError"),
            "message": " ".join(str(message).split())[:200],
        }
        super().__init__(f"{self.status_code} {self.body['message']}".strip())


class ServersDown(ChatroomError):
    """No server answered for ``wait_for_server``: the run stops and resumes later."""


def _check_response(response, *args, **kwargs):
    """A requests hook: every reply must be a 200 with JSON in it."""
    if response.status_code != 200:
        raise WebUIHTTPError(response)
    kind = response.headers.get("content-type", "")
    if "json" not in kind.lower():
        raise WebUIBadReply(
            f"{response.status_code} reply of type {kind or 'unknown'!r}, not JSON"
        )


def _translate(exc: BaseException) -> BaseException:
    """requests' and PIL's exceptions as the ones the retry policy knows."""
    import requests

    if isinstance(exc, WebUIError | WebUIHTTPError):
        return exc
    if isinstance(exc, requests.exceptions.Timeout):
        return WebUITimeout(f"no answer in time ({type(exc).__name__})")
    if isinstance(exc, requests.exceptions.ConnectionError | ConnectionError):
        return WebUIConnectionError(f"connection failed ({type(exc).__name__})")
    if isinstance(exc, requests.exceptions.RequestException):
        return WebUIConnectionError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError | OSError):  # bad JSON, base64 or image data
        return WebUIBadReply(f"unreadable reply ({type(exc).__name__}: {exc})")
    return exc


@functools.cache
def _client_class():
    webuiapi = remote.need("webuiapi", "webui", WHO)

    class Client(webuiapi.WebUIApi):
        """webuiapi's client without the extension probe, which has no timeout."""

        def check_extensions(self):
            pass

    return Client


def client(url: str, timeout: float):
    """A webuiapi client for one server: every request bounded and checked."""
    api = _client_class()(baseurl=url + API, scheduler=None)
    api.session.request = functools.partial(api.session.request, timeout=timeout)
    api.session.hooks["response"].append(_check_response)
    return api


# --- samplers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """How one server is sent the sampler, and what the records call it."""

    sampler_name: str
    scheduler: str | None  # None: a server without schedulers
    label: str  # "DPM++ 2M SDE Karras" whatever the server's version


def choose_sampler(
    sampler: str,
    scheduler: str,
    samplers: list[dict[str, Any]],
    schedulers: list[dict[str, Any]] | None,
) -> Wire:
    """The sampler (and scheduler) to send a server, or ValueError naming its lists."""
    names: dict[str, str] = {}
    for entry in samplers:
        for alias in [entry["name"], *(entry.get("aliases") or [])]:
            names.setdefault(str(alias).lower(), entry["name"])
    offered = f"samplers: {', '.join(e['name'] for e in samplers)}"

    if schedulers is None:  # before WebUI 1.9: the schedule is part of the name
        wanted = sampler
        if scheduler and scheduler.lower() != AUTOMATIC:
            wanted = f"{sampler} {scheduler[:1].upper()}{scheduler[1:]}"
        name = names.get(wanted.lower())
        if name is None:
            raise ValueError(
                f"has no sampler {wanted!r}{closest(wanted, names.values())} "
                f"(it takes no separate scheduler); {offered}"
            )
        return Wire(name, None, name)

    labels: dict[str, tuple[str, str]] = {}
    for entry in schedulers:
        pair = (entry["name"], entry.get("label") or entry["name"])
        labels.setdefault(pair[0].lower(), pair)
        labels.setdefault(pair[1].lower(), pair)
    offered += "; schedulers: " + ", ".join(
        e.get("label") or e["name"] for e in schedulers
    )
    base, pair = names.get(sampler.lower()), None
    if scheduler:
        pair = labels.get(scheduler.lower())
        if pair is None:
            raise ValueError(
                f"has no scheduler {scheduler!r}"
                f"{closest(scheduler, [p[1] for p in labels.values()])}; {offered}"
            )
    elif base is None:
        # "DPM++ 2M SDE Karras": the longest scheduler label that ends the name.
        for key in sorted(labels, key=len, reverse=True):
            head = sampler[: -len(key)].rstrip()
            if sampler.lower().endswith(" " + key) and head.lower() in names:
                base, pair = names[head.lower()], labels[key]
                break
    if base is None:
        raise ValueError(
            f"has no sampler {sampler!r}{closest(sampler, names.values())}; {offered}"
        )
    if pair is None or pair[0].lower() == AUTOMATIC:
        automatic = labels.get(AUTOMATIC)
        return Wire(base, automatic[0] if automatic else None, base)
    return Wire(base, pair[0], f"{base} {pair[1]}")


def hires_size(width: int, height: int, scale: float) -> set[tuple[int, int]]:
    """Sizes a hires pass may return: the WebUI's ``int(side * scale)``, or that
    rounded down to a multiple of 8 by the latent round trip."""
    exact = (int(width * scale), int(height * scale))
    return {exact, (exact[0] // 8 * 8, exact[1] // 8 * 8)}


# --- one server ----------------------------------------------------------------------


@dataclass(eq=False)
class Server:
    """One WebUI server: what it offers, and whether it may take a job now."""

    url: str
    up: bool = False
    busy: bool = False
    probing: bool = False
    next_probe: float = 0.0
    reason: str = "not checked yet"
    api: Any = None  # for txt2img and set-up: requests bounded by ``timeout``
    monitor: Any = None  # for progress, interrupt and health: short requests
    wire: Wire | None = None
    upscaler: str = ""
    model: str = ""  # the checkpoint title the server reported loaded
    model_hash: str = ""
    has_schedulers: bool = False
    images: int = 0
    failures: int = 0
    failures_in_a_row: int = 0
    revivals: int = 0

    def progress(self) -> tuple | None:
        """What changes while a job advances; None when the server does not say."""
        try:
            data = self.monitor.get_progress()
        except Exception:
            return None
        state = data.get("state") or {}
        return (
            data.get("progress"),
            state.get("job_timestamp"),
            state.get("job_no"),
            state.get("sampling_step"),
            state.get("job_count"),
        )

    def interrupt(self) -> None:
        try:
            self.monitor.interrupt()
        except Exception as exc:  # the server may be gone; the job is given up anyway
            log.debug("%s: interrupt failed: %s", self.url, exc)


@dataclass
class Job:
    spec: PromptSpec
    seed: int
    errors: list[str] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)
    waited: float = 0.0


class Pool:
    """Hands out idle servers, one job each; takes failing ones out and back in."""

    def __init__(self, servers: list[Server], options: WebUIOptions, revive):
        self.servers = servers
        self.options = options
        self.revive = revive  # Server -> None; raises when it cannot be used
        self.cond = threading.Condition()
        self.closed = False
        self._health = threading.Thread(
            target=self._check_health, daemon=True, name="chatroom-webui-health"
        )
        self._health.start()

    def acquire(self, job: Job) -> Server:
        """An idle server, preferring those this job has not failed on."""
        deadline = time.monotonic() + self.options.wait_for_server
        with self.cond:
            while True:
                if self.closed:
                    raise ChatroomError(f"{WHO}: the generator was closed")
                up = [s for s in self.servers if s.up]
                idle = [s for s in up if not s.busy]
                fresh = [s for s in idle if s.url not in job.tried]
                untried_up = [s for s in up if s.url not in job.tried]
                choice = fresh or ([] if untried_up else idle)
                if choice:
                    server = min(choice, key=lambda s: s.images + s.failures)
                    server.busy = True
                    return server
                left = deadline - time.monotonic()
                if not up and left <= 0:
                    states = "; ".join(f"{s.url}: {s.reason}" for s in self.servers)
                    raise ServersDown(
                        f"{WHO}: no server answered for "
                        f"{self.options.wait_for_server:g} s ({states}); start them "
                        "and run the same command again to continue"
                    )
                if up:
                    deadline = time.monotonic() + self.options.wait_for_server
                self.cond.wait(min(max(left, 0.01), self.options.health_interval))

    def release(self, server: Server) -> None:
        with self.cond:
            server.busy = False
            self.cond.notify_all()

    def take_out(self, server: Server, reason: str) -> None:
        with self.cond:
            if server.up:
                log.warning("%s: %s; taken out of the pool", server.url, reason)
            server.up = False
            server.reason = reason
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _check_health(self) -> None:
        while True:
            with self.cond:
                self.cond.wait(self.options.health_interval)
                if self.closed:
                    return
                now = time.monotonic()
                out = [
                    s
                    for s in self.servers
                    if not (s.up or s.busy or s.probing) and s.next_probe <= now
                ]
                for server in out:
                    server.probing = True
                    server.next_probe = now + self.options.health_interval
            for server in out:
                threading.Thread(
                    target=self._probe, args=(server,), daemon=True
                ).start()

    def _probe(self, server: Server) -> None:
        try:
            self.revive(server)
        except Exception as exc:
            with self.cond:
                server.reason = str(exc)
            log.debug("%s: still out: %s", server.url, exc)
        else:
            with self.cond:
                server.up = True
                server.reason = ""
                server.revivals += 1
                self.cond.notify_all()
            log.warning("%s: answers again; back in the pool", server.url)
        finally:
            with self.cond:
                server.probing = False


# --- the generator -------------------------------------------------------------------


class WebUIGenerator(Generator):
    """Stable Diffusion WebUI servers through their API, as a pool."""

    name = "webui"
    description = "A pool of Stable Diffusion WebUI servers (AUTOMATIC1111, Forge)."
    Options = WebUIOptions
    requires = (("webuiapi", "chatroom[webui]"), ("tenacity", "chatroom[webui]"))

    def __init__(self, options: WebUIOptions, context: Context):
        super().__init__(options, context)
        if not options.servers:
            raise ConfigError(
                f"{WHO}: set generator.servers to the base URLs of your WebUI "
                'servers, e.g. ["http://127.0.0.1:7860"] (started with --api)'
            )
        for url in options.servers:
            remote.check_base_url(url, WHO)
        hires = options.hires
        if hires.enabled and not (0 < hires.denoise <= 1 and hires.scale > 0):
            raise ConfigError(
                f"{WHO}: hires needs 0 < denoise <= 1 and scale > 0, got "
                f"denoise={hires.denoise}, scale={hires.scale}"
            )
        self.batch_size = options.batch_size
        self.meter = remote.Meter("webui")
        self.servers = [Server(url) for url in options.servers]
        self._lock = threading.Lock()
        self._pool: Pool | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._remote: remote.Remote | None = None
        self._stalls = 0

    # --- set-up -----------------------------------------------------------------------

    def _start(self) -> Pool:
        """Read and check every server once, before the first image."""
        with self._lock:
            if self._pool is not None:
                return self._pool
            remote.need("tenacity", "webui", WHO)
            problems: dict[str, Exception] = {}

            def setup(server: Server) -> None:
                try:
                    self._setup(server)
                    server.up, server.reason = True, ""
                except Exception as exc:
                    exc = _translate(exc)
                    problems[server.url] = exc
                    server.reason = remote._describe(exc)

            threads = [
                threading.Thread(target=setup, args=(s,), daemon=True)
                for s in self.servers
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for server in self.servers:  # the first bad config, in the user's order
                if isinstance(problems.get(server.url), ChatroomError):
                    raise problems[server.url]
            if not any(s.up for s in self.servers):
                states = "; ".join(f"{s.url}: {s.reason}" for s in self.servers)
                raise ConfigError(f"{WHO}: no server answered ({states})")
            if not self.options.model:
                loaded = {s.url: s.model for s in self.servers if s.up}
                if len(set(loaded.values())) > 1:
                    which = ", ".join(f"{u}: {m}" for u, m in loaded.items())
                    raise ConfigError(
                        f"{WHO}: the servers have different checkpoints loaded "
                        f"({which}); set generator.model to the one to use"
                    )
            for server in self.servers:
                if not server.up:
                    log.warning("%s: %s; left out for now", server.url, server.reason)
            options = self.options
            self._remote = remote.Remote(
                who=WHO,
                service="webui:" + ",".join(options.servers),
                key="",
                key_env="",
                meter=self.meter,
                max_retries=options.max_retries,
                concurrency=len(self.servers),
                backoff=(options.retry_wait, 30.0),
                extra="webui",
            )
            self._threads = ThreadPoolExecutor(
                len(self.servers), thread_name_prefix="chatroom-webui"
            )
            self._pool = Pool(self.servers, options, self._revive)
            return self._pool

    def _revive(self, server: Server) -> None:
        server.monitor.get_progress()  # quick: is anyone there?
        self._setup(server)

    def _setup(self, server: Server) -> None:
        """Read a server's lists, check the options against them, load the model."""
        options = self.options
        probe = min(10.0, max(1.0, options.stall_timeout))
        if server.api is None:
            server.api = client(server.url, options.timeout)
            server.monitor = client(server.url, probe)
        api = server.api
        try:
            samplers = api.get_samplers()
        except WebUIHTTPError as exc:
            if exc.status_code == 404:
                raise ConfigError(
                    f"{WHO}: {server.url} has no API at {API} (404): start the "
                    "WebUI with --api"
                ) from None
            raise
        schedulers = _optional(api.get_schedulers)
        upscalers = [u["name"] for u in api.get_upscalers()]
        upscalers += [m["name"] for m in _optional(api.get_latent_upscale_modes) or []]
        models = api.get_sd_models()

        where = f"{WHO}: {server.url}"
        try:
            wire = choose_sampler(
                options.sampler, options.scheduler, samplers, schedulers
            )
        except ValueError as exc:
            raise ConfigError(f"{where} {exc}") from None
        upscaler = ""
        hires = options.hires
        if hires.enabled:
            found = {u.lower(): u for u in upscalers}
            upscaler = found.get(hires.upscaler.lower(), "")
            if not upscaler:
                raise ConfigError(
                    f"{where} has no upscaler {hires.upscaler!r}"
                    f"{closest(hires.upscaler, upscalers)} for hires; it offers: "
                    + ", ".join(upscalers)
                )
        server.model, server.model_hash = self._select_model(server, models)
        server.wire, server.upscaler = wire, upscaler
        server.has_schedulers = schedulers is not None
        log.info(
            "%s: %s, sampler %r scheduler %r, upscaler %r",
            server.url,
            server.model,
            wire.sampler_name,
            wire.scheduler,
            upscaler,
        )

    def _select_model(self, server: Server, models: list[dict]) -> tuple[str, str]:
        """Select the configured checkpoint; return the loaded title and its hash."""
        api = server.api
        wanted = self.options.model
        title = ""
        if wanted:
            for entry in models:
                names = {
                    entry.get("title"),
                    entry.get("model_name"),
                    HASH_SUFFIX.sub("", entry.get("title") or ""),
                    (entry.get("filename") or "").replace("\\", "/").rsplit("/")[-1],
                }
                if wanted in names:
                    title = entry["title"]
                    break
            else:
                titles = [m.get("title", "") for m in models]
                raise ConfigError(
                    f"{WHO}: {server.url} has no checkpoint {wanted!r}"
                    f"{closest(wanted, titles)}; it offers: {', '.join(titles)}"
                )
            if not _same_model(api.get_options().get("sd_model_checkpoint"), title):
                log.info("%s: loading %s", server.url, title)
                api.set_options({"sd_model_checkpoint": title})
        loaded = str(api.get_options().get("sd_model_checkpoint") or "")
        if title and not _same_model(loaded, title):
            raise ConfigError(
                f"{WHO}: {server.url} was asked to load {title!r} but reports "
                f"{loaded or 'no checkpoint'!r} loaded"
            )
        entry = next((m for m in models if _same_model(loaded, m.get("title"))), {})
        return loaded, str(entry.get("hash") or "")

    # --- generation -------------------------------------------------------------------

    def generate(
        self, specs: list[PromptSpec], seeds: list[int]
    ) -> list[Candidate | ItemFailed]:
        if len(specs) != len(seeds):
            raise ValueError(f"{len(specs)} specs but {len(seeds)} seeds")
        if not specs:
            return []
        self._start()
        futures = [
            self._threads.submit(self._one, Job(spec, int(seed)))
            for spec, seed in zip(specs, seeds, strict=True)
        ]
        results, fatal = [], None
        for future in futures:
            try:
                results.append(future.result())
            except ChatroomError as exc:
                fatal = fatal or exc
        if fatal is not None:
            raise fatal
        return results

    def _one(self, job: Job) -> Candidate | ItemFailed:
        try:
            return self._remote.call(lambda: self._attempt(job))
        except remote.RemoteError:
            tries = len(job.errors)
            return ItemFailed(
                f"no image after {tries} attempt{'s' * (tries != 1)}: "
                + "; ".join(job.errors)
            )

    def _attempt(self, job: Job) -> Candidate:
        """One try on one server; raises so the policy retries elsewhere."""
        asked = time.perf_counter()
        server = self._pool.acquire(job)
        job.waited += time.perf_counter() - asked
        job.tried.add(server.url)
        started = time.perf_counter()
        try:
            result = self._run(server, self._payload(server, job))
            candidate = self._candidate(server, job, result)
        except Exception as exc:
            exc = _translate(exc)
            what = remote._describe(exc)
            job.errors.append(f"{server.url}: {what}")
            with self._lock:
                server.failures += 1
                server.failures_in_a_row += 1
                gone = isinstance(exc, WebUIConnectionError | WebUITimeout)
                if server.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    gone, what = True, f"{server.failures_in_a_row} failures in a row"
            if gone:
                self._pool.take_out(server, what)
            raise exc from None
        with self._lock:
            server.images += 1
            server.failures_in_a_row = 0
        candidate.timings = {
            "generate": time.perf_counter() - started,
            "wait_for_server": job.waited,
        }
        return candidate

    def _payload(self, server: Server, job: Job) -> dict[str, Any]:
        options, hires, wire = self.options, self.options.hires, server.wire
        override: dict[str, Any] = {"CLIP_stop_at_last_layers": options.clip_skip}
        if options.model:  # also guards against another client switching it
            override["sd_model_checkpoint"] = server.model
        return {
            "prompt": job.spec.prompt,
            "negative_prompt": job.spec.negative_prompt,
            "seed": job.seed,
            "sampler_name": wire.sampler_name,
            "sampler_index": wire.sampler_name,
            "scheduler": wire.scheduler,
            "steps": options.steps,
            "cfg_scale": options.cfg_scale,
            "width": options.width,
            "height": options.height,
            "enable_hr": hires.enabled,
            "hr_upscaler": server.upscaler or "Latent",
            "hr_scale": hires.scale,
            "hr_second_pass_steps": hires.steps,
            "denoising_strength": hires.denoise,
            "override_settings": override,
            "override_settings_restore_afterwards": True,
            "send_images": True,
            "save_images": False,
        }

    def _run(self, server: Server, payload: dict[str, Any]):
        """txt2img on a thread of its own, watched through the progress endpoint.

        The server stays busy until that thread ends, even when the job is given up
        for a stall, so that it never runs two of our jobs at once.
        """
        box: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                box["result"] = server.api.txt2img(**payload)
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()
                self._pool.release(server)

        threading.Thread(target=work, daemon=True, name="chatroom-webui-job").start()
        stall = self.options.stall_timeout
        poll = min(1.0, stall / 4)
        last, moved = None, time.monotonic()
        while not done.wait(poll):
            state = server.progress()
            now = time.monotonic()
            if state is not None and state != last:
                last, moved = state, now
            elif now - moved > stall:
                server.interrupt()
                with self._lock:
                    self._stalls += 1
                raise WebUIStallTimeout(f"no progress for {stall:g} s; interrupted")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _candidate(self, server: Server, job: Job, result) -> Candidate:
        """Check a reply and turn it into a candidate."""
        options = self.options
        if not result.images:
            raise WebUIBadReply("the reply holds no image")
        image = result.images[0]
        image.load()
        width, height = options.width, options.height
        sizes = (
            hires_size(width, height, options.hires.scale)
            if options.hires.enabled
            else {(width, height)}
        )
        if image.size not in sizes:
            want = " or ".join(f"{w}x{h}" for w, h in sorted(sizes))
            raise WebUIBadReply(
                f"image of {image.size[0]}x{image.size[1]}, asked for {want}"
            )
        info = result.info
        if not isinstance(info, dict) or not isinstance(info.get("seed"), int):
            raise WebUIBadReply("the reply's info names no seed")
        model_hash = str(info.get("sd_model_hash") or "")
        if options.model and server.model_hash and model_hash:
            if model_hash != server.model_hash:
                raise WebUIBadReply(
                    f"generated with checkpoint {info.get('sd_model_name')!r} "
                    f"[{model_hash}], not {server.model!r}"
                )

        warnings = []
        seed = info["seed"]
        if seed != job.seed:
            warnings.append(f"the server used seed {seed}, not {job.seed}")
        used = info.get("sampler_name")
        if used and used != server.wire.sampler_name:
            warnings.append(
                f"the server used sampler {used!r}, not {server.wire.sampler_name!r}"
            )
        skip = info.get("clip_skip")
        if skip is not None and int(skip) != options.clip_skip:
            warnings.append(
                f"the server used CLIP skip {skip}, not {options.clip_skip}"
            )
        hires = options.hires.model_copy(
            update={"upscaler": server.upscaler or options.hires.upscaler}
        )
        settings = GenerationSettings(
            model=server.model,
            sampler=server.wire.label,
            steps=options.steps,
            cfg_scale=options.cfg_scale,
            width=width,
            height=height,
            clip_skip=options.clip_skip,
            hires=hires,
            seed=seed,
        )
        return Candidate(
            index=job.spec.index,
            item_id=job.spec.item_id,
            spec=job.spec,
            settings=settings,
            image=image.convert("RGB"),
            received_prompt=info.get("prompt", job.spec.prompt),
            warnings=warnings,
        )

    # --- reporting --------------------------------------------------------------------

    def usage(self) -> dict[str, float]:
        counts = self.meter.usage()
        return {
            "images": sum(s.images for s in self.servers),
            "calls": counts.get("calls", 0),
            "retries": counts.get("retries", 0),
            "server_failures": sum(s.failures for s in self.servers),
            "stalls": self._stalls,
            "revivals": sum(s.revivals for s in self.servers),
            "servers_up": sum(1 for s in self.servers if s.up),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "servers": [
                {
                    "url": remote.safe_url(s.url),
                    "up": s.up,
                    "model": s.model,
                    "model_hash": s.model_hash,
                    "sampler_name": s.wire.sampler_name if s.wire else None,
                    "scheduler": s.wire.scheduler if s.wire else None,
                    "schedulers_endpoint": s.has_schedulers,
                    "hires_upscaler": s.upscaler or None,
                    "images": s.images,
                    "failures": s.failures,
                }
                for s in self.servers
            ]
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        for server in self.servers:
            for api in (server.api, server.monitor):
                if api is not None:
                    api.session.close()


def _optional(read) -> list[dict[str, Any]] | None:
    """An endpoint some versions lack: None when the server answers 404."""
    try:
        return read()
    except WebUIHTTPError as exc:
        if exc.status_code == 404:
            return None
        raise


def _same_model(loaded: str | None, title: str | None) -> bool:
    """Titles equal, or equal without the ``[hash]`` some versions leave off."""
    if not loaded or not title:
        return False
    return loaded == title or HASH_SUFFIX.sub("", loaded) == HASH_SUFFIX.sub("", title)


@hookimpl
def register_generators(register):
    register(WebUIGenerator)
