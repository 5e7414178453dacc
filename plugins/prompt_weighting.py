"""WebUI (AUTOMATIC1111) prompt emphasis and 75-token chunks, without torch.

The syntax and its meaning follow the WebUI:

- ``(term)`` multiplies the weight of ``term`` by 1.1, once per level of nesting;
- ``[term]`` divides it by 1.1, once per level;
- ``(term:1.3)`` multiplies it by 1.3 instead of 1.1;
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters;
- ``BREAK`` (upper case, a word of its own) ends the current chunk;
- brackets left open at the end apply to the rest of the prompt, and a closing
  bracket that closes nothing is ordinary text.

A prompt becomes a list of chunks of 75 tokens, each framed by BOS and EOS and padded
to 77, which the text encoder reads one at a time; the embeddings are concatenated
along the sequence axis. When a chunk fills up and a comma lies within the last
``comma_backtrack`` tokens, the text after the comma moves on to the next chunk, as
the WebUI's "comma padding backtrack" (20 by default) does.

The WebUI's prompt editing (``[from:to:when]``), alternation (``[a|b]``) and extra
networks (``<lora:name:0.8>``) are not applied: :func:`unsupported_syntax` names
them so the caller can say so, and :func:`strip_extra_networks` removes the extra
network tags, as the WebUI does before encoding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
BREAK = "BREAK"

# One syntactic element a match: an escape, a bracket, an explicit weight that closes
# a round bracket, a run of plain text, or a colon that is not part of a weight.
_ELEMENT = re.compile(
    r"""
      \\[()\[\]\\]                               # escaped bracket or backslash
    | \( | \[
    | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)    # ":1.3)" closes a round bracket
    | \) | \]
    | [^\\()\[\]:]+                              # plain text
    | : | \\                                     # a lone colon or backslash
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
_EXTRA_NETWORK = re.compile(r"<(lora|lyco|hypernet|lycoris):[^>]*>", re.IGNORECASE)
_PROMPT_EDITING = re.compile(r"(?<!\\)\[[^\[\]]*:[^\[\]]*\]")
_ALTERNATION = re.compile(r"(?<!\\)\[[^\[\]]*\|[^\[\]]*\]")


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` runs; ``(BREAK, -1.0)`` marks a break.

    Neighbouring runs with the same weight are merged. An empty prompt gives
    ``[("", 1.0)]``.
    """
    parts: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part[1] >= 0:
                part[1] *= factor

    for match in _ELEMENT.finditer(prompt):
        element, weight = match.group(0), match.group(1)
        if element.startswith("\\") and len(element) == 2:
            parts.append([element[1], 1.0])
        elif element == "(":
            round_open.append(len(parts))
        elif element == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif element == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif element == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, text in enumerate(_BREAK_WORD.split(element)):
                if i:
                    parts.append([BREAK, -1.0])
                parts.append([text, 1.0])

    # Brackets never closed apply to everything after them.
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for text, weight in parts:
        if not text and weight >= 0:
            continue
        if merged and weight >= 0 and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def strip_extra_networks(prompt: str) -> tuple[str, list[str]]:
    """Remove ``<lora:...>``-style tags; return the prompt and the tags removed."""
    tags = [m.group(0) for m in _EXTRA_NETWORK.finditer(prompt)]
    return _EXTRA_NETWORK.sub("", prompt), tags


def unsupported_syntax(prompt: str) -> list[str]:
    """Names of WebUI prompt features in ``prompt`` that are encoded as plain text."""
    found = []
    if _PROMPT_EDITING.search(prompt):
        found.append("prompt editing [from:to:when]")
    if _ALTERNATION.search(prompt):
        found.append("alternation [a|b]")
    return found


@dataclass
class Chunk:
    """One window for the text encoder: token ids and weights, BOS and EOS included."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass
class TokenizedPrompt:
    """A prompt as the text encoder reads it."""

    text: str  # what the tokenizer saw: the prompt without emphasis syntax
    chunks: list[Chunk]
    token_count: int  # tokens of text, BOS, EOS and padding not counted
    weighted: bool  # some token has a weight other than 1

    def padded(self, count: int, empty: Chunk) -> list[Chunk]:
        """The chunks, followed by copies of ``empty`` up to ``count``."""
        extra = [Chunk(list(empty.ids), list(empty.weights))]
        return self.chunks + extra * max(0, count - len(self.chunks))


@dataclass(frozen=True)
class Vocabulary:
    """The special tokens chunking needs, and a tokenizer without special tokens."""

    tokenize: Callable[[Sequence[str]], list[list[int]]]
    bos: int
    eos: int
    pad: int
    comma: int | None


def tokenize_prompt(
    prompt: str,
    vocab: Vocabulary,
    chunk_length: int = CHUNK_LENGTH,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> TokenizedPrompt:
    """Parse emphasis and cut the tokens into chunks the WebUI's way."""
    parsed = parse_emphasis(prompt)
    texts = [text for text, weight in parsed if weight >= 0]
    token_lists = iter(vocab.tokenize(texts) if texts else [])

    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close_chunk() -> None:
        nonlocal current, last_comma
        missing = chunk_length - len(current.ids)
        current.ids = [vocab.bos, *current.ids, *[vocab.pad] * missing, vocab.eos]
        current.weights = [1.0, *current.weights, *[1.0] * missing, 1.0]
        # SD 1.x pads with EOS, so the window's last token is EOS either way.
        chunks.append(current)
        current = Chunk()
        last_comma = -1

    count = 0
    for _text, weight in parsed:
        if weight < 0:  # BREAK
            close_chunk()
            continue
        for token in next(token_lists):
            count += 1
            if token == vocab.comma:
                last_comma = len(current.ids)
            elif (
                comma_backtrack
                and len(current.ids) == chunk_length
                and last_comma != -1
                and chunk_length - last_comma <= comma_backtrack
            ):
                # Move what follows the last comma on to the next chunk.
                cut = last_comma + 1
                moved = Chunk(current.ids[cut:], current.weights[cut:])
                current.ids, current.weights = current.ids[:cut], current.weights[:cut]
                close_chunk()
                current = moved
            if len(current.ids) == chunk_length:
                close_chunk()
            current.ids.append(token)
            current.weights.append(weight)
    if current.ids or not chunks:
        close_chunk()

    text = "".join(text if weight >= 0 else f" {BREAK} " for text, weight in parsed)
    weighted = any(w != 1.0 for chunk in chunks for w in chunk.weights)
    return TokenizedPrompt(
        text=text, chunks=chunks, token_count=count, weighted=weighted
    )


def pad_after_end(chunk: Chunk, eos: int, pad: int) -> Chunk:
    """The chunk with every token after its first EOS replaced by ``pad``.

    The WebUI chunks with EOS as padding and then, for an encoder whose padding
    token is not EOS (OpenCLIP, SDXL's second encoder), puts that token after the
    first EOS: ``BOS text EOS pad pad ...``.
    """
    if pad == eos or eos not in chunk.ids:
        return chunk
    end = chunk.ids.index(eos) + 1
    return Chunk(chunk.ids[:end] + [pad] * (len(chunk.ids) - end), chunk.weights)


def apply_emphasis(embeddings, weights, restore_mean: bool = True):
    """Scale each token's embedding by its weight, then restore the mean (WebUI).

    ``embeddings`` is a ``(chunks, tokens, dim)`` tensor and ``weights`` a
    ``(chunks, tokens)`` sequence. The mean is restored per chunk, as the WebUI does
    for a batch of one, so an image does not depend on the other prompts in a batch.
    """
    import torch

    weights = torch.as_tensor(weights, dtype=embeddings.dtype, device=embeddings.device)
    original = embeddings.mean(dim=(1, 2), keepdim=True)
    scaled = embeddings * weights.unsqueeze(-1)
    if not restore_mean:
        return scaled
    ratio = original / scaled.mean(dim=(1, 2), keepdim=True)
    # A mean of (nearly) zero has nothing to restore; dividing by it would blow up.
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    return scaled * ratio


def describe(label: str, prompt: TokenizedPrompt) -> str | None:
    """A warning line for a prompt that needed more than one plain chunk."""
    if len(prompt.chunks) == 1 and not prompt.weighted:
        return None
    noun = "chunk" if len(prompt.chunks) == 1 else "chunks"
    line = f"{label}: {prompt.token_count} tokens in {len(prompt.chunks)} {noun}"
    return line + ("; weights applied" if prompt.weighted else "")
