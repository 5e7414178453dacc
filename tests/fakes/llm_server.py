"""A fake LLM on 127.0.0.1 that speaks OpenAI chat completions and Anthropic messages.

It reads the items a prompter sends (the fenced JSON in the last user message) and
writes a plausible Stable Diffusion prompt for each from its attribute values,
deterministically. Fault switches make it fail the way the real services do:

    with FakeLLMServer() as llm:
        llm.faults.extend(["rate_limit", "server_error"])  # the next two requests
        llm.always = "quota"                                # every request, until None

Faults: rate_limit (429 with retry-after), server_error (500), unavailable (503),
overloaded (529), timeout (answers after ``slow_seconds``), truncated (the body
stops short of its Content-Length), malformed (a 200 that is not JSON), fenced (JSON
in a code fence), prose (JSON amid sentences), length (cut at the token limit),
refusal (the API's refusal signal), refusal_text (an apology as content), quota
(OpenAI ``insufficient_quota`` / Anthropic ``billing_error``), duplicate (an earlier
prompt for every item), missing (the last item left out), ok (no fault).

A reply longer than the request's ``max_tokens`` (four characters a token) is cut
and marked as such, as a real model's would be.

It also plays a vision model. A request with an image (an OpenAI ``image_url`` part
with a base64 data URL, or an Anthropic base64 ``image`` block) must carry a PNG or
JPEG whose bytes match the declared media type, no larger than ``max_image_bytes``
and ``max_image_side``; anything else gets the 400 a real service sends. With a
fenced JSON object of questions ``{"key": "question"}`` in its text, it answers a
JSON object with the same keys in English, from ``vision_answers(image, questions)``
(by default read off the picture: its colours, its size); with no questions it
answers the key-attributes question with ``key_attributes``. ``refuse_image(image)``
returning true makes it refuse that image with the API's refusal signal. What it
received and answered is in ``requests[n]["images"]`` and ``["answers"]``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

QUALITY = [
    "best quality, ultra high res, (photorealistic:1.4), raw photo",
    "masterpiece, best quality, 8k, (realistic:1.3), raw photo",
    "(best quality:1.2), high detail, photorealistic, film grain",
    "award-winning photo, sharp focus, (hyperrealistic:1.2)",
]
SLOTS = [
    ["1woman, solo", "1man, solo", "1girl, adult, solo", "young woman, solo"],
    ["long wavy hair", "short bob", "braided hair", "ponytail", "buzz cut", "bun"],
    ["slight smile", "serious look", "laughing", "calm face", "pout", "smirk"],
    ["editorial", "street style", "lookbook", "catalogue", "candid", "runway"],
    ["studio lighting", "golden hour", "overcast day", "rim light", "window light"],
    ["85mm lens", "35mm dslr", "50mm f1.8", "full frame", "medium format", "24mm"],
    ["city street", "white studio", "park path", "loft interior", "beach", "rooftop"],
    ["spring", "summer", "autumn", "winter", "evening", "morning"],
]
FENCE = re.compile(r"```[a-zA-Z]*\s*\n(.*?)```", re.DOTALL)

# The vision side: what a model might say about a photo, per attribute.
PHRASES = {
    "garment": [
        "a denim jacket and jeans",
        "a floral midi dress",
        "a white t-shirt and black trousers",
        "a long camel coat",
        "a striped shirt and chinos",
        "a knitted sweater and pleated skirt",
    ],
    "pattern": ["plain", "vertical stripes", "small floral print", "checked", "ribbed"],
    "footwear": [
        "white sneakers",
        "black ankle boots",
        "brown loafers",
        "strappy sandals",
        "red heels",
    ],
    "accessory": [
        "a leather handbag",
        "sunglasses",
        "a wide-brimmed hat",
        "a silk scarf",
        "none",
    ],
    "pose": ["standing straight", "walking forward", "hands on hips", "mid-stride"],
    "background": [
        "a plain white wall",
        "a grey studio backdrop",
        "a city street",
        "a park path",
    ],
    "fabric": ["cotton", "denim", "wool", "linen", "silk"],
    "fit": ["relaxed fit", "slim fit", "oversized", "tailored"],
    "silhouette": ["straight", "boxy", "fitted", "flared"],
}
GENERIC = ["hard to tell", "simple and clean", "classic", "modern"]
COLOURS = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "grey": (128, 128, 128),
    "red": (190, 40, 40),
    "navy": (30, 40, 90),
    "blue": (60, 110, 200),
    "green": (50, 130, 60),
    "beige": (215, 195, 160),
    "brown": (120, 80, 50),
    "pink": (230, 150, 170),
}
KEY_ATTRIBUTES = "Garment, color, fabric, fit and silhouette."
MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}


def colour_name(image: Image.Image) -> str:
    """The named colour nearest the mean of the picture's centre."""
    w, h = image.size
    centre = image.convert("RGB").crop((w // 3, h // 4, 2 * w // 3, 3 * h // 4))
    mean = centre.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))

    def distance(name: str) -> int:
        return sum((a - b) ** 2 for a, b in zip(COLOURS[name], mean, strict=True))

    return min(COLOURS, key=distance)


