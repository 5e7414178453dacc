"""BLIP-2 through transformers: the paper's attribute extractor and caption annotator.

Both ask the model questions about images with the prompt BLIP-2 was tuned on,
``Question: {question} Answer:``, and keep only the newly generated tokens. Every answer
goes through one guard: empty answers, answers that echo the question, looping or
repetitive answers and answers that are not mostly words are bad. A bad answer is asked
again once with beam search; if it is still bad it counts as no answer.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from chatroom.components import Annotator, Context, Extractor, Options
from chatroom.errors import ConfigError, MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import (
    Annotation,
    AttributeBank,
    BankEntry,
    Candidate,
    Reference,
    Verdict,
)
from chatroom.plugins.weights import device_and_dtype
from chatroom.references import load_image

log = logging.getLogger(__name__)

PROMPT = "Question: {question} Answer:"
PAPER_MODEL = "Salesforce/blip2-opt-2.7b"
# Greedy decoding with these settings, then beam search for a bad answer.
REPETITION_PENALTY = 1.5
NO_REPEAT_NGRAM_SIZE = 3
RETRY_BEAMS = 3

_ARTICLES = ("a ", "an ", "the ")
_PHRASE = re.compile(r"^[a-z][a-z\- ]{1,38}[a-z]$")
_LOOP = re.compile(r"(.{2,}?)\1{3,}")
_WORD = re.compile(r"[a-z0-9']+")


# --- the guard -------------------------------------------------------------------


def clean_answer(text: str) -> str:
    """Trim whitespace, a leading 'Answer:' and trailing punctuation."""
    text = " ".join(text.split())
    text = re.sub(r"^(answer\s*:\s*)+", "", text, flags=re.IGNORECASE)
    return text.strip(" \t\"'`.,;:")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def answer_problem(answer: str | None, question: str) -> str | None:
    """Why an answer is unusable, or None.

    The reasons: 'empty', 'echo' (of the question or the prompt template),
    'repetitive' (loops) and 'not words'.
    """
    if answer is None or not answer.strip():
        return "empty"
    text = answer.lower()
    words = _words(text)
    if not words:
        return "not words"

    # Echo: the answer repeats the question, or the template around it.
    question_words = _words(question)
    answer_key, question_key = " ".join(words), " ".join(question_words)
    if "question:" in text or (question_key and question_key in answer_key):
        return "echo"
    if len(words) >= 3 and question_words:
        shared = sum(1 for w in words if w in set(question_words))
        if shared / len(words) >= 0.8:
            return "echo"

    # Loops: a word three times running, few distinct words, a repeating substring.
    for i in range(len(words) - 2):
        if words[i] == words[i + 1] == words[i + 2]:
            return "repetitive"
    if len(words) >= 4 and len(set(words)) / len(words) < 0.5:
        return "repetitive"
    if _LOOP.search(text.replace(" ", "")):
        return "repetitive"

    # Mostly letters, and no word longer than any English word.
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if letters / len(visible) < 0.7 or max(len(w) for w in words) > 25:
        return "not words"
    return None


def parse_attributes(answer: str, known: list[str], limit: int) -> list[str]:
    """Short noun phrases from a comma/and-separated answer, new ones only, at most
    ``limit``; returned as names (spaces as underscores)."""
    if limit <= 0 or not answer:
        return []
    seen = {_singular(k.replace("_", " ").lower()) for k in known}
    out: list[str] = []
    for part in re.split(r",|;|/|\n|\band\b|&|\bor\b", answer.lower()):
        phrase = " ".join(part.split()).strip(" .!?:'\"()-")
        for article in _ARTICLES:
            if phrase.startswith(article):
                phrase = phrase[len(article) :]
        if not _PHRASE.match(phrase) or len(phrase.split()) > 3:
            continue
        key = _singular(phrase)
        if key in seen:
            continue
        seen.add(key)
        out.append(phrase.replace(" ", "_"))
        if len(out) == limit:
            break
    return out


def _singular(phrase: str) -> str:
    return phrase[:-1] if phrase.endswith("s") and not phrase.endswith("ss") else phrase


# --- the model -------------------------------------------------------------------


class Blip2Options(Options):
    model: str = Field(
        PAPER_MODEL,
        description="A local BLIP-2 folder, or a Hub id already in the local cache.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16"] = "auto"
    max_new_tokens: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    local_files_only: bool = True


class Blip2ExtractorOptions(Blip2Options):
    discover: int = Field(
        3, ge=0, description="How many key attributes the model may add to the pack's."
    )


class Blip2CaptionOptions(Blip2Options):
    min_words: int = Field(5, ge=1, description="Shorter captions are not usable.")


@dataclass
class Answer:
    """One answer: ``text`` is None when no usable answer came back."""

    text: str | None
    raw: str
    problem: str | None = None
    retried: bool = False


# (model, device, dtype) -> [processor, model, users]: the extractor and the caption
# annotator of one run share one copy of the weights.
_LOADED: dict[tuple[str, str, str], list[Any]] = {}


def _dtype_kwarg(dtype) -> dict[str, Any]:
    """transformers 5 renamed ``torch_dtype`` to ``dtype``."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


