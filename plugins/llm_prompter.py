"""A prompter that asks an LLM, few-shot on community prompts, as the paper does.

The paper (sections 3.1 and 3.3) shows GPT-3.5-turbo prompts collected from the
community and has it write new ones. This prompter sends the domain pack's few-shot
prompts of one checkpoint family as examples, the domain word, and for each plan item
the attribute values it must use, several items a call; it asks for JSON, a list of
``{"item", "prompt"}``, and reads it back however the model wraps it.

Providers: OpenAI chat completions, Anthropic messages, and any OpenAI-compatible
server (vLLM, Ollama, llama.cpp) through ``base_url``. All calls go through
``chatroom.plugins.remote``: shared concurrency limit, retries, quota and key errors,
token and cost counting.

What it does with bad replies:

- cut at the token limit (``finish_reason`` length, ``stop_reason`` max_tokens): the
  items are asked again in two halves;
- a refusal (OpenAI's ``refusal`` field or ``content_filter``, Anthropic's
  ``refusal`` stop reason, or a reply that only apologises): asked once more, then
  those items fail with the refusal as the reason;
- no JSON, or items missing from it: the missing items are asked again;
- a prompt nearly equal to one already written in this run (Jaccard similarity of
  their word sets above ``duplicate_threshold``): asked again with the near-duplicate
  shown as one to avoid; kept, and counted, if the second answer is as close.

An item still without a prompt after ``MAX_ASKS`` requests fails on its own: ``write``
returns an ``ItemFailed`` with the reason in its place, and the other items keep
their prompts.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from chatroom.components import ItemFailed, Options, Prompter
from chatroom.errors import ChatroomError, ConfigError
from chatroom.hookspecs import hookimpl
from chatroom.models import PlanItem, PromptSpec

from . import remote

log = logging.getLogger(__name__)

PUBLIC = {
    "openai": ("https://api.openai.com/v1", "gpt-3.5-turbo", "OPENAI_API_KEY"),
    "anthropic": ("https://api.anthropic.com", "claude-haiku-4-5", "ANTHROPIC_API_KEY"),
}
FAMILIES = {"sd15": "Stable Diffusion 1.5", "sdxl": "Stable Diffusion XL"}
MAX_ASKS = 3  # requests one item may take (missing, malformed, near-duplicate)
MAX_REFUSALS = 2  # a refused item is asked once more
REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i cannot|i am unable|"
    r"i'm unable|i won'?t|as an ai)",
    re.IGNORECASE,
)
FENCE = re.compile(r"```[a-zA-Z]*\s*\n(.*?)```", re.DOTALL)


class ChatAPIOptions(Options):
    """The options of every component that calls a chat API: OpenAI, Anthropic, or
    a compatible server. ``public`` gives each provider's URL, model and key variable.
    """

    public: ClassVar[dict[str, tuple[str, str, str]]] = PUBLIC

    provider: Literal["openai", "anthropic"] = Field(
        "openai", description="API style: openai also serves vLLM, Ollama, llama.cpp."
    )
    model: str = Field("", description="Default: the provider's model.")
    base_url: str = Field(
        "", description="Server URL; default: the provider's public API."
    )
    api_key_env: str = Field(
        "", description="Variable holding the key; default OPENAI_API_KEY etc."
    )
    timeout: float = Field(60.0, gt=0, description="Seconds per request.")
    max_retries: int = Field(4, ge=0, le=20, description="Retries of failed calls.")
    retry_wait: float = Field(
        0.5, gt=0, description="First wait before a retry; doubles up to 30 s."
    )
    concurrency: int = Field(4, ge=1, le=64, description="Requests in flight.")
    max_cost_usd: float | None = Field(
        None, gt=0, description="Stop (resumably) once the estimated cost reaches it."
    )
    prices: tuple[float, float] | None = Field(
        None, description="USD per million input and output tokens, if not listed."
    )

    @model_validator(mode="after")
    def _provider_defaults(self):
        url, model, env = self.public[self.provider]
        self.base_url = self.base_url or url
        self.model = self.model or model
        self.api_key_env = self.api_key_env or env
        return self


class LLMOptions(ChatAPIOptions):
    model: str = Field("", description="Default: gpt-3.5-turbo / claude-haiku-4-5.")
    prompts_per_call: int = Field(8, ge=1, le=64, description="Items per request.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Sampling temperature; default: the server's."
    )
    max_tokens: int = Field(2048, ge=16, description="Reply token limit per call.")
    family: Literal["sd15", "sdxl"] = Field(
        "sd15", description="Which of the pack's few-shot prompts to show."
    )
    max_fewshot: int = Field(10, ge=0, description="Few-shot examples per request.")
    fewshot_file: str = Field(
        "",
        description="JSONL of community prompts (chatroom prompts import); its "
        "prompts of this family replace the pack's.",
    )
    duplicate_threshold: float = Field(
        0.9, ge=0, le=1, description="Word-set Jaccard above which prompts clash."
    )
    negative_prompt: str = Field("", description="Overrides the pack's.")

    @property
    def batch_size(self) -> int:
        """Items the engine hands over at once: one call per worker."""
        return self.prompts_per_call * self.concurrency


# --- replies -----------------------------------------------------------------------


class WrittenPrompt(BaseModel):
    item: str
    prompt: str = Field(min_length=3)

    @field_validator("item", mode="before")
    @classmethod
    def _key(cls, value: Any) -> Any:
        return str(value).strip() if isinstance(value, (int, str)) else value

    @field_validator("prompt")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return " ".join(value.strip().strip("\"'").split())


@dataclass
class Reply:
    text: str
    truncated: bool = False
    refusal: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def find_json(text: str) -> Any:
    """The first JSON value in a reply: inside a code fence, or amid prose."""
    for block in FENCE.findall(text):
        try:
            return json.loads(block)
        except ValueError:
            continue
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "[{":
            try:
                return decoder.raw_decode(text, start)[0]
            except ValueError:
                continue
    raise ValueError("no JSON in the reply")


def parse_reply(text: str) -> dict[str, str]:
    """Item key -> prompt, from whatever JSON the reply holds; bad rows dropped."""
    try:
        data = find_json(text)
    except ValueError:
        return {}
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if lists else [data]
    if not isinstance(data, list):
        return {}
    out = {}
    for row in data:
        try:
            written = WrittenPrompt.model_validate(row)
        except ValidationError:
            continue
        out.setdefault(written.item, written.prompt)
    return out


# --- near-duplicates ------------------------------------------------------------------

WORD = re.compile(r"[a-z][a-z0-9']*")


def words(prompt: str) -> frozenset[str]:
    """The normalised word set of a prompt: lower case, weights and syntax dropped."""
    return frozenset(WORD.findall(prompt.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicates:
    """Finds an earlier prompt whose word set is more than ``threshold`` similar.

    Prefix filtering keeps it fast: two sets that similar share a word among the
    first few words of each in one fixed order, so only prompts indexed under those
    words are compared.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.sets: list[frozenset[str]] = []
        self.index: dict[str, list[int]] = {}
        self.lock = threading.Lock()

    def _prefix(self, tokens: frozenset[str]) -> list[str]:
        ordered = sorted(tokens, key=lambda w: (hash(w), w))
        keep = len(ordered) - math.ceil(self.threshold * len(ordered)) + 1
        return ordered[: max(1, keep)]

    def find(self, prompt: str) -> frozenset[str] | None:
        """The word set of an earlier prompt too close to this one, or None."""
        with self.lock:
            return self._find(words(prompt))

    def add(self, prompt: str, unless_close: bool = False) -> bool:
        """Remember a prompt; with ``unless_close``, only if no earlier one clashes.

        Returns whether it was added: checking and adding is one step, so two
        threads cannot both add the same prompt.
        """
        tokens = words(prompt)
        with self.lock:
            if unless_close and self._find(tokens) is not None:
                return False
            self.sets.append(tokens)
            for w in self._prefix(tokens):
                self.index.setdefault(w, []).append(len(self.sets) - 1)
            return True

    def _find(self, tokens: frozenset[str]) -> frozenset[str] | None:
        if self.threshold >= 1:
            return None
        seen = {i for w in self._prefix(tokens) for i in self.index.get(w, ())}
        for i in sorted(seen):
            if jaccard(tokens, self.sets[i]) > self.threshold:
                return self.sets[i]
        return None