def describe_photo(image: Image.Image, questions: dict[str, str]) -> dict[str, str]:
    """Scripted answers for one picture: the same picture gets the same answers."""
    colour = colour_name(image)
    out = {}
    for key in questions:
        if key in ("color", "colour"):
            out[key] = colour
            continue
        choices = PHRASES.get(key, GENERIC)
        digest = hashlib.sha256(f"{image.size}:{colour}:{key}".encode()).digest()
        out[key] = choices[digest[0] % len(choices)]
    return out


def write_prompt(attributes: dict[str, str], salt: str = "") -> str:
    """A deterministic SD prompt that uses every attribute value verbatim."""
    text = json.dumps(attributes, sort_keys=True) + salt
    digest = hashlib.sha256(text.encode()).digest()
    extras = [slot[digest[n + 1] % len(slot)] for n, slot in enumerate(SLOTS)]
    quality = QUALITY[digest[0] % len(QUALITY)]
    return ", ".join([quality, *attributes.values(), "(full body:1.3)", *extras])


def openai_error(status: int, kind: str, message: str, code: str | None = None):
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return status, body


def anthropic_error(status: int, kind: str, message: str):
    return status, {"type": "error", "error": {"type": kind, "message": message}}


ERRORS = {
    "openai": {
        "rate_limit": openai_error(
            429,
            "requests",
            "Rate limit reached for gpt-3.5-turbo on requests per min (RPM): "
            "Limit 3, Used 3, Requested 1.",
            "rate_limit_exceeded",
        ),
        "server_error": openai_error(
            500,
            "server_error",
            "The server had an error while processing your request. Sorry about that!",
        ),
        "unavailable": openai_error(
            503, "server_error", "The engine is currently overloaded."
        ),
        "overloaded": openai_error(529, "server_error", "Overloaded"),
        "quota": openai_error(
            429,
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing "
            "details. For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "insufficient_quota",
        ),
    },
    "anthropic": {
        "rate_limit": anthropic_error(
            429,
            "rate_limit_error",
            "This request would exceed the rate limit for your organization.",
        ),
        "server_error": anthropic_error(500, "api_error", "Internal server error"),
        "unavailable": anthropic_error(503, "api_error", "Service unavailable"),
        "overloaded": anthropic_error(529, "overloaded_error", "Overloaded"),
        "quota": anthropic_error(
            402,
            "billing_error",
            "Your credit balance is too low to access the Anthropic API. Please go "
            "to Plans & Billing to upgrade or purchase credits.",
        ),
    },
}


class FakeLLMServer:
    """The server; ``requests`` lists what each call asked for and got."""

    def __init__(self, key: str = "sk-fake-0123456789abcdef", retry_after="0.05"):
        self.key = key
        self.retry_after = retry_after
        self.slow_seconds = 3.0
        self.faults: deque[str] = deque()
        self.always: str | None = None
        self.delay = 0.0  # seconds every request takes
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.last_prompt: str | None = None
        # The vision side.
        self.max_image_bytes = 5 * 1024 * 1024
        self.max_image_side = 8000
        self.vision_answers = describe_photo
        self.key_attributes = KEY_ATTRIBUTES
        self.refuse_image = None  # a callable: image -> True to refuse it
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- lifetime ------------------------------------------------------------------

    def start(self) -> FakeLLMServer:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, daemon=True, name="fake-llm"
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def base_url(self, provider: str) -> str:
        """What a client's base_url should be: OpenAI's includes /v1."""
        return self.url + "/v1" if provider == "openai" else self.url

    # --- behaviour -----------------------------------------------------------------

    def next_fault(self) -> str | None:
        with self.lock:
            if self.always:
                return self.always
            return self.faults.popleft() if self.faults else None

    def calls(self, fault: str | None = "any") -> int:
        """Requests that reached the model (authorised), with a given fault or any."""
        rows = [r for r in self.requests if r["authorised"]]
        return len(rows if fault == "any" else [r for r in rows if r["fault"] == fault])