class Blip2Asker:
    """What both BLIP-2 components share: loading, asking, guarding."""

    requires = (
        ("torch", "chatroom[transformers]"),
        ("transformers", "chatroom[transformers]"),
    )

    options: Blip2Options
    name: str
    stage: str

    def _setup(self) -> None:
        self._key: tuple[str, str, str] | None = None
        self.batch_size = self.options.batch_size

    def _torch_setup(self) -> tuple[str, str]:
        return device_and_dtype(self.options.device, self.options.dtype)

    def load(self) -> tuple[Any, Any]:
        """The processor and model, loaded once and shared between components."""
        if self._key is not None:
            processor, model, _ = _LOADED[self._key]
            return processor, model
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError as exc:
            raise MissingDependency(
                exc.name or "transformers",
                "transformers",
                f"{self.stage} '{self.name}'",
            ) from None
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        device, dtype = self._torch_setup()
        key = (self.options.model, device, dtype)
        if key not in _LOADED:
            started = time.perf_counter()
            source = self._source()
            try:
                processor = Blip2Processor.from_pretrained(
                    source, local_files_only=self.options.local_files_only
                )
                model = Blip2ForConditionalGeneration.from_pretrained(
                    source,
                    local_files_only=self.options.local_files_only,
                    **_dtype_kwarg(getattr(torch, dtype)),
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"{self.stage} ({self.name}): cannot load BLIP-2 model "
                    f"{source!r} offline: set the model option to a local folder "
                    f"(e.g. a download of {PAPER_MODEL}); {str(exc).splitlines()[0]}"
                ) from None
            # Decoder-only generation wants the padding on the left.
            processor.tokenizer.padding_side = "left"
            if getattr(processor, "num_query_tokens", None) is None:
                processor.num_query_tokens = model.config.num_query_tokens
            model.to(device)
            model.eval()
            _LOADED[key] = [processor, model, 0]
            log.info(
                "loaded BLIP-2 %s on %s (%s) in %.1f s",
                source,
                device,
                dtype,
                time.perf_counter() - started,
            )
        _LOADED[key][2] += 1
        self._key = key
        return _LOADED[key][0], _LOADED[key][1]

    def _source(self) -> str:
        """A local folder, or a Hub id that must already be in the local cache."""
        model = self.options.model
        path = Path(model).expanduser()
        if path.is_dir():
            return str(path)
        if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
            raise ConfigError(
                f"{self.stage} ({self.name}): model folder {model!r} does not exist"
            )
        return model

    def _generate_answers(
        self, images: list, question: str, num_beams: int = 1
    ) -> list[str]:
        """Ask the model one question about each image; the raw new text of each."""
        import torch

        processor, model = self.load()
        prompts = [PROMPT.format(question=question)] * len(images)
        inputs = processor(
            images=images, text=prompts, return_tensors="pt", padding=True
        )
        inputs = inputs.to(model.device, model.dtype)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=self.options.max_new_tokens,
                do_sample=False,
                num_beams=num_beams,
                repetition_penalty=REPETITION_PENALTY,
                no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def ask(self, images: list, question: str) -> list[Answer]:
        """Ask about each image, in batches; a bad answer is asked again with beams."""
        answers: list[Answer] = []
        size = self.options.batch_size
        for start in range(0, len(images), size):
            batch = images[start : start + size]
            raw = self._generate_answers(batch, question)
            answers.extend(self._judge(text, question) for text in raw)

        bad = [i for i, a in enumerate(answers) if a.text is None]
        for start in range(0, len(bad), size):
            chunk = bad[start : start + size]
            raw = self._generate_answers(
                [images[i] for i in chunk], question, num_beams=RETRY_BEAMS
            )
            for i, text in zip(chunk, raw, strict=True):
                retry = self._judge(text, question)
                retry.retried = True
                if retry.text is None:
                    retry.problem = f"{answers[i].problem}, then {retry.problem}"
                answers[i] = retry
        return answers

    @staticmethod
    def _judge(raw: str, question: str) -> Answer:
        text = clean_answer(raw or "")
        problem = answer_problem(text, question)
        return Answer(text=None if problem else text, raw=raw, problem=problem)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.options.model, "prompt": PROMPT}
        try:
            import transformers

            out["transformers"] = transformers.__version__
        except ImportError:
            pass
        return out

    def close(self) -> None:
        if self._key is None:
            return
        key, self._key = self._key, None
        entry = _LOADED.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] <= 0:
            del _LOADED[key]
            if key[1] == "cuda":
                import torch

                torch.cuda.empty_cache()


# --- the components --------------------------------------------------------------


