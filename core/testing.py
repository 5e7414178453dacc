"""Pytest fixtures and fake components for people who test chatroom plugins.

Installed with the ``testing`` extra and loaded by pytest automatically. The fakes are
real components with tiny behaviour: the generator draws a deterministic picture from
the seed, the extractor reads no model, and each records what it was called with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from .components import Extractor, Generator, Options
from .hookspecs import hookimpl
from .manager import Plugins
from .models import AttributeBank, BankEntry, Candidate, GenerationSettings
from .resolve import Request


class FakeGeneratorOptions(Options):
    width: int = 64
    height: int = 96
    blank_every: int = 0  # every n-th seed gives a black image (0: never)
    batch_size: int = 1


class FakeGenerator(Generator):
    """Draws a seeded pattern; ``calls`` lists the (prompt, seed) pairs it was given."""

    name = "fake"
    Options = FakeGeneratorOptions
    calls: list[tuple[str, int]] = []

    def generate(self, specs, seeds):
        import numpy as np
        from PIL import Image

        out = []
        for spec, seed in zip(specs, seeds, strict=True):
            type(self).calls.append((spec.prompt, seed))
            h, w = self.options.height, self.options.width
            if self.options.blank_every and seed % self.options.blank_every == 0:
                pixels = np.zeros((h, w, 3), dtype=np.uint8)
            else:
                digest = hashlib.sha256(f"{spec.prompt}:{seed}".encode()).digest()
                rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            settings = GenerationSettings(
                model="fake", width=w, height=h, seed=seed, steps=1
            )
            out.append(
                Candidate(
                    index=spec.index,
                    item_id=spec.item_id,
                    spec=spec,
                    settings=settings,
                    image=Image.fromarray(pixels),
                    received_prompt=spec.prompt,
                )
            )
        return out


class FakeExtractor(Extractor):
    """Gives every reference one value per domain attribute, named after it."""

    name = "fake"
    calls: list[str] = []

    def extract(self, references, domain):
        entries = []
        for reference in references:
            type(self).calls.append(reference.id)
            for question in domain.attributes:
                entries.append(
                    BankEntry(
                        attribute=question.name,
                        value=f"{question.name} of {reference.id}",
                        reference=reference.id,
                        question=question.question,
                    )
                )
        return AttributeBank(
            domain=domain.name,
            attributes=[q.name for q in domain.attributes],
            entries=entries,
        )


class FakesPlugin:
    @hookimpl
    def register_generators(self, register):
        register(FakeGenerator)

    @hookimpl
    def register_extractors(self, register):
        register(FakeExtractor)


def fake_plugins() -> Plugins:
    """The installed plugins plus the fakes."""
    plugins = Plugins()
    plugins.register(FakesPlugin(), name="chatroom-fakes")
    return plugins


FAKE_CONFIG = """
[extractor]
use = "fake"
[generator]
use = "fake"
width = 64
height = 96
[annotators.captions]
enabled = false
"""


@pytest.fixture
def chatroom_plugins() -> Plugins:
    """Installed plugins plus a fake generator and extractor."""
    FakeGenerator.calls.clear()
    FakeExtractor.calls.clear()
    return fake_plugins()


@pytest.fixture
def chatroom_run(tmp_path: Path, chatroom_plugins):
    """A function that runs chatroom with the fakes into a temporary folder.

    ``chatroom_run(references, count=4, overrides=[...], **flags)`` returns
    ``(summary, output_folder)``.
    """
    from .engine import Engine

    config = tmp_path / "fake.toml"
    config.write_text(FAKE_CONFIG)

    def run(references, count=4, overrides=(), output=None, fresh=False, **flags):
        out = Path(output or tmp_path / "out")
        request = Request(
            config_path=str(config),
            flags={
                "references": str(references),
                "count": count,
                "output": str(out),
                **flags,
            },
            overrides=list(overrides),
        )
        summary = Engine(request, plugins=chatroom_plugins, fresh=fresh).run()
        return summary, out

    return run
