"""A fake Stable Diffusion WebUI on 127.0.0.1 that speaks the AUTOMATIC1111 API.

It draws a deterministic picture from the prompt and the seed, at the size the
request asks for (times the hires scale), and answers ``info`` as the WebUI does: a
JSON string with the seed, sampler and the rest. Two generations of the API:

- ``mode="new"`` (WebUI 1.9 and newer, Forge): samplers without scheduler suffixes,
  a ``/sdapi/v1/schedulers`` endpoint, and ``txt2img`` takes ``scheduler``;
- ``mode="old"`` (before 1.9): "DPM++ 2M SDE Karras" is one sampler name and there
  is no schedulers endpoint (404).

Like the real server it generates one image at a time and reports the current job
on ``/sdapi/v1/progress``. Fault switches make it fail the way real servers do:

    with FakeWebUIServer(mode="old") as webui:
        webui.faults.extend(["server_error", "hang"])  # the next two txt2img calls
        webui.always = "unavailable"                    # every call, until None
        webui.fail_if = lambda seed: seed % 4 == 0      # these seeds always get a 500
        webui.kill()                                    # connections reset, port shut
        webui.start()                                   # back on the same port

Faults: server_error (500), unavailable (503 with retry-after), hang (no progress
until interrupted; then the partial result, as the WebUI returns it), slow (answers
after ``slow_seconds`` with progress moving), wrong_size (an image of another size),
no_images (an empty ``images`` list), html (a 200 HTML page), bad_info (``info``
without a seed), ok (no fault).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NEW_SAMPLERS = [
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 2S a",
    "DPM++ 3M SDE",
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DDIM",
    "UniPC",
]
OLD_SAMPLERS = [
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "DPM++ 2M SDE Exponential",
    "DPM++ 2M SDE Karras",
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DDIM",
    "UniPC",
]
SCHEDULERS = [
    ("automatic", "Automatic"),
    ("uniform", "Uniform"),
    ("karras", "Karras"),
    ("exponential", "Exponential"),
    ("polyexponential", "Polyexponential"),
    ("sgm_uniform", "SGM Uniform"),
]
UPSCALERS = [
    "None",
    "Lanczos",
    "Nearest",
    "ESRGAN_4x",
    "R-ESRGAN 4x+",
    "R-ESRGAN 4x+ Anime6B",
    "SwinIR_4x",
]
LATENT_MODES = [
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (nearest)",
]
MODELS = [
    ("majicmixRealistic_v6.safetensors", "e4a30e4607"),
    ("v1-5-pruned-emaonly.safetensors", "6ce0161689"),
]


class FakeWebUIServer:
    """The server; ``requests`` lists every txt2img payload and the fault it got."""

    def __init__(
        self,
        mode: str = "new",
        delay: float = 0.0,
        models=MODELS,
        upscalers=UPSCALERS,
        retry_after: str = "0.05",
    ):
        if mode not in ("new", "old"):
            raise ValueError(f"mode is 'new' or 'old', not {mode!r}")
        self.mode = mode
        self.delay = delay  # seconds each image takes
        self.slow_seconds = 3.0
        self.retry_after = retry_after
        self.samplers = list(NEW_SAMPLERS if mode == "new" else OLD_SAMPLERS)
        self.upscalers = list(upscalers)
        self.models = [
            {
                "title": f"{name} [{short}]",
                "model_name": name.rsplit(".", 1)[0],
                "hash": short,
                "sha256": hashlib.sha256(name.encode()).hexdigest(),
                "filename": f"/models/Stable-diffusion/{name}",
                "config": None,
            }
            for name, short in models
        ]
        self.options: dict[str, Any] = {
            "sd_model_checkpoint": self.models[0]["title"],
            "CLIP_stop_at_last_layers": 1,
        }
        self.ignore_model = False  # POST options "succeeds" but keeps the old model
        self.seed_offset = 0  # the seed it reports is the asked one plus this
        self.faults: deque[str] = deque()
        self.always: str | None = None
        self.fail_if: Callable[[int], bool] | None = None
        self.requests: list[dict[str, Any]] = []
        self.interrupts = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = 0
        self.lock = threading.Lock()
        self.gpu = threading.Lock()  # one image at a time, as the WebUI's queue
        self.interrupted = threading.Event()
        self.job: dict[str, Any] | None = None
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    # --- lifetime ------------------------------------------------------------------

    def start(self) -> FakeWebUIServer:
        """Listen on 127.0.0.1: a free port the first time, the same one after."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever,
            args=(0.05,),
            daemon=True,
            name="fake-webui",
        ).start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection, as a crashed server does."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self.lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.interrupted.set()  # a hung job dies with the process

    kill = stop

    @property
    def alive(self) -> bool:
        return self._server is not None

    def __enter__(self) -> FakeWebUIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- behaviour -----------------------------------------------------------------

    def next_fault(self, seed: int) -> str | None:
        with self.lock:
            if self.fail_if is not None and self.fail_if(seed):
                return "server_error"
            if self.always:
                return self.always
            return self.faults.popleft() if self.faults else None

    def images_made(self) -> int:
        return sum(1 for r in self.requests if r["fault"] in (None, "ok", "slow"))

    def sampler_known(self, payload: dict[str, Any]) -> bool:
        if payload.get("sampler_name") not in self.samplers:
            return False
        if self.mode == "old":
            return True
        scheduler = payload.get("scheduler")
        return scheduler is None or any(scheduler in pair for pair in SCHEDULERS)

    def upscaler_known(self, name: str) -> bool:
        return name in self.upscalers or name in LATENT_MODES

    def draw(self, prompt: str, seed: int, width: int, height: int) -> str:
        """A base64 PNG, the same for the same prompt, seed and size."""
        import numpy as np
        from PIL import Image

        digest = hashlib.sha256(f"{prompt}:{seed}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        # Blocks of colour: compresses well, and is not blank.
        small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3))
        image = Image.fromarray(small.astype(np.uint8)).resize(
            (width, height), Image.NEAREST
        )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return base64.b64encode(buffer.getvalue()).decode()

    def info(self, payload: dict[str, Any], seed: int, sampler: str) -> str:
        model = next(
            m for m in self.models if m["title"] == self.options["sd_model_checkpoint"]
        )
        clip_skip = payload.get("override_settings", {}).get(
            "CLIP_stop_at_last_layers", self.options["CLIP_stop_at_last_layers"]
        )
        extra: dict[str, Any] = {}
        if self.mode == "new" and payload.get("scheduler") not in (None, "automatic"):
            label = dict(SCHEDULERS).get(payload["scheduler"], payload["scheduler"])
            extra["Schedule type"] = label
        if payload.get("enable_hr"):
            extra.update(
                {
                    "Hires upscale": payload.get("hr_scale"),
                    "Hires steps": payload.get("hr_second_pass_steps"),
                    "Hires upscaler": payload.get("hr_upscaler"),
                    "Denoising strength": payload.get("denoising_strength"),
                }
            )
        return json.dumps(
            {
                "prompt": payload.get("prompt", ""),
                "all_prompts": [payload.get("prompt", "")],
                "negative_prompt": payload.get("negative_prompt", ""),
                "seed": seed,
                "all_seeds": [seed],
                "subseed": 1234,
                "width": payload.get("width"),
                "height": payload.get("height"),
                "sampler_name": sampler,
                "cfg_scale": payload.get("cfg_scale"),
                "steps": payload.get("steps"),
                "clip_skip": clip_skip,
                "sd_model_name": model["model_name"],
                "sd_model_hash": model["hash"],
                "extra_generation_params": extra,
                "version": "v1.10.1" if self.mode == "new" else "v1.6.0",
            }
        )