# --- providers ---------------------------------------------------------------------


def sampling(temperature: float | None) -> dict[str, float]:
    return {} if temperature is None else {"temperature": temperature}


class OpenAIChat:
    """Chat completions: OpenAI and every server that speaks its API."""

    def __init__(self, options: LLMOptions, key: str, who: str):
        openai = remote.need("openai", "openai", who)
        self.options = options
        self.client = openai.OpenAI(
            api_key=key,
            base_url=options.base_url,
            timeout=options.timeout,
            max_retries=0,  # remote.Remote retries, with our classification
        )

    def complete(self, system: str, user: str) -> Reply:
        return self.send(system, user)

    def send(self, system: str, content: str | list[dict[str, Any]]) -> Reply:
        """One request: the system message and the user's text or content parts."""
        response = self.client.chat.completions.create(
            model=self.options.model,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": content},
            ],
            max_tokens=self.options.max_tokens,
            **sampling(self.options.temperature),
        )
        choice = response.choices[0]
        message = choice.message
        refusal = message.refusal
        if choice.finish_reason == "content_filter":
            refusal = refusal or "stopped by the content filter"
        usage = response.usage
        return Reply(
            text=message.content or "",
            truncated=choice.finish_reason == "length",
            refusal=refusal,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )

    def close(self) -> None:
        self.client.close()