class Blip2Extractor(Blip2Asker, Extractor):
    """Learns the domain's attributes from reference photos by asking BLIP-2."""

    name = "blip2"
    description = "BLIP-2 answers the pack's attribute questions about each reference."
    Options = Blip2ExtractorOptions

    def __init__(self, options: Blip2ExtractorOptions, context: Context):
        super().__init__(options, context)
        self._setup()
        self._images: dict[str, Any] = {}

    def extract(self, references: list[Reference], domain) -> AttributeBank:
        bank = AttributeBank(
            domain=domain.name,
            attributes=[q.name for q in domain.attributes],
            extractor=self.name,
        )
        if not references:
            log.warning("no reference images: the attribute bank stays empty")
            return bank

        # Step 1: ask for the domain's key attributes and keep the new ones.
        known = [q.name for q in domain.attributes]
        if self.options.discover:
            question = domain.key_attributes_question.replace("{word}", domain.word)
            (answer,) = self._ask_cached([references[0]], question)
            bank.discovered = parse_attributes(
                answer or "",
                known + [domain.word, domain.subject],
                self.options.discover,
            )
            log.info("discovered attributes: %s", bank.discovered or "none")
        questions = [(q.name, q.question) for q in domain.attributes]
        for name in bank.discovered:
            phrase = name.replace("_", " ")
            questions.append((name, f"What is the {phrase} of the {domain.subject}?"))
        bank.attributes = [name for name, _ in questions]

        # Step 2: every attribute question on every reference.
        for name, question in questions:
            answers = self._ask_cached(references, question)
            for ref, value in zip(references, answers, strict=True):
                if value is None:
                    continue
                bank.entries.append(
                    BankEntry(
                        attribute=name, value=value, reference=ref.id, question=question
                    )
                )
        self._images.clear()
        return bank

    def cache_key(self, reference: Reference, question: str) -> str:
        return f"blip2:{self.options.model}:{reference.sha256}:{question}"

    def _ask_cached(self, references: list[Reference], question: str):
        """Answers (None where unusable), from the cache where it has them.

        An unusable answer is cached as the empty string, so a resumed run does not
        ask again either way.
        """
        cache = self.context.cache
        answers: list[str | None] = [None] * len(references)
        missing: list[int] = []
        for i, ref in enumerate(references):
            hit = cache.get(self.cache_key(ref, question)) if cache else None
            if hit is None:
                missing.append(i)
            else:
                answers[i] = hit or None
        if not missing:
            return answers

        images = [self._image(references[i]) for i in missing]
        for i, answer in zip(missing, self.ask(images, question), strict=True):
            ref = references[i]
            if answer.text is None:
                log.info(
                    "%s: no usable answer to %r (%s): %r",
                    ref.id,
                    question,
                    answer.problem,
                    answer.raw,
                )
            answers[i] = answer.text
            if cache is not None:
                cache.put(self.cache_key(ref, question), answer.text or "")
        return answers

    def _image(self, reference: Reference):
        if reference.id not in self._images:
            self._images[reference.id] = load_image(reference.path)
        return self._images[reference.id]


class Blip2Captions(Blip2Asker, Annotator):
    """Captions: the pack's caption questions, asked in order until one is usable."""

    name = "blip2_captions"
    description = "BLIP-2 captions: the first long enough, sensible answer wins."
    Options = Blip2CaptionOptions

    def __init__(self, options: Blip2CaptionOptions, context: Context):
        super().__init__(options, context)
        self._setup()

    def annotate(
        self, candidates: list[Candidate], verdicts: list[list[Verdict]]
    ) -> list[Annotation]:
        questions = self.context.domain.caption_questions
        min_words = self.options.min_words
        chosen: dict[int, str] = {}
        usable: dict[int, list[str]] = {i: [] for i in range(len(candidates))}
        problems: dict[int, list[str]] = {i: [] for i in range(len(candidates))}
        pending = [i for i, c in enumerate(candidates) if c.image is not None]

        for number, question in enumerate(questions, 1):
            if not pending:
                break
            images = [candidates[i].image.convert("RGB") for i in pending]
            for i, answer in zip(pending, self.ask(images, question), strict=True):
                if answer.text is None:
                    problems[i].append(f"q{number} {answer.problem}")
                    continue
                usable[i].append(answer.text)
                count = len(answer.text.split())
                if count < min_words:
                    problems[i].append(f"q{number} too short ({count} < {min_words})")
                    continue
                chosen[i] = answer.text
            pending = [i for i in pending if i not in chosen]

        out = []
        for i, candidate in enumerate(candidates):
            if candidate.image is None:
                out.append(Annotation(annotator=self.name, rejected="no image"))
            elif i in chosen:
                out.append(
                    Annotation(
                        annotator=self.name, caption=chosen[i], captions=usable[i]
                    )
                )
            else:
                reason = "; ".join(problems[i]) or "no caption questions"
                out.append(
                    Annotation(
                        annotator=self.name,
                        captions=usable[i],
                        rejected=f"no usable caption: {reason}",
                    )
                )
        return out


@hookimpl
def register_extractors(register):
    register(Blip2Extractor)


@hookimpl
def register_annotators(register):
    register(Blip2Captions)