class _Handler(BaseHTTPRequestHandler):
    fake: FakeWebUIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        # As uvicorn does: without it, the body written after the headers waits for
        # the client's delayed ACK (40 ms) on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.fake.lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.fake.lock:
            self.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    # --- plumbing --------------------------------------------------------------------

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None):
        data = json.dumps(body).encode()
        self._raw(status, data, "application/json", headers)

    def _raw(self, status, data: bytes, content_type: str, headers=None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up, or the server was killed
            pass

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        return json.loads(raw or b"{}")

    def _not_found(self) -> None:
        self._send(404, {"detail": "Not Found"})

    # --- routes ------------------------------------------------------------------------

    def do_GET(self) -> None:
        fake = self.fake
        path = self.path.split("?")[0]
        if path == "/sdapi/v1/samplers":
            self._send(
                200,
                [{"name": n, "aliases": [], "options": {}} for n in fake.samplers],
            )
        elif path == "/sdapi/v1/schedulers" and fake.mode == "new":
            self._send(
                200,
                [
                    {"name": n, "label": label, "aliases": None, "default_rho": -1}
                    for n, label in SCHEDULERS
                ],
            )
        elif path == "/sdapi/v1/upscalers":
            self._send(
                200,
                [{"name": n, "model_name": None, "scale": 4} for n in fake.upscalers],
            )
        elif path == "/sdapi/v1/latent-upscale-modes":
            self._send(200, [{"name": n} for n in LATENT_MODES])
        elif path == "/sdapi/v1/sd-models":
            self._send(200, fake.models)
        elif path == "/sdapi/v1/options":
            self._send(200, dict(fake.options))
        elif path == "/sdapi/v1/progress":
            self._send(200, self._progress())
        else:
            self._not_found()

    def do_POST(self) -> None:
        fake = self.fake
        path = self.path.split("?")[0]
        body = self._body()
        if path == "/sdapi/v1/options":
            title = body.get("sd_model_checkpoint")
            titles = [m["title"] for m in fake.models]
            if title is not None and title not in titles:
                self._send(
                    500,
                    {"error": "RuntimeError", "detail": f"model {title!r} not found"},
                )
                return
            for key, value in body.items():
                if key == "sd_model_checkpoint" and fake.ignore_model:
                    continue
                fake.options[key] = value
            self._send(200, None)
        elif path == "/sdapi/v1/interrupt":
            fake.interrupts += 1
            fake.interrupted.set()
            self._send(200, {})
        elif path == "/sdapi/v1/txt2img":
            self._txt2img(body)
        else:
            self._not_found()

    def _progress(self) -> dict[str, Any]:
        job = self.fake.job
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": {"job_count": 0}}
        if job["frozen"]:
            done = 0.1
        else:
            span = job["seconds"] or 1e-3
            done = min(1.0, (time.monotonic() - job["started"]) / span)
        steps = job["steps"]
        return {
            "progress": done,
            "eta_relative": 0.0,
            "state": {
                "job_count": 1,
                "job_no": 0,
                "sampling_step": int(done * steps),
                "sampling_steps": steps,
                "job_timestamp": job["timestamp"],
                "interrupted": self.fake.interrupted.is_set(),
            },
            "current_image": None,
        }

    def _txt2img(self, payload: dict[str, Any]) -> None:
        fake = self.fake
        seed = int(payload.get("seed", -1))
        fault = fake.next_fault(seed)
        with fake.lock:
            fake.requests.append({"payload": payload, "fault": fault})
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            self._generate(payload, seed, fault)
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def _generate(self, payload: dict[str, Any], seed: int, fault: str | None):
        fake = self.fake
        if fault == "server_error":
            self._send(
                500,
                {
                    "error": "RuntimeError",
                    "detail": "",
                    "body": "",
                    "errors": "CUDA error: an illegal memory access was encountered",
                },
            )
            return
        if fault == "unavailable":
            self._send(
                503,
                {"detail": "Service Unavailable"},
                {"Retry-After": fake.retry_after},
            )
            return
        if not fake.sampler_known(payload):
            self._send(404, {"detail": "Sampler not found"})
            return
        if payload.get("enable_hr") and not fake.upscaler_known(
            payload.get("hr_upscaler", "")
        ):
            self._send(
                500,
                {"error": "ValueError", "detail": "could not find upscaler named"},
            )
            return

        width, height = int(payload.get("width", 512)), int(payload.get("height", 512))
        if payload.get("enable_hr"):
            scale = float(payload.get("hr_scale") or 2)
            width, height = int(width * scale), int(height * scale)
        if fault == "wrong_size":
            width, height = width // 2, height // 2
        real_seed = seed + fake.seed_offset

        with fake.gpu:  # one job at a time, as the real server's queue
            fake.interrupted.clear()
            seconds = fake.slow_seconds if fault == "slow" else fake.delay
            started = time.monotonic()
            fake.job = {
                "started": started,
                "seconds": seconds,
                "steps": int(payload.get("steps") or 20),
                "frozen": fault == "hang",
                "timestamp": time.strftime("%Y%m%d%H%M%S"),
            }
            try:
                # The picture is drawn inside the image's time, so that ``delay``
                # is the whole time an image takes.
                images = (
                    []
                    if fault == "no_images"
                    else [
                        fake.draw(payload.get("prompt", ""), real_seed, width, height)
                    ]
                )
                if fault == "hang":
                    fake.interrupted.wait()
                elif seconds:
                    fake.interrupted.wait(seconds - (time.monotonic() - started))
            finally:
                fake.job = None
            if not fake.alive:
                return  # killed while it worked: the connection is already cut

        if fault == "html":
            page = b"<html><body>502 Bad Gateway</body></html>"
            self._raw(200, page, "text/html")
            return
        info = fake.info(payload, real_seed, payload["sampler_name"])
        if fault == "bad_info":
            info = json.dumps({"prompt": payload.get("prompt", "")})
        self._send(200, {"images": images, "parameters": payload, "info": info})