class AnthropicMessages:
    """Anthropic's messages API."""

    def __init__(self, options: LLMOptions, key: str, who: str):
        anthropic = remote.need("anthropic", "anthropic", who)
        self.options = options
        self.client = anthropic.Anthropic(
            api_key=key,
            base_url=options.base_url,
            timeout=options.timeout,
            max_retries=0,
        )

    def complete(self, system: str, user: str) -> Reply:
        return self.send(system, user)

    def send(self, system: str, content: str | list[dict[str, Any]]) -> Reply:
        """One request: the system prompt and the user's text or content blocks."""
        response = self.client.messages.create(
            model=self.options.model,
            max_tokens=self.options.max_tokens,
            system=system,
            messages=[{"role": "user", "content": content}],
            # Recent clients take sampling settings only as extra body fields.
            extra_body=sampling(min(self.options.temperature, 1.0))
            if self.options.temperature is not None
            else None,
        )
        text = "".join(b.text for b in response.content if b.type == "text")
        refused = response.stop_reason == "refusal"
        return Reply(
            text=text,
            truncated=response.stop_reason == "max_tokens",
            refusal=(text.strip() or "refused") if refused else None,
            prompt_tokens=response.usage.input_tokens,
            completion_tokens=response.usage.output_tokens,
        )

    def close(self) -> None:
        self.client.close()


PROVIDERS = {"openai": OpenAIChat, "anthropic": AnthropicMessages}


# --- the prompter ------------------------------------------------------------------


class ChatAPIClient:
    """Set-up shared by the components that call a chat API (the LLM prompter, the
    vision extractor): the provider's client and the call policy, made on first use.

    The component sets ``providers`` (provider name -> client class), ``who``,
    ``meter``, ``_lock``, ``_provider = None`` and ``_remote = None``; its options
    are a ``ChatAPIOptions``.
    """

    providers: ClassVar[dict[str, type]] = {}

    def _connect(self) -> tuple[Any, remote.Remote]:
        with self._lock:
            if self._remote is None:
                options = self.options
                remote.check_base_url(options.base_url, self.who)
                if self.meter.prices is None and options.max_cost_usd is not None:
                    raise ConfigError(
                        f"{self.who}: max_cost_usd needs prices for model "
                        f"'{options.model}': set {self.stage}.prices = [input, output] "
                        "in USD per million tokens"
                    )
                key = self._key()
                self._provider = self.providers[options.provider](
                    options, key, self.who
                )
                self._remote = remote.Remote(
                    who=self.who,
                    service=remote.safe_url(options.base_url),
                    key=key,
                    key_env=options.api_key_env,
                    meter=self.meter,
                    max_retries=options.max_retries,
                    concurrency=options.concurrency,
                    max_cost_usd=options.max_cost_usd,
                    backoff=(options.retry_wait, 30.0),
                    extra=options.provider,
                )
                self._connected()
            return self._provider, self._remote

    def _connected(self) -> None:
        """Runs once, under the lock, when the client is first made."""

    def _key(self) -> str:
        options = self.options
        local = options.base_url != options.public[options.provider][0]
        try:
            return remote.read_key(options.api_key_env, self.who)
        except ConfigError:
            if local:  # local servers (vLLM, Ollama, llama.cpp) take any key
                log.debug(
                    "%s: no key in %s; sending none", self.who, options.api_key_env
                )
                return "none"
            raise


