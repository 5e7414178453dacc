"""The nouns of a run, as pydantic models. Every record carries its whole lineage."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Reference(BaseModel):
    """One reference image: where it is, what it hashes to, where it came from."""

    id: str
    path: str
    sha256: str
    width: int
    height: int
    source: str | None = None
    license: str | None = None


class BankEntry(BaseModel):
    """One attribute value the extractor read off one reference image."""

    attribute: str
    value: str
    reference: str
    question: str | None = None
    # The extractor that answered, when a run mixes them (a fallback answered some).
    extractor: str = ""


class AttributeBank(BaseModel):
    """What the extractor learned: the key attributes and, per reference, values."""

    domain: str
    attributes: list[str]
    entries: list[BankEntry] = Field(default_factory=list)
    discovered: list[str] = Field(default_factory=list)
    extractor: str = ""

    def values(self, attribute: str) -> list[BankEntry]:
        return [e for e in self.entries if e.attribute == attribute]


class PlanItem(BaseModel):
    """One attribute combination the prompter is asked to write a prompt for."""

    index: int
    item_id: str
    seed: int
    entries: list[BankEntry]

    @property
    def references(self) -> list[str]:
        return sorted({e.reference for e in self.entries})


class PromptSpec(BaseModel):
    """A positive and negative prompt with what it was built from."""

    index: int
    item_id: str
    prompt: str
    negative_prompt: str
    entries: list[BankEntry] = Field(default_factory=list)
    writer: str = ""
    model: str | None = None
    fewshot_ids: list[str] = Field(default_factory=list)
    tokens: int = 0
    edited: bool = False


class HiresSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    upscaler: str = "latent"
    scale: float = Field(2.0, ge=1.0, le=8.0)
    denoise: float = Field(0.4, ge=0.0, le=1.0)
    steps: int = Field(15, ge=0)  # 0: as many as the first pass, as in the WebUI


class GenerationSettings(BaseModel):
    """What a generator used for one image, its real seed included."""

    model: str = ""
    sampler: str = "DPM++ 2M SDE Karras"
    steps: int = 30
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 768
    clip_skip: int = 1
    hires: HiresSettings = Field(default_factory=HiresSettings)
    seed: int = 0


class Candidate(BaseModel):
    """A generated image, not yet judged."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: int
    item_id: str
    spec: PromptSpec
    settings: GenerationSettings
    image: Any = Field(default=None, exclude=True)
    timings: dict[str, float] = Field(default_factory=dict)
    received_prompt: str | None = None
    warnings: list[str] = Field(default_factory=list)
    rejected: str | None = None  # set by a generator that knows its image is bad


class Verdict(BaseModel):
    """One filter's decision on one candidate (``filter`` is its key in the config)."""

    filter: str = ""
    passed: bool
    reason: str = ""
    scores: dict[str, float] = Field(default_factory=dict)
    observed: bool = False
    artefacts: dict[str, Any] = Field(default_factory=dict)


class Annotation(BaseModel):
    """What one annotator added: masks, keypoints, captions, QA; or a rejection."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    annotator: str = ""
    captions: list[str] = Field(default_factory=list)
    caption: str | None = None
    keypoints: list[list[float]] | None = None
    masks: dict[str, Any] = Field(default_factory=dict, exclude=True)
    qa: dict[str, Any] = Field(default_factory=dict)
    rejected: str | None = None
    observed: bool = False


class Record(BaseModel):
    """The final row of the dataset, with its lineage."""

    item_id: str
    index: int
    file_name: str
    caption: str | None = None
    captions: list[str] = Field(default_factory=list)
    masks: dict[str, str] = Field(default_factory=dict)
    pose: str | None = None
    keypoints: list[list[float]] | None = None
    prompt: str
    negative_prompt: str
    received_prompt: str | None = None
    seed: int
    settings: GenerationSettings
    attributes: dict[str, str] = Field(default_factory=dict)
    bank_entries: list[BankEntry] = Field(default_factory=list)
    references: list[str] = Field(default_factory=list)
    reference_sources: list[dict[str, str | None]] = Field(default_factory=list)
    verdicts: list[Verdict] = Field(default_factory=list)
    annotations: list[str] = Field(default_factory=list)
    qa: dict[str, Any] = Field(default_factory=dict)
    prompt_writer: str = ""
    timings: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)


class Rejection(BaseModel):
    """A candidate a filter or annotator turned down, with the reason."""

    item_id: str
    index: int
    stage: str
    component: str
    reason: str
    scores: dict[str, float] = Field(default_factory=dict)
    prompt: str = ""
    seed: int = 0
    warnings: list[str] = Field(default_factory=list)


class Failure(BaseModel):
    """An input or an item that could not be processed, and why."""

    kind: str
    subject: str
    reason: str
    stage: str = ""
    index: int | None = None
