"""WebUI prompt emphasis and chunking, on a word tokenizer (no torch needed)."""

from __future__ import annotations

import pytest

from chatroom.plugins.prompt_weighting import (
    BREAK,
    Vocabulary,
    parse_emphasis,
    strip_extra_networks,
    tokenize_prompt,
    unsupported_syntax,
)

R = 1.1
S = 1 / 1.1


def approx(parts):
    return [(text, pytest.approx(weight)) for text, weight in parts]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red dress", [("a red dress", 1.0)]),
        ("", [("", 1.0)]),
        ("a (red) dress", [("a ", 1.0), ("red", R), (" dress", 1.0)]),
        ("((red))", [("red", R * R)]),
        ("(((red)))", [("red", R**3)]),
        ("[red]", [("red", S)]),
        ("[[red]]", [("red", S * S)]),
        ("(red:1.5)", [("red", 1.5)]),
        ("(red: 0.7 )", [("red", 0.7)]),
        ("(red:.5)", [("red", 0.5)]),
        ("((red:1.5) dress)", [("red", 1.65), (" dress", R)]),
        ("[(red)]", [("red", 1.0)]),
        ("(red) (dress)", [("red", R), (" ", 1.0), ("dress", R)]),
        # escapes are literal characters
        (r"\(red\)", [("(red)", 1.0)]),
        (r"a \[b\] \\", [("a [b] \\", 1.0)]),
        (r"(\(red\):1.2)", [("(red)", 1.2)]),
        # unbalanced brackets: open ones apply to the rest, stray closers are text
        ("a (red dress", [("a ", 1.0), ("red dress", R)]),
        ("a [red dress", [("a ", 1.0), ("red dress", S)]),
        ("a red) dress]", [("a red) dress]", 1.0)]),
        ("((red) dress", [("red", R * R), (" dress", R)]),
        # a colon that is not a weight is text
        ("style: photo", [("style: photo", 1.0)]),
        ("(a:b)", [("a:b", R)]),
        ("red:1.2) dress", [("red:1.2) dress", 1.0)]),
    ],
)
def test_parse_emphasis(prompt, expected):
    assert parse_emphasis(prompt) == approx(expected)


def test_break_splits_and_keeps_weights():
    assert parse_emphasis("a BREAK (b)") == approx(
        [("a", 1.0), (BREAK, -1.0), ("b", R)]
    )
    # only the upper-case word counts
    assert parse_emphasis("breakfast, Break") == [("breakfast, Break", 1.0)]


def test_unsupported_syntax_and_extra_networks():
    assert unsupported_syntax("a [cat:dog:0.5] b") == ["prompt editing [from:to:when]"]
    assert unsupported_syntax("[red|blue] dress") == ["alternation [a|b]"]
    assert unsupported_syntax(r"(red:1.2) \[a:b\]") == []
    text, tags = strip_extra_networks("a dress <lora:film:0.8>, <hypernet:x:1>")
    assert text == "a dress , "
    assert tags == ["<lora:film:0.8>", "<hypernet:x:1>"]


# --- chunking ------------------------------------------------------------------------

WORDS: dict[str, int] = {",": 5}
BOS, EOS, PAD = 1, 2, 2


def word_ids(text: str) -> list[int]:
    ids = []
    for word in text.replace(",", " , ").split():
        ids.append(WORDS.setdefault(word, 100 + len(WORDS)))
    return ids


VOCAB = Vocabulary(
    tokenize=lambda texts: [word_ids(t) for t in texts],
    bos=BOS,
    eos=EOS,
    pad=PAD,
    comma=5,
)


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_short_prompt_is_one_padded_window():
    prompt = tokenize_prompt("w0 w1 w2", VOCAB)
    (chunk,) = prompt.chunks
    assert len(chunk.ids) == len(chunk.weights) == 77
    assert chunk.ids[0] == BOS and chunk.ids[-1] == EOS
    assert chunk.ids[1:4] == word_ids("w0 w1 w2")
    assert chunk.ids[4:] == [PAD] * 73
    assert prompt.token_count == 3 and not prompt.weighted
    assert prompt.text == "w0 w1 w2"


def test_empty_prompt_is_one_window():
    prompt = tokenize_prompt("", VOCAB)
    assert len(prompt.chunks) == 1 and prompt.token_count == 0
    assert prompt.chunks[0].ids == [BOS] + [PAD] * 75 + [EOS]


def test_long_prompt_splits_every_75_tokens_without_commas():
    prompt = tokenize_prompt(words(160), VOCAB)
    assert [len(c.ids) for c in prompt.chunks] == [77, 77, 77]
    assert prompt.token_count == 160
    body = [i for c in prompt.chunks for i in c.ids[1:-1]]
    assert body[:160] == word_ids(words(160))
    assert prompt.chunks[0].ids[1:76] == word_ids(words(75))


def test_comma_backtrack_moves_the_tail_to_the_next_chunk():
    # A comma as token 70: the five words after it move to the second chunk.
    prompt = tokenize_prompt(words(69) + ", " + words(20, start=69), VOCAB)
    first, second = prompt.chunks
    assert first.ids[70] == 5  # the comma ends the first chunk's text
    assert first.ids[71:] == [PAD] * 5 + [EOS]
    assert second.ids[1:21] == word_ids(words(20, start=69))
    # A comma further back than 20 tokens does not count: a hard cut at 75.
    far = tokenize_prompt(words(40) + ", " + words(60, start=40), VOCAB)
    assert far.chunks[0].ids[1:76] == word_ids(words(40) + ", " + words(34, start=40))


def test_break_starts_a_new_chunk_and_weights_follow_tokens():
    prompt = tokenize_prompt("w0 (w1:1.5) BREAK [w2]", VOCAB)
    first, second = prompt.chunks
    assert first.ids[1:3] == word_ids("w0 w1") and first.ids[3] == PAD
    assert first.weights[1:3] == [1.0, 1.5]
    assert second.ids[1] == word_ids("w2")[0]
    assert second.weights[1] == pytest.approx(S)
    assert prompt.weighted and prompt.token_count == 3
    assert prompt.text == "w0 w1 BREAK w2"
    assert all(w == 1.0 for w in (first.weights[0], first.weights[-1]))


def test_padding_to_a_chunk_count():
    prompt = tokenize_prompt("w0", VOCAB)
    empty = tokenize_prompt("", VOCAB).chunks[0]
    padded = prompt.padded(3, empty)
    assert len(padded) == 3 and padded[1].ids == padded[2].ids == empty.ids
    assert prompt.padded(1, empty) == prompt.chunks


def test_apply_emphasis_scales_only_weighted_tokens_then_restores_the_mean():
    torch = pytest.importorskip("torch")
    from chatroom.plugins.prompt_weighting import apply_emphasis

    torch.manual_seed(0)
    embeddings = torch.randn(2, 77, 8) + 0.3
    weights = torch.ones(2, 77)
    weights[0, 5] = 1.5
    weights[1, 7:9] = 0.5
    raw = apply_emphasis(embeddings, weights, restore_mean=False)
    changed = (raw != embeddings).any(dim=-1)
    assert changed.nonzero().tolist() == [[0, 5], [1, 7], [1, 8]]
    assert torch.allclose(raw[0, 5], embeddings[0, 5] * 1.5)

    restored = apply_emphasis(embeddings, weights)
    assert torch.allclose(restored.mean(dim=(1, 2)), embeddings.mean(dim=(1, 2)))
    ratio = restored[0] / raw[0]
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio))
