"""A vision model behind an API answers the attribute chat: GPT-4o, Claude, or any
OpenAI-compatible server (vLLM, Ollama, llama.cpp) by base URL.

The chat follows the BLIP-2 extractor's: the pack's key-attributes question about the
first reference adds up to ``discover`` attributes, then every reference is asked the
attribute questions. A remote model reads a list of questions as easily as one, and
the picture is the costly part of a request, so each reference is one request with
all its questions, answered as a JSON object; each answer goes through BLIP-2's guard
(empty, echoed, looping, not words) and the questions left without a usable answer
are asked once more.

Pictures are read by their content, never their file name: a JPEG or PNG within
``max_side`` and ``max_bytes`` is sent as it is; anything else (WebP, TIFF, BMP, GIF,
CMYK, palette, 16-bit, rotated by EXIF, too large) is converted to an upright 8-bit
RGB JPEG, shrunk until it fits, and sent base64.

A refusal (OpenAI's ``refusal`` field or ``content_filter``, Anthropic's ``refusal``
stop reason, or a reply that only apologises) or a request that failed for good is
recorded in failures.jsonl with its reason; the ``fallback`` extractor, if one is
configured, answers for those references instead. Each row of attributes.jsonl names
the extractor that answered it.

Every call goes through ``chatroom.plugins.remote``: the shared concurrency limit,
retries, quota and key errors, token and cost counting, the ``max_cost_usd`` cap.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from chatroom.components import Context, Extractor, validate_options
from chatroom.errors import ChatroomError, ConfigError, PluginError
from chatroom.hookspecs import hookimpl
from chatroom.models import AttributeBank, BankEntry, Failure, Reference
from chatroom.references import load_image

from . import remote
from .blip2 import answer_problem, clean_answer, parse_attributes
from .llm_prompter import (
    REFUSAL,
    AnthropicMessages,
    ChatAPIClient,
    ChatAPIOptions,
    OpenAIChat,
    Reply,
    find_json,
)

log = logging.getLogger(__name__)

PUBLIC = {
    "openai": ("https://api.openai.com/v1", "gpt-4o", "OPENAI_API_KEY"),
    "anthropic": (
        "https://api.anthropic.com",
        "claude-sonnet-4-5",
        "ANTHROPIC_API_KEY",
    ),
}
MAX_ASKS = 2  # requests one reference may take for answers that were missing or bad
# Sent as they are: these formats in these modes; everything else is converted.
AS_IS = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "L")}
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}
ORIENTATION = 0x0112  # the EXIF tag
MIN_SIDE = 64  # a picture is not shrunk below this to fit max_bytes


class VisionOptions(ChatAPIOptions):
    public: ClassVar[dict[str, tuple[str, str, str]]] = PUBLIC

    model: str = Field("", description="Default: gpt-4o / claude-sonnet-4-5.")
    discover: int = Field(
        3, ge=0, description="How many key attributes the model may add to the pack's."
    )
    max_side: int = Field(
        1568,
        ge=64,
        le=8000,
        description="Longest side in pixels of a picture as sent; larger ones shrink.",
    )
    max_bytes: int = Field(
        3_750_000,
        ge=20_000,
        description="Largest picture sent, in bytes before base64 (3.75 MB is 5 MB "
        "encoded, Anthropic's limit).",
    )
    jpeg_quality: int = Field(
        90, ge=30, le=100, description="JPEG quality of converted pictures."
    )
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="OpenAI's image detail level (tokens per picture)."
    )
    max_tokens: int = Field(400, ge=16, description="Reply token limit per call.")
    temperature: float | None = Field(
        0.0,
        ge=0,
        le=2,
        description="Sampling temperature; 0 reads a photo the same way.",
    )
    fallback: str = Field(
        "",
        description="Another extractor (e.g. blip2, static) that answers for "
        "references the model refused or failed on.",
    )
    fallback_options: dict[str, Any] = Field(
        default_factory=dict, description="The fallback extractor's own options."
    )


# --- pictures ----------------------------------------------------------------------


@dataclass
class Picture:
    """One reference as sent: its bytes, media type and size, and what it was."""

    data: bytes
    media_type: str
    width: int
    height: int
    source: str  # "JPEG RGB 768x1024", the file as read
    converted: bool

    @property
    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")


def prepare_picture(
    path: str | Path, max_side: int, max_bytes: int, quality: int = 90
) -> Picture:
    """A JPEG or PNG of the picture at ``path`` within the size limits.

    The format is read from the bytes, not the file name. A JPEG or PNG that is 8-bit
    RGB or grey, upright and within the limits is sent byte for byte; any other picture
    becomes an upright RGB JPEG (transparency on white), shrunk to ``max_side`` and
    then, while it is over ``max_bytes``, sent at lower quality or smaller.
    """
    from PIL import Image

    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        kind, mode, (width, height) = img.format, img.mode, img.size
        upright = img.getexif().get(ORIENTATION, 1) == 1
    source = f"{kind} {mode} {width}x{height}"
    if (
        mode in AS_IS.get(kind, ())
        and upright
        and max(width, height) <= max_side
        and len(data) <= max_bytes
    ):
        return Picture(data, MEDIA_TYPES[kind], width, height, source, False)

    image = load_image(io.BytesIO(data))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    qualities = sorted({quality, min(quality, 75), min(quality, 60)}, reverse=True)
    while True:
        for q in qualities:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=q, optimize=True)
            if buffer.tell() <= max_bytes:
                out = buffer.getvalue()
                return Picture(out, "image/jpeg", *image.size, source, True)
        if max(image.size) * 3 // 4 < MIN_SIDE:
            raise ValueError(
                f"cannot fit a {width}x{height} picture into {max_bytes} bytes"
            )
        smaller = (max(1, image.width * 3 // 4), max(1, image.height * 3 // 4))
        image = image.resize(smaller, Image.Resampling.LANCZOS)


# --- providers ---------------------------------------------------------------------


class OpenAIVision(OpenAIChat):
    """Chat completions with an image part: OpenAI and compatible servers."""

    def look(self, system: str, text: str, picture: Picture) -> Reply:
        url = f"data:{picture.media_type};base64,{picture.base64}"
        content = [
            {"type": "text", "text": text},
            {
                "type": "image_url",
                "image_url": {"url": url, "detail": self.options.detail},
            },
        ]
        return self.send(system, content)


class AnthropicVision(AnthropicMessages):
    """Anthropic messages with a base64 image block."""

    def look(self, system: str, text: str, picture: Picture) -> Reply:
        source = {
            "type": "base64",
            "media_type": picture.media_type,
            "data": picture.base64,
        }
        content = [
            {"type": "image", "source": source},
            {"type": "text", "text": text},
        ]
        return self.send(system, content)


PROVIDERS = {"openai": OpenAIVision, "anthropic": AnthropicVision}


# --- the extractor -----------------------------------------------------------------


class _Stopped(Exception):
    """A photo not asked because another one's request stopped the run."""