class _Handler(BaseHTTPRequestHandler):
    fake: FakeLLMServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        fake = self.fake
        with fake.lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            time.sleep(fake.delay)
            self._answer()
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._json(400, {"error": {"message": "bad JSON"}})
        if self.path.rstrip("/").endswith("/chat/completions"):
            provider = "openai"
        elif self.path.rstrip("/").endswith("/v1/messages"):
            provider = "anthropic"
        else:
            return self._json(404, {"error": {"message": f"no route {self.path}"}})

        fake = self.fake
        authorised = self._authorised(provider)
        fault = fake.next_fault() if authorised else None
        items = _items(body)
        images, image_problem = _images(body, provider, fake)
        request = {
            "provider": provider,
            "path": self.path,
            "model": body.get("model"),
            "items": len(items),
            "item_keys": [row.get("item") for row in items],
            "fault": fault,
            "authorised": authorised,
            "user_agent": self.headers.get("user-agent", ""),
            "images": [info for info, _ in images],
        }
        with fake.lock:
            fake.requests.append(request)
        if not authorised:
            return self._unauthorised(provider)
        if image_problem and fault not in ERRORS[provider]:
            maker = openai_error if provider == "openai" else anthropic_error
            return self._json(*maker(400, "invalid_request_error", image_problem))
        if fault in ERRORS[provider]:
            status, error = ERRORS[provider][fault]
            headers = {}
            if fault in ("rate_limit", "overloaded"):
                headers["retry-after"] = str(fake.retry_after)
            return self._json(status, error, headers)
        if fault == "timeout":
            time.sleep(fake.slow_seconds)
        if fault == "malformed":
            return self._raw(200, b'{"id": "chatcmpl-broken", "choices": [{"ind')
        if fault == "truncated":
            return self._raw(200, b'{"id": "x", "object": "chat.com', declared=400)

        refusal = None
        if images:
            answer, refusal = self._look(images, body, request)
            if refusal and provider == "anthropic":  # Claude says why, as text
                answer = refusal
            if answer and fault == "fenced":
                answer = f"Here you are:\n```json\n{answer}\n```"
            elif answer and fault == "prose":
                answer = f"Sure! {answer} Anything else?"
            return self._reply(provider, body, answer, fault, refusal, images)

        prompts = {}
        for row in items:
            # Like a sampling model, the same attributes read differently each time.
            salt = f"{len(fake.requests)}:{row['item']}:{row.get('too_close_to', '')}"
            prompts[row["item"]] = write_prompt(row.get("attributes", {}), salt)
        if fault == "duplicate" and prompts:  # a prompt it wrote before, for all
            first = fake.last_prompt or next(iter(prompts.values()))
            prompts = dict.fromkeys(prompts, first)
        if fault == "missing" and prompts:
            prompts.pop(list(prompts)[-1])
        if prompts:
            fake.last_prompt = list(prompts.values())[-1]
        answer = json.dumps([{"item": k, "prompt": v} for k, v in prompts.items()])
        if fault == "fenced":
            answer = f"Here are the prompts:\n```json\n{answer}\n```\nEnjoy!"
        elif fault == "prose":
            answer = f"Sure! Here they are: {answer} Let me know if you want more."
        return self._reply(provider, body, answer, fault, refusal)

    def _look(self, images, body, request) -> tuple[str, str | None]:
        """A vision model's answer about the (first) image, or its refusal."""
        fake = self.fake
        image = images[0][1]
        if fake.refuse_image is not None and fake.refuse_image(image):
            request["answers"] = None
            return "", "I'm sorry, but I can't help with describing this image."
        questions = _questions(body)
        if questions:
            answers = fake.vision_answers(image, questions)
            request["answers"] = answers
            return json.dumps(answers), None
        request["answers"] = fake.key_attributes
        return fake.key_attributes, None

    def _reply(self, provider, body, answer, fault, refusal, images=()) -> None:
        """The 200 reply, after the faults that shape an answer."""
        fake = self.fake
        stop = "refusal" if refusal else "stop"
        limit = int(body.get("max_tokens") or 4096)
        if fault == "length" or len(answer) // 4 > limit:
            answer, stop = answer[: min(len(answer) // 2, limit * 4)], "length"
        if fault == "refusal":
            answer, refusal, stop = "", "I'm sorry, I can't help with that.", "refusal"
        elif fault == "refusal_text":
            answer = "I'm sorry, but I can't help with that request."

        # Images cost what Anthropic documents (pixels / 750), not their base64.
        text = json.dumps(body)
        for info, _ in images:
            text = text.replace(info["data"], "")
        prompt_tokens = len(text) // 4 + sum(
            math.ceil(info["width"] * info["height"] / 750) for info, _ in images
        )
        completion_tokens = max(1, len(answer) // 4)
        number = len(fake.requests)
        if provider == "openai":
            reply = _openai_reply(
                number, body, answer, stop, refusal, prompt_tokens, completion_tokens
            )
        else:
            reply = _anthropic_reply(
                number, body, answer, stop, prompt_tokens, completion_tokens
            )
        return self._json(200, reply)

    # --- helpers -------------------------------------------------------------------

    def _authorised(self, provider: str) -> bool:
        key = self.fake.key
        bearer = self.headers.get("authorization", "") == f"Bearer {key}"
        if provider == "anthropic":
            return bearer or self.headers.get("x-api-key") == key
        return bearer

    def _unauthorised(self, provider: str) -> None:
        sent = self.headers.get("authorization", "").removeprefix("Bearer ")
        shown = f"{sent[:3]}***{sent[-4:]}" if len(sent) > 8 else "***"
        if provider == "openai":
            status, body = openai_error(
                401,
                "invalid_request_error",
                f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_api_key",
            )
        else:
            status, body = anthropic_error(
                401, "authentication_error", "invalid x-api-key"
            )
        self._json(status, body)

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-request-id", f"req_fake_{len(self.fake.requests)}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _raw(self, status: int, data: bytes, declared: int | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(declared or len(data)))
        self.end_headers()
        self.wfile.write(data)
        if declared:  # hang up mid-body
            self.wfile.flush()
            self.close_connection = True


def _items(body: dict) -> list[dict]:
    """The items of the last user message: its fenced JSON list."""
    messages = body.get("messages") or []
    if not messages:
        return []
    content = messages[-1].get("content")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    for block in FENCE.findall(content or ""):
        try:
            rows = json.loads(block)
        except ValueError:
            continue
        if isinstance(rows, list):
            return [r for r in rows if isinstance(r, dict) and "item" in r]
    return []


def _image_parts(body: dict, provider: str) -> list[tuple[str, str]]:
    """(declared media type, base64 data) of every image in the messages."""
    out = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            if provider == "openai" and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                head, _, data = url.partition(",")
                media = head.removeprefix("data:").removesuffix(";base64")
                if not head.startswith("data:") or not head.endswith(";base64"):
                    media, data = "url", url
                out.append((media, data))
            elif provider == "anthropic" and part.get("type") == "image":
                source = part.get("source") or {}
                if source.get("type") != "base64":
                    out.append(("url", str(source.get("url", ""))))
                else:
                    out.append((source.get("media_type", ""), source.get("data", "")))
    return out


def _images(body: dict, provider: str, fake: FakeLLMServer):
    """The decoded images ([(info, PIL image)]) and the first problem, or None."""
    images = []
    for media, data in _image_parts(body, provider):
        if media == "url":
            return images, "only base64 images are accepted here"
        if media not in MAGIC:
            return images, f"Unsupported image media type: {media}"
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return images, "Invalid base64 image data"
        if not raw.startswith(MAGIC[media]):
            return (
                images,
                f"The image was specified using the {media} media type, but does not appear to be a valid {media} image",
            )
        if len(raw) > fake.max_image_bytes:
            return images, f"image exceeds {fake.max_image_bytes} bytes ({len(raw)})"
        try:
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                image = img.copy()
                kind = img.format
        except Exception:
            return images, "Could not process image"
        if max(image.size) > fake.max_image_side:
            return images, f"image dimensions exceed max allowed size: {image.size}"
        info = {
            "media_type": media,
            "format": kind,
            "mode": image.mode,
            "width": image.width,
            "height": image.height,
            "bytes": len(raw),
            "base64_chars": len(data),
            "data": data,
        }
        images.append((info, image))
    return images, None


def _questions(body: dict) -> dict[str, str]:
    """The questions of a vision request: a fenced JSON object in its text."""
    texts = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p.get("text", "") for p in content if isinstance(p, dict)]
    for block in FENCE.findall("\n".join(texts)):
        try:
            rows = json.loads(block)
        except ValueError:
            continue
        if isinstance(rows, dict):
            return {str(k): str(v) for k, v in rows.items()}
    return {}


def _openai_reply(number, body, answer, stop, refusal, prompt_tokens, completion):
    finish = {"refusal": "stop"}.get(stop, stop)
    return {
        "id": f"chatcmpl-fake{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": answer or None,
                    "refusal": refusal,
                },
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        },
    }


def _anthropic_reply(number, body, answer, stop, prompt_tokens, completion):
    stop_reason = {"stop": "end_turn", "length": "max_tokens"}.get(stop, stop)
    content = [{"type": "text", "text": answer}] if answer else []
    return {
        "id": f"msg_fake{number}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", ""),
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": completion},
    }