class LLMPrompter(ChatAPIClient, Prompter):
    name = "llm"
    description = "an LLM writes prompts few-shot (OpenAI, Anthropic, compatible)"
    Options = LLMOptions
    providers = PROVIDERS

    def __init__(self, options: LLMOptions, context):
        super().__init__(options, context)
        self.who = f"prompter ({self.name})"
        self.meter = remote.Meter(options.model, options.prices)
        self.duplicates = NearDuplicates(options.duplicate_threshold)
        self._provider = None
        self._remote: remote.Remote | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._seeded = False
        self._warned = False
        self._file_shots = None  # fewshot_file's examples, read on first use

    # --- set-up ---------------------------------------------------------------------

    def _connected(self) -> None:
        self._pool = ThreadPoolExecutor(
            self.options.concurrency, thread_name_prefix="chatroom-llm"
        )

    def _seed_duplicates(self) -> None:
        """Prompts an earlier run wrote into this folder count as written."""
        if self._seeded:
            return
        self._seeded = True
        path = Path(self.context.workdir or ".") / "prompts.jsonl"
        if self.context.workdir and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    self.duplicates.add(json.loads(line)["prompt"])
                except (ValueError, KeyError, TypeError):
                    continue

    def fewshot(self, domain):
        if self.options.fewshot_file:
            if self._file_shots is None:
                from chatroom.community import read_fewshot

                self._file_shots = read_fewshot(
                    self.options.fewshot_file, self.options.family, self.who
                )
            return self._file_shots[: self.options.max_fewshot]
        shots = [s for s in domain.fewshot if s.family == self.options.family]
        return shots[: self.options.max_fewshot]

    # --- writing -------------------------------------------------------------------

    def write(self, items: list[PlanItem], domain) -> list[PromptSpec | ItemFailed]:
        self._connect()
        self._seed_duplicates()
        if not self.fewshot(domain) and not self._warned:
            self._warned = True
            log.warning(
                "%s: domain '%s' has no %s few-shot prompts; asking without examples",
                self.who,
                domain.name,
                self.options.family,
            )
        size = self.options.prompts_per_call
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        futures = [self._pool.submit(self._write_chunk, c, domain) for c in chunks]

        specs: dict[int, PromptSpec] = {}
        failed: dict[int, str] = {}
        fatal: BaseException | None = None
        for chunk, future in zip(chunks, futures, strict=True):
            try:
                done, lost = future.result()
            except ChatroomError as exc:  # quota, key, config: the run stops
                fatal = fatal or exc
                continue
            except remote.RemoteError as exc:  # retries spent on this chunk
                failed.update(dict.fromkeys((i.index for i in chunk), str(exc)))
                continue
            specs.update(done)
            failed.update(lost)
        if fatal is not None:
            raise fatal
        return [
            specs[item.index]
            if item.index in specs
            else ItemFailed(f"no prompt: {failed.get(item.index, 'no reply')}")
            for item in items
        ]

    def _write_chunk(self, items: list[PlanItem], domain):
        """Prompts for up to ``prompts_per_call`` items, and the items that failed."""
        done: dict[int, PromptSpec] = {}
        failed: dict[int, str] = {}
        asks = dict.fromkeys((i.index for i in items), 0)
        refusals = dict.fromkeys(asks, 0)
        avoid: dict[int, str] = {}
        groups = deque([items])
        while groups:
            group = groups.popleft()
            keys = {f"i{n}": item for n, item in enumerate(group, 1)}
            reply = self._ask(keys, avoid, domain)
            share = (reply.prompt_tokens + reply.completion_tokens) // len(group)

            if reply.truncated:
                self.meter.count("truncated")
                if len(group) > 1:
                    half = len(group) // 2
                    groups.extendleft([group[half:], group[:half]])
                else:
                    failed[group[0].index] = (
                        "the reply was cut at max_tokens even for one prompt; "
                        "raise max_tokens"
                    )
                continue

            parsed = {} if reply.refusal else parse_reply(reply.text)
            if not parsed and (reply.refusal or REFUSAL.match(reply.text)):
                reason = " ".join((reply.refusal or reply.text).split())[:120]
                self.meter.count("refusals")
                log.warning(
                    "%s: the model refused %d items: %s", self.who, len(group), reason
                )
                again = []
                for item in group:
                    refusals[item.index] += 1
                    if refusals[item.index] >= MAX_REFUSALS:
                        failed[item.index] = f"the model refused: {reason}"
                    else:
                        again.append(item)
                if again:
                    groups.append(again)
                continue
            if not parsed:
                self.meter.count("malformed")

            again = []
            for key, item in keys.items():
                asks[item.index] += 1
                last_try = asks[item.index] >= MAX_ASKS
                prompt = parsed.get(key)
                if not prompt:
                    if last_try:
                        failed[item.index] = (
                            f"no usable prompt in {MAX_ASKS} replies (last: "
                            f"{' '.join(reply.text.split())[:80]!r})"
                        )
                    else:
                        again.append(item)
                    continue
                if not self.duplicates.add(prompt, unless_close=True):
                    self.meter.count("duplicates")
                    if not last_try and item.index not in avoid:
                        avoid[item.index] = prompt
                        again.append(item)
                        continue
                    self.meter.count("duplicates_kept")
                    self.duplicates.add(prompt)
                done[item.index] = self._spec(item, prompt, share, domain)
            if again:
                groups.append(again)
        return done, failed

    def _ask(self, keys: dict[str, PlanItem], avoid: dict[int, str], domain) -> Reply:
        provider, policy = self._connect()
        system = self.system_message(domain)
        user = self.user_message(keys, avoid, domain)
        reply = policy.call(lambda: provider.complete(system, user))
        self.meter.tokens(reply.prompt_tokens, reply.completion_tokens)
        return reply

    def _spec(self, item: PlanItem, prompt: str, tokens: int, domain) -> PromptSpec:
        return PromptSpec(
            index=item.index,
            item_id=item.item_id,
            prompt=prompt,
            negative_prompt=self.options.negative_prompt or domain.negative_prompt,
            entries=item.entries,
            writer=self.name,
            model=self.options.model,
            fewshot_ids=[s.id for s in self.fewshot(domain)],
            tokens=tokens,
        )

    # --- the messages --------------------------------------------------------------

    def system_message(self, domain) -> str:
        family = FAMILIES[self.options.family]
        lines = [
            f"You write text prompts for {family} checkpoints that generate "
            f"{domain.word} photos of a {domain.subject}. Write them in the style of "
            "the community prompts below: one line of comma-separated tags, quality "
            "tags first, WebUI weights such as (tag:1.2) where they help.",
            "Every prompt must use all the attribute values it is given, in their own "
            "words where possible, and may add framing, lighting and camera tags. "
            "Write only the positive prompt.",
            'Answer with JSON only: a list of {"item": <item key>, "prompt": <text>}, '
            "one object per item.",
        ]
        shots = self.fewshot(domain)
        if shots:
            lines.append("Community prompts:")
            lines += [f"- {shot.prompt}" for shot in shots]
        return "\n".join(lines)

    def user_message(self, keys, avoid, domain) -> str:
        rows = []
        for key, item in keys.items():
            row: dict[str, Any] = {"item": key}
            if item.entries:
                row["attributes"] = {e.attribute: e.value for e in item.entries}
            if item.index in avoid:
                row["too_close_to"] = avoid[item.index]
            rows.append(row)
        free = ""
        if not any("attributes" in row for row in rows):  # extraction is off
            free = (
                f" No attributes are given: choose the {domain.subject}'s look "
                "yourself, and vary it from item to item."
            )
        text = (
            f"Write one {domain.word} prompt for each item.{free} An item with "
            '"too_close_to" needs a clearly different prompt from that one.\n'
            f"```json\n{json.dumps(rows, ensure_ascii=False, indent=1)}\n```"
        )
        return text

    # --- bookkeeping ---------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        return self.meter.usage()

    def describe(self) -> dict[str, Any]:
        options = self.options
        return {
            "provider": options.provider,
            "model": options.model,
            "base_url": remote.safe_url(options.base_url),
            "family": options.family,
            "fewshot_ids": [s.id for s in self.fewshot(self.context.domain)],
            "prices_per_mtok": list(self.meter.prices) if self.meter.prices else None,
            "prices_note": remote.PRICES_NOTE,
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._provider is not None:
            self._provider.close()


@hookimpl
def register_prompters(register):
    register(LLMPrompter)