@dataclass
class Outcome:
    """What one reference got: answers, or why it got none."""

    answers: dict[str, str] = field(default_factory=dict)
    reason: str = ""


class VisionExtractor(ChatAPIClient, Extractor):
    """Learns the domain's attributes from reference photos by asking a remote VLM."""

    name = "vision"
    description = (
        "a vision model behind an API answers the attribute questions "
        "(OpenAI, Anthropic, compatible)"
    )
    Options = VisionOptions
    providers = PROVIDERS

    def __init__(self, options: VisionOptions, context: Context):
        super().__init__(options, context)
        self.who = f"extractor ({self.name})"
        self.meter = remote.Meter(options.model, options.prices)
        self._provider = None
        self._remote: remote.Remote | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.answered_by: dict[str, str] = {}
        self.fallback: Extractor | None = None
        if options.fallback:
            self.fallback = self._build_fallback()

    def _build_fallback(self) -> Extractor:
        """The fallback extractor, its options checked now rather than mid-run."""
        from chatroom.manager import Plugins

        name = self.options.fallback
        if name == self.name:
            raise ConfigError(
                f"{self.who}: option 'fallback' = {name!r}: name another extractor, "
                "such as 'blip2' or 'static'"
            )
        try:
            cls = Plugins().component("extractor", name)
        except PluginError as exc:
            raise ConfigError(
                f"{self.who}: option 'fallback' = {name!r}: {exc}"
            ) from None
        options = validate_options(
            cls, "extractor.fallback_options", self.options.fallback_options
        )
        return cls(options, self.context)

    # --- the chat -------------------------------------------------------------------

    def extract(self, references: list[Reference], domain) -> AttributeBank:
        questions = {q.name: q.question for q in domain.attributes}
        bank = AttributeBank(
            domain=domain.name, attributes=list(questions), extractor=self.name
        )
        if not references:
            log.warning("no reference images: the attribute bank stays empty")
            return bank
        self._connect()

        # Step 1: ask for the domain's key attributes and keep the new ones.
        if self.options.discover:
            bank.discovered = self._discover(references[0], domain)
            log.info("discovered attributes: %s", bank.discovered or "none")
        for name in bank.discovered:
            phrase = name.replace("_", " ")
            questions[name] = f"What is the {phrase} of the {domain.subject}?"
        bank.attributes = list(questions)

        # Step 2: every reference, all its questions in one request.
        outcomes = self._ask_all(references, questions, domain)
        missing: list[tuple[Reference, Outcome]] = []
        for ref, outcome in zip(references, outcomes, strict=True):
            if not outcome.answers:
                missing.append((ref, outcome))
                continue
            self.answered_by[ref.id] = self.name
            for attribute, value in outcome.answers.items():
                bank.entries.append(
                    BankEntry(
                        attribute=attribute,
                        value=value,
                        reference=ref.id,
                        question=questions[attribute],
                        extractor=self.name,
                    )
                )

        # Step 3: the fallback answers for what the model refused or failed on.
        if missing:
            self._fall_back(bank, missing, domain)
        return bank

    def _discover(self, reference: Reference, domain) -> list[str]:
        question = domain.key_attributes_question.replace("{word}", domain.word)
        key = self._cache_key(reference, question)
        cache = self.context.cache
        answer = cache.get(key) if cache is not None else None
        if answer is None:
            text = (
                f"{question} Answer with a short comma-separated list of attribute "
                "names, judging from photos like this one."
            )
            try:
                reply = self._send(self._system(domain), text, self._picture(reference))
            except (remote.RemoteError, OSError, ValueError) as exc:
                log.warning("%s: no key attributes: %s", self.who, exc)
                return []
            if reply.refusal or REFUSAL.match(reply.text):
                self.meter.count("refusals")
                log.warning(
                    "%s: the model refused the key-attributes question: %s",
                    self.who,
                    _short(reply.refusal or reply.text),
                )
                return []
            answer = reply.text
            if cache is not None:
                cache.put(key, answer)
        known = [q.name for q in domain.attributes] + [domain.word, domain.subject]
        return parse_attributes(answer, known, self.options.discover)

    def _ask_all(self, references, questions, domain) -> list[Outcome]:
        """One outcome per reference, asked ``concurrency`` at a time."""
        self._stop.clear()
        with ThreadPoolExecutor(
            self.options.concurrency, thread_name_prefix="chatroom-vision"
        ) as pool:
            futures = [
                pool.submit(self._ask_cached, ref, questions, domain)
                for ref in references
            ]
            outcomes: list[Outcome] = []
            fatal: BaseException | None = None
            for future in futures:
                try:
                    outcomes.append(future.result())
                except ChatroomError as exc:  # quota, key, config: the run stops
                    self._stop.set()
                    fatal = fatal or exc
                except _Stopped:
                    continue
        if fatal is not None:
            raise fatal
        return outcomes

    def _ask_cached(self, reference: Reference, questions, domain) -> Outcome:
        """The answers about one reference, from the cache if an earlier run paid."""
        cache = self.context.cache
        key = self._cache_key(reference, json.dumps(questions, sort_keys=True))
        hit = cache.get(key) if cache is not None else None
        if hit:
            return Outcome(answers=json.loads(hit))
        if self._stop.is_set():
            raise _Stopped  # another photo met a quota, a cap or a bad key
        try:
            outcome = self._ask(reference, questions, domain)
        except ChatroomError:
            self._stop.set()  # the other photos need not try
            raise
        if outcome.answers and cache is not None:
            cache.put(key, json.dumps(outcome.answers))
        return outcome

    def _ask(self, reference: Reference, questions, domain) -> Outcome:
        """Ask one reference its questions; ask again for those left unanswered."""
        try:
            picture = self._picture(reference)
        except (OSError, ValueError) as exc:
            return Outcome(reason=f"cannot prepare the picture: {exc}")
        answers: dict[str, str] = {}
        problems: dict[str, str] = {}
        pending = dict(questions)
        reply = None
        for _ in range(MAX_ASKS):
            try:
                reply = self._send(
                    self._system(domain), self._user(pending, domain), picture
                )
            except remote.RemoteError as exc:
                return Outcome(answers, reason=f"the request failed: {exc}")
            if reply.refusal:
                return self._refused(reference, reply.refusal)
            found = self._answers(reply.text)
            if found is None and REFUSAL.match(reply.text):
                return self._refused(reference, reply.text)
            for name, question in pending.items():
                value = (found or {}).get(name.lower())
                problem = "missing" if value is None else _problem(value, question)
                if problem:
                    problems[name] = problem
                else:
                    answers[name] = clean_answer(value)
            pending = {k: q for k, q in pending.items() if k not in answers}
            if not pending:
                break
            self.meter.count("asked_again")

        for name in pending:
            self.meter.count("unusable_answers")
            log.info(
                "%s: no usable answer to %r (%s)", reference.id, name, problems[name]
            )
        if not answers:
            last = _short(reply.text if reply else "", 80)
            return Outcome(
                reason=f"no usable answers in {MAX_ASKS} replies (last: {last!r})"
            )
        return Outcome(answers)

    def _refused(self, reference: Reference, text: str) -> Outcome:
        reason = _short(text)
        self.meter.count("refusals")
        log.warning(
            "%s: %s refused %s: %s", self.who, self.options.model, reference.id, reason
        )
        return Outcome(reason=f"the model refused: {reason}")

    def _send(self, system: str, text: str, picture: Picture) -> Reply:
        provider, policy = self._connect()
        reply = policy.call(lambda: provider.look(system, text, picture))
        self.meter.tokens(reply.prompt_tokens, reply.completion_tokens)
        self.meter.count("images_sent")
        if reply.truncated:
            self.meter.count("truncated")
        return reply

    @staticmethod
    def _answers(text: str) -> dict[str, str] | None:
        """Attribute -> answer from the reply's JSON object (keys lower case)."""
        try:
            data = find_json(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        out = {}
        for key, value in data.items():
            if isinstance(value, list):
                value = ", ".join(str(v) for v in value if v)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                out[str(key).strip().lower()] = str(value)
        return out

    # --- the fallback ---------------------------------------------------------------

    def _fall_back(self, bank: AttributeBank, missing, domain) -> None:
        """Let the fallback answer for these references; record each one's failure."""
        by_reference: dict[str, list[BankEntry]] = {}
        fallback = self.options.fallback
        if self.fallback is not None:
            answered = self.fallback.extract([ref for ref, _ in missing], domain)
            for entry in answered.entries:
                by_reference.setdefault(entry.reference, []).append(entry)
            for attribute in answered.attributes:
                if attribute not in bank.attributes:
                    bank.attributes.append(attribute)

        for ref, outcome in missing:
            entries = by_reference.get(ref.id, [])
            if entries:
                self.answered_by[ref.id] = fallback
                self.meter.count("fallback_answered")
                outcome.reason += f"; the fallback extractor '{fallback}' answered"
                for entry in entries:
                    row = entry.model_dump(exclude={"extractor"})
                    bank.entries.append(BankEntry(**row, extractor=fallback))
            elif self.fallback is not None:
                outcome.reason += f"; the fallback extractor '{fallback}' had no answer"
            else:
                outcome.reason += "; no fallback extractor: no attribute values"
            self.meter.count("failed_references")
            log.warning("reference %s: %s", ref.id, outcome.reason)
            self._record_failure(ref, outcome.reason)

    def _record_failure(self, reference: Reference, reason: str) -> None:
        """A row in failures.jsonl, the way the engine records a bad reference."""
        failure = Failure(
            kind="reference", subject=reference.path, reason=reason, stage="extractor"
        )
        add = getattr(self.context.cache, "add_failure", None)
        if add is not None:
            add(failure.model_dump())

    # --- the messages ---------------------------------------------------------------

    def _system(self, domain) -> str:
        return (
            f"You look at reference photos for a dataset of {domain.word} images of "
            f"a {domain.subject} and answer questions about what you see, in plain "
            "English."
        )

    def _user(self, questions: dict[str, str], domain) -> str:
        return (
            f"Answer each question about the {domain.subject} in this photo with a "
            "short phrase of at most six words, without repeating the question. If "
            'something is not in the photo, answer "none". Reply with JSON only: an '
            "object with the same keys as these questions.\n"
            f"```json\n{json.dumps(questions, ensure_ascii=False, indent=1)}\n```"
        )

    def _picture(self, reference: Reference) -> Picture:
        options = self.options
        picture = prepare_picture(
            reference.path, options.max_side, options.max_bytes, options.jpeg_quality
        )
        if picture.converted:
            log.debug(
                "%s: %s sent as %s %dx%d, %d bytes",
                reference.id,
                picture.source,
                picture.media_type,
                picture.width,
                picture.height,
                len(picture.data),
            )
        return picture

    def _cache_key(self, reference: Reference, question: str) -> str:
        options = self.options
        return (
            f"vision:{options.provider}:{options.model}:{options.max_side}:"
            f"{reference.sha256}:{hashlib.sha256(question.encode()).hexdigest()[:16]}"
        )

    # --- bookkeeping ---------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        out = self.meter.usage()
        if self.answered_by:
            answered: dict[str, int] = {}
            for name in self.answered_by.values():
                answered[name] = answered.get(name, 0) + 1
            out["references_answered_by"] = answered
        if self.fallback is not None and self.fallback.usage():
            out["fallback"] = self.fallback.usage()
        return out

    def describe(self) -> dict[str, Any]:
        options = self.options
        out: dict[str, Any] = {
            "provider": options.provider,
            "model": options.model,
            "base_url": remote.safe_url(options.base_url),
            "max_side": options.max_side,
            "max_bytes": options.max_bytes,
            "prices_per_mtok": list(self.meter.prices) if self.meter.prices else None,
            "prices_note": remote.PRICES_NOTE,
        }
        if self.fallback is not None:
            out["fallback"] = {
                "component": options.fallback,
                **self.fallback.describe(),
            }
        return out

    def close(self) -> None:
        if self._provider is not None:
            self._provider.close()
            self._provider = None
        if self.fallback is not None:
            self.fallback.close()


def _problem(value: str, question: str) -> str | None:
    """BLIP-2's guard, and a refusal inside one answer."""
    text = clean_answer(value)
    if REFUSAL.match(text):
        return "refused"
    return answer_problem(text, question)


def _short(text: str, limit: int = 120) -> str:
    return " ".join((text or "").split())[:limit]


@hookimpl
def register_extractors(register):
    register(VisionExtractor)
