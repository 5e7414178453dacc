"""Community prompts: import them from WebUI images or JSONL, count what they use.

Section 3.1 of the paper collects prompts and hyperparameters from high-quality
community outputs, uses the prompts as few-shot samples and the widely adopted
hyperparameters as generation settings. This module reads such samples:

- the ``parameters`` text chunk that the Stable Diffusion WebUI (AUTOMATIC1111,
  Forge) writes into a PNG, or the EXIF UserComment it writes into a JPEG or WebP;
- JSONL rows with ``prompt``, ``negative_prompt``, ``steps``, ``sampler``... (WebUI
  key names such as ``"CFG scale"``, camelCase names and a nested ``meta`` or
  ``settings`` table are read too), or a ``parameters`` string in the WebUI format.

Each sample becomes one few-shot row (``id``, ``prompt``, ``negative_prompt``,
``family``, ``settings``, ``source``), readable as a :class:`~chatroom.domain.FewShot`.
:func:`statistics` counts samplers, steps, sizes, terms... over such rows and
:func:`defaults_toml` writes the most common settings as a ``[generator]`` table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import statistics as stats
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .domain import FewShot
from .errors import ConfigError, InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
FAMILIES = ("sd15", "sdxl")
ROW_KEYS = ("id", "prompt", "negative_prompt", "family", "settings", "params", "source")
NEGATIVE_MARK = "Negative prompt:"
# Schedulers that older WebUI versions wrote as a suffix of the sampler's name, and
# that chatroom's generators read that way ("DPM++ 2M Karras").
SUFFIX_SCHEDULERS = ("Karras", "Exponential")
AUTOMATIC = "Automatic"
USER_COMMENT = 0x9286
EXIF_IFD = 0x8769
# Images at or above this many pixels in the first pass are taken as SDXL when the
# family is guessed: SD 1.5 community sizes stay below it (768x1152 is 0.88 MP).
SDXL_PIXELS = 900_000
SDXL_NAME = re.compile(r"XL|(?i:sdxl|(?<![a-z])xl(?![a-z])|pony|illustrious)")

# Canonical setting name for the keys WebUI, Civitai and scripts use (after
# snake-casing: "CFG scale" -> cfg_scale, "cfgScale" -> cfg_scale).
ALIASES = {
    "negative": "negative_prompt",
    "negativeprompt": "negative_prompt",
    "cfg": "cfg_scale",
    "guidance_scale": "cfg_scale",
    "sampler_name": "sampler",
    "schedule_type": "scheduler",
    "num_inference_steps": "steps",
    "sampling_steps": "steps",
    "model_name": "model",
    "checkpoint": "model",
    "clipskip": "clip_skip",
    "hires_upscale": "hires_scale",
    "enable_hr": "hires_enabled",
    "hr_scale": "hires_scale",
    "hr_upscaler": "hires_upscaler",
    "hr_second_pass_steps": "hires_steps",
    "denoising_strength": "denoise",
}


class SkipSource(Exception):
    """A source that holds no usable sample; the message says why."""


@dataclass
class Imported:
    """What an import read: the rows, and each source skipped with its reason."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --- the WebUI parameters text --------------------------------------------------------


def parse_parameters(text: str) -> dict[str, Any]:
    """Split WebUI ``parameters`` text into prompt, negative prompt and settings.

    Returns ``{"prompt", "negative_prompt", "params"}``, where ``params`` keeps the
    WebUI's own keys and string values (quoted values unquoted). The settings line
    is the last line that begins with ``Steps:`` or, failing that, a last line of at
    least three ``Key: value`` pairs; lines after it that are pairs are added.
    """
    lines = text.replace("\r\n", "\n").strip().split("\n")
    at = next(
        (i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("Steps:")),
        None,
    )
    if at is None and lines and len(split_pairs(lines[-1])) >= 3:
        at = len(lines) - 1
    params: dict[str, str] = {}
    body = lines
    if at is not None:
        body = lines[:at]
        for line in lines[at:]:
            params.update(split_pairs(line))

    positive: list[str] = []
    negative: list[str] = []
    target = positive
    for line in body:
        if target is positive and line.startswith(NEGATIVE_MARK):
            target = negative
            line = line[len(NEGATIVE_MARK) :]
        target.append(line)
    return {
        "prompt": "\n".join(positive).strip(),
        "negative_prompt": "\n".join(negative).strip(),
        "params": params,
    }


def split_pairs(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value"`` -> a dict; text that is no pair is dropped.

    A quoted value is a JSON string (the WebUI writes it with ``json.dumps``), so
    commas and escaped quotes inside it stay in the value.
    """
    pairs: dict[str, str] = {}
    pos, end = 0, len(line)
    while pos < end:
        colon = line.find(":", pos)
        if colon < 0:
            break
        key = line[pos:colon].strip()
        pos = colon + 1
        while pos < end and line[pos] == " ":
            pos += 1
        if pos < end and line[pos] == '"':
            value, pos = _quoted(line, pos)
            comma = line.find(",", pos)
            pos = end if comma < 0 else comma + 1
        else:
            comma = line.find(",", pos)
            stop = end if comma < 0 else comma
            value, pos = line[pos:stop].strip(), stop + 1
        if key and "," not in key and len(key) <= 40:
            pairs[key] = value
    return pairs


def _quoted(line: str, start: int) -> tuple[str, int]:
    """The JSON string that starts at ``start``, and the position after it."""
    try:
        value, stop = json.JSONDecoder().raw_decode(line, start)
    except ValueError:
        stop = line.find('"', start + 1)
        stop = len(line) if stop < 0 else stop + 1
        return line[start + 1 : stop - 1], stop
    return str(value), stop


# --- reading sources ------------------------------------------------------------------


def read_image_parameters(path: Path) -> str:
    """The WebUI parameters text of an image, or :class:`SkipSource` saying why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            info = dict(img.info)
            exif = img.getexif()
    except (UnidentifiedImageError, OSError) as exc:
        raise SkipSource(f"not a readable image ({exc.__class__.__name__})") from None

    text = info.get("parameters")
    if isinstance(text, str) and text.strip():
        return text
    comment = _user_comment(exif.get_ifd(EXIF_IFD).get(USER_COMMENT))
    if comment.strip():
        return comment
    # Some tools put the text in a JPEG comment instead.
    jpeg_comment = info.get("comment")
    if isinstance(jpeg_comment, bytes):
        jpeg_comment = jpeg_comment.decode("utf-8", "replace")
    if isinstance(jpeg_comment, str) and "Steps:" in jpeg_comment:
        return jpeg_comment
    if "prompt" in info or "workflow" in info:
        raise SkipSource("ComfyUI workflow, not WebUI parameters")
    raise SkipSource("no generation parameters (no 'parameters' text, no EXIF comment)")


def _user_comment(raw: Any) -> str:
    """Decode an EXIF UserComment: an 8-byte charset code, then the text."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or not raw:
        return ""
    code, payload = raw[:8], raw[8:]
    if code.startswith(b"UNICODE"):
        # piexif writes UTF-16 big-endian; some tools write little-endian.
        big = payload[:1] == b"\x00" and payload[1:2] != b"\x00"
        little = payload[1:2] == b"\x00" and payload[:1] != b"\x00"
        encoding = "utf-16-le" if little and not big else "utf-16-be"
        return payload.decode(encoding, "replace").rstrip("\x00")
    if code.startswith(b"ASCII") or code == b"\x00" * 8:
        return payload.decode("utf-8", "replace").rstrip("\x00")
    return raw.decode("utf-8", "replace").rstrip("\x00")


def _jsonl_samples(path: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """``(source, sample)`` per line; a sample is a dict, or the reason it is not."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        yield str(path), "not a UTF-8 text file"
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, f"not JSON: {exc.msg}"
            continue
        if not isinstance(data, dict):
            yield where, "not a JSON object"
            continue
        yield where, data


def _expand(sources: Iterable[str | Path]) -> Iterator[Path]:
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            suffixes = IMAGE_SUFFIXES + JSONL_SUFFIXES
            yield from sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in suffixes
            )
        elif path.exists():
            yield path
        else:
            raise InputError(f"{path}: no such file or folder")


def import_sources(sources: Iterable[str | Path], family: str = "auto") -> Imported:
    """Read images, JSONL files and folders of them into normalised few-shot rows.

    ``family`` is ``sd15``, ``sdxl`` or ``auto`` (guessed from the model's name and
    the first-pass size). A row identical to an earlier one (same prompts and
    settings) is skipped as a duplicate.
    """
    result = Imported()
    seen: dict[str, str] = {}

    def add(source: str, sample: dict[str, Any]) -> None:
        try:
            row = normalise(sample, family)
        except SkipSource as exc:
            result.skipped.append((source, str(exc)))
            return
        if row["id"] in seen:
            result.skipped.append((source, f"duplicate of {seen[row['id']]}"))
            return
        seen[row["id"]] = source
        row["source"] = source
        result.rows.append(row)

    for path in _expand(sources):
        if path.suffix.lower() in JSONL_SUFFIXES:
            for where, sample in _jsonl_samples(path):
                if isinstance(sample, str):
                    result.skipped.append((where, sample))
                else:
                    add(where, sample)
            continue
        try:
            text = read_image_parameters(path)
        except SkipSource as exc:
            result.skipped.append((str(path), str(exc)))
            continue
        add(str(path), {"parameters": text})
    log.info("read %d samples, skipped %d", len(result.rows), len(result.skipped))
    return result


# --- normalising ----------------------------------------------------------------------


def snake(key: str) -> str:
    """``"CFG scale"`` -> ``cfg_scale``; ``"cfgScale"`` -> ``cfg_scale``."""
    key = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key.strip())
    key = re.sub(r"[^0-9a-zA-Z]+", "_", key).strip("_").lower()
    return ALIASES.get(key, key)


def _number(value: Any, kind: type, name: str) -> Any:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SkipSource(f"{name} is not a number: {value!r}") from None
    if kind is int:
        return int(round(number))
    return round(number, 4)


def normalise(sample: dict[str, Any], family: str = "auto") -> dict[str, Any]:
    """One community sample -> a few-shot row; :class:`SkipSource` if it has none.

    Absent settings stay absent, except for samples in the WebUI text format,
    which leaves out ``Clip skip`` at 1 and the hires fix when it is off.
    """
    flat: dict[str, Any] = {}
    webui_text = False
    raw_params: dict[str, Any] = {}
    for nested in ("meta", "settings"):
        if isinstance(sample.get(nested), dict):
            flat.update({snake(k): v for k, v in sample[nested].items()})
    if isinstance(sample.get("parameters"), str):
        parsed = parse_parameters(sample["parameters"])
        raw_params = parsed.pop("params")
        flat.update({snake(k): v for k, v in raw_params.items()})
        flat.update({k: v for k, v in parsed.items() if v})
        webui_text = True
    flat.update(
        {
            snake(k): v
            for k, v in sample.items()
            if k not in ("meta", "settings", "parameters")
        }
    )
    if isinstance(flat.get("hires"), dict):
        for key, value in flat.pop("hires").items():
            flat[f"hires_{snake(key)}"] = value

    prompt = str(flat.get("prompt") or "").strip()
    if not prompt:
        raise SkipSource("no prompt")
    if isinstance(sample.get("params"), dict):
        raw_params = sample["params"]  # a row this module wrote, read again
    elif not webui_text:
        raw_params = {k: v for k, v in sample.items() if k not in ROW_KEYS}
    settings = _settings(flat, webui_text)
    row_family = _family(family, flat, settings)
    row = {
        "id": "",
        "prompt": prompt,
        "negative_prompt": str(flat.get("negative_prompt") or "").strip(),
        "family": row_family,
        "settings": settings,
        "params": raw_params,
    }
    body = json.dumps(
        [row["prompt"], row["negative_prompt"], row_family, settings], sort_keys=True
    )
    row["id"] = f"{row_family}-{hashlib.sha1(body.encode()).hexdigest()[:10]}"
    return row


def _settings(flat: dict[str, Any], webui_text: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sampler = str(flat.get("sampler") or "").strip()
    scheduler = str(flat.get("scheduler") or "").strip()
    if sampler:
        # Older WebUI wrote "DPM++ 2M Karras"; newer writes the scheduler apart.
        suffix = next((s for s in SUFFIX_SCHEDULERS if sampler.endswith(f" {s}")), "")
        if suffix and not scheduler:
            scheduler = suffix
        if scheduler in SUFFIX_SCHEDULERS and not suffix:
            sampler = f"{sampler} {scheduler}"
        out["sampler"] = sampler
        out["scheduler"] = scheduler or AUTOMATIC
    for name, kind in (("steps", int), ("cfg_scale", float), ("seed", int)):
        value = _number(flat.get(name), kind, name)
        if value is not None:
            out[name] = value

    width = _number(flat.get("width"), int, "width")
    height = _number(flat.get("height"), int, "height")
    size = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", str(flat.get("size") or ""))
    if size:
        width, height = int(size.group(1)), int(size.group(2))
    if width and height:
        out["width"], out["height"] = width, height

    clip_skip = _number(flat.get("clip_skip"), int, "clip_skip")
    if clip_skip is None and webui_text:
        clip_skip = 1  # the WebUI writes "Clip skip" only when it is above 1
    if clip_skip is not None:
        out["clip_skip"] = clip_skip
    for name in ("model", "model_hash", "vae"):
        if flat.get(name):
            out[name] = str(flat[name]).strip()

    hires = _hires(flat, out)
    if hires is not None:
        out["hires"] = hires
    elif webui_text:
        out["hires"] = {"enabled": False}
    if hires is None and flat.get("denoise") not in (None, ""):
        out["denoise"] = _number(flat["denoise"], float, "denoise")  # img2img
    return out


def _hires(flat: dict[str, Any], out: dict[str, Any]) -> dict[str, Any] | None:
    """The hires fix, from ``Hires upscale/upscaler/steps/resize`` and the denoise."""
    keys = [k for k in flat if k.startswith("hires_")]
    if not keys:
        return None
    if flat.get("hires_enabled") is False:
        return {"enabled": False}
    hires: dict[str, Any] = {"enabled": True}
    if flat.get("hires_upscaler"):
        hires["upscaler"] = str(flat["hires_upscaler"]).strip()
    scale = _number(flat.get("hires_scale"), float, "hires_scale")
    resize = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(flat.get("hires_resize", "")))
    if scale is None and resize and out.get("width"):
        scale = round(int(resize.group(1)) / out["width"], 4)
    if scale is not None:
        hires["scale"] = scale
    denoise = flat.get("hires_denoise", flat.get("denoise"))
    if denoise not in (None, ""):
        hires["denoise"] = _number(denoise, float, "denoise")
    steps = _number(flat.get("hires_steps"), int, "hires_steps")
    if not steps and out.get("steps"):
        steps = out["steps"]  # the WebUI's 0 (or none): as many as the first pass
    if steps:
        hires["steps"] = steps
    return hires


def _family(family: str, flat: dict[str, Any], settings: dict[str, Any]) -> str:
    if family in FAMILIES:
        return family
    if str(flat.get("family") or "") in FAMILIES:
        return str(flat["family"])
    if SDXL_NAME.search(str(settings.get("model") or "")):
        return "sdxl"
    pixels = settings.get("width", 0) * settings.get("height", 0)
    return "sdxl" if pixels >= SDXL_PIXELS else "sd15"


# --- reading rows back ----------------------------------------------------------------


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file that ``chatroom prompts import`` wrote."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows = []
    for where, sample in _jsonl_samples(path):
        if isinstance(sample, str):
            raise InputError(f"{where}: {sample}")
        if "settings" not in sample or "prompt" not in sample:
            try:
                sample = normalise(sample)
            except SkipSource as exc:
                raise InputError(f"{where}: {exc}") from None
        problem = _row_problem(sample)
        if problem:
            raise InputError(f"{where}: {problem}")
        rows.append(sample)
    return rows


NUMERIC_SETTINGS = ("steps", "cfg_scale", "width", "height", "clip_skip", "seed")


def _row_problem(row: dict[str, Any]) -> str:
    """Why an (edited) imported row cannot be used, or ''."""
    import math

    if not isinstance(row.get("prompt"), str):
        return "'prompt' must be text"
    if not isinstance(row.get("negative_prompt", ""), str):
        return "'negative_prompt' must be text"
    settings = row.get("settings")
    if not isinstance(settings, dict):
        return "'settings' must be a table of settings"
    for key in NUMERIC_SETTINGS:
        value = settings.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"settings.{key} = {value!r}: expected a number"
        if not math.isfinite(value) or value < 0:
            return f"settings.{key} = {value!r}: expected a finite, positive number"
    if not isinstance(settings.get("hires", {}) or {}, dict):
        return "'settings.hires' must be a table"
    return ""


def read_fewshot(path: str | Path, family: str, who: str = "") -> list[FewShot]:
    """The rows of one family in a community JSONL file, as few-shot examples."""
    try:
        rows = read_rows(path)
    except InputError as exc:
        raise ConfigError(f"{who}: fewshot_file {exc}" if who else str(exc)) from None
    shots = [
        FewShot(
            id=str(row.get("id") or f"{path}:{n}"),
            prompt=row["prompt"],
            negative_prompt=row.get("negative_prompt", ""),
            family=row.get("family", "sd15"),
        )
        for n, row in enumerate(rows, 1)
    ]
    chosen = [s for s in shots if s.family == family]
    if not chosen:
        held = Counter(s.family for s in shots)
        listed = ", ".join(f"{k} x{v}" for k, v in sorted(held.items())) or "no rows"
        raise ConfigError(
            f"{who + ': ' if who else ''}fewshot_file {path} has no {family} "
            f"prompts (it holds: {listed})"
        )
    return chosen


# --- statistics -----------------------------------------------------------------------


def counts(values: Iterable[Any]) -> list[dict[str, Any]]:
    """``[{"value", "count"}]``, most common first; ties keep first-seen order."""
    tally = Counter(v for v in values if v is not None)
    return [{"value": v, "count": c} for v, c in tally.most_common()]


def summary(values: Iterable[float]) -> dict[str, Any]:
    """n, min, quartiles (linear interpolation, as numpy's default), median, max."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return {"n": 0}
    if len(data) == 1:
        q1 = median = q3 = data[0]
    else:
        q1, median, q3 = stats.quantiles(data, n=4, method="inclusive")
    return {
        "n": len(data),
        "min": data[0],
        "q1": q1,
        "median": median,
        "q3": q3,
        "iqr": q3 - q1,
        "max": data[-1],
    }


def terms(prompt: str) -> tuple[list[str], list[str]]:
    """A prompt's terms, weights stripped and split at commas, and its extra networks.

    ``(red coat:1.2), ((full body)), <lora:detail:0.6>`` gives ``["red coat",
    "full body"]`` and ``["lora:detail"]``. Terms are lower case, spaces collapsed.
    """
    from chatroom.plugins.prompt_weighting import BREAK, parse_emphasis
    from chatroom.plugins.prompt_weighting import strip_extra_networks as strip

    text, networks = strip(prompt)
    plain = "".join(
        part if weight >= 0 else "," for part, weight in parse_emphasis(text)
    )
    found = []
    for piece in re.split(r"[,\n]", plain.replace(BREAK, ",")):
        term = " ".join(piece.strip(" {}|").lower().split())
        if term:
            found.append(term)
    names = [":".join(tag.strip("<>").split(":")[:2]).lower() for tag in networks]
    return found, names


def statistics(rows: list[dict[str, Any]], top: int = 20) -> dict[str, Any]:
    """What the community uses, over few-shot rows; terms count once per prompt."""
    settings = [row.get("settings") or {} for row in rows]
    hires_known = [s["hires"] for s in settings if isinstance(s.get("hires"), dict)]
    hires_on = [h for h in hires_known if h.get("enabled")]
    positive: Counter[str] = Counter()
    negative: Counter[str] = Counter()
    networks: Counter[str] = Counter()
    for row in rows:
        found, names = terms(row.get("prompt", ""))
        positive.update(dict.fromkeys(found, 1))
        networks.update(dict.fromkeys(names, 1))
        negative.update(dict.fromkeys(terms(row.get("negative_prompt", ""))[0], 1))

    def ranked(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"value": t, "count": c} for t, c in counter.most_common(top)]

    return {
        "rows": len(rows),
        "families": counts(row.get("family") for row in rows),
        "models": counts(s.get("model") for s in settings),
        "samplers": counts(s.get("sampler") for s in settings),
        "schedulers": counts(s.get("scheduler") for s in settings),
        "steps": summary(s.get("steps") for s in settings),
        "cfg_scale": summary(s.get("cfg_scale") for s in settings),
        "cfg_scale_values": counts(s.get("cfg_scale") for s in settings),
        "sizes": counts(
            f"{s['width']}x{s['height']}" if "width" in s else None for s in settings
        ),
        "clip_skip": counts(s.get("clip_skip") for s in settings),
        "hires": {
            "known": len(hires_known),
            "used": len(hires_on),
            "upscalers": counts(h.get("upscaler") for h in hires_on),
            "scales": counts(h.get("scale") for h in hires_on),
            "denoise": summary(h.get("denoise") for h in hires_on),
            "steps": counts(h.get("steps") for h in hires_on),
        },
        "positive_terms": ranked(positive),
        "negative_terms": ranked(negative),
        "extra_networks": ranked(networks),
    }


# --- generation defaults --------------------------------------------------------------


def _mode(values: Iterable[Any]) -> tuple[Any, int]:
    ranked = counts(values)
    return (ranked[0]["value"], ranked[0]["count"]) if ranked else (None, 0)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a TOML basic string


def defaults(rows: list[dict[str, Any]]) -> dict[str, tuple[Any, int, int]]:
    """Setting -> (most common value, its count, rows that give the setting)."""
    settings = [row.get("settings") or {} for row in rows]
    out: dict[str, tuple[Any, int, int]] = {}
    for name in ("sampler", "steps", "cfg_scale"):
        known = [s[name] for s in settings if name in s]
        value, count = _mode(known)
        if value is not None:
            out[name] = (
                float(value) if name == "cfg_scale" else value,
                count,
                len(known),
            )
    sizes = [(s["width"], s["height"]) for s in settings if "width" in s]
    size, count = _mode(sizes)
    if size is not None:
        out["width"] = (size[0], count, len(sizes))
        out["height"] = (size[1], count, len(sizes))
    known = [s["clip_skip"] for s in settings if "clip_skip" in s]
    value, count = _mode(known)
    if value is not None:
        out["clip_skip"] = (value, count, len(known))

    hires = [s["hires"] for s in settings if isinstance(s.get("hires"), dict)]
    if hires:
        used = [h for h in hires if h.get("enabled")]
        enabled = 2 * len(used) > len(hires)
        out["hires.enabled"] = (
            enabled,
            len(used) if enabled else len(hires) - len(used),
            len(hires),
        )
        for name in ("upscaler", "scale", "denoise", "steps") if enabled else ():
            known = [h[name] for h in used if name in h]
            value, count = _mode(known)
            if value is not None:
                value = float(value) if name in ("scale", "denoise") else value
                out[f"hires.{name}"] = (value, count, len(known))
    value, count = _mode(s.get("model") for s in settings)
    if value is not None:
        out["model"] = (value, count, sum(1 for s in settings if s.get("model")))
    known = [s["scheduler"] for s in settings if "scheduler" in s]
    value, count = _mode(known)
    if value is not None:
        out["scheduler"] = (value, count, len(known))
    return out


def defaults_toml(rows: list[dict[str, Any]], source: str = "") -> str:
    """A ``[generator]`` table of the most common settings, to paste into a config."""
    found = defaults(rows)
    if not found:
        raise InputError(f"{source or 'the rows'}: no generation settings to count")
    lines = [
        f"# The most common settings of {len(rows)} community samples"
        + (f" in {source}" if source else "")
        + ".",
        "# Written by `chatroom prompts defaults`; paste into your config.",
    ]
    model = found.pop("model", None)
    if model:
        lines.append(
            f"# Most used checkpoint: {model[0]} ({model[1]} of {model[2]}); "
            "set generator.model to your copy of it."
        )
    scheduler = found.pop("scheduler", None)
    if scheduler and scheduler[0] not in (AUTOMATIC, *SUFFIX_SCHEDULERS):
        lines.append(
            f"# Most used scheduler: {scheduler[0]} ({scheduler[1]} of "
            f"{scheduler[2]}); the webui generator takes it as generator.scheduler."
        )
    lines.append("[generator]")
    hires_lines = []
    for name, (value, count, known) in found.items():
        line = f"{name.split('.')[-1]} = {_toml_value(value)}  # {count} of {known}"
        (hires_lines if name.startswith("hires.") else lines).append(line)
    if hires_lines:
        lines += ["", "[generator.hires]", *hires_lines]
    return "\n".join(lines) + "\n"


def format_stats(report: dict[str, Any]) -> str:
    """The statistics as plain text for a terminal."""

    def listed(items: list[dict[str, Any]], limit: int = 8) -> str:
        shown = [f"{i['value']} ({i['count']})" for i in items[:limit]]
        more = len(items) - limit
        return ", ".join(shown) + (f", +{more} more" if more > 0 else "") or "-"

    def spread(summary: dict[str, Any]) -> str:
        if not summary.get("n"):
            return "-"
        return (
            f"median {summary['median']:g}, IQR {summary['q1']:g}-{summary['q3']:g} "
            f"({summary['iqr']:g}), range {summary['min']:g}-{summary['max']:g}, "
            f"n={summary['n']}"
        )

    hires = report["hires"]
    lines = [
        f"samples     {report['rows']}",
        f"families    {listed(report['families'])}",
        f"models      {listed(report['models'], 5)}",
        f"samplers    {listed(report['samplers'])}",
        f"schedulers  {listed(report['schedulers'])}",
        f"steps       {spread(report['steps'])}",
        f"cfg_scale   {spread(report['cfg_scale'])}",
        f"            {listed(report['cfg_scale_values'])}",
        f"sizes       {listed(report['sizes'])}",
        f"clip_skip   {listed(report['clip_skip'])}",
        f"hires       used by {hires['used']} of {hires['known']}",
        f"  upscaler  {listed(hires['upscalers'])}",
        f"  scale     {listed(hires['scales'])}",
        f"  denoise   {spread(hires['denoise'])}",
        f"  steps     {listed(hires['steps'])}",
        f"networks    {listed(report['extra_networks'])}",
    ]
    for name in ("positive_terms", "negative_terms"):
        lines.append(f"{name.replace('_', ' ')} (prompts that use each):")
        lines += [f"  {i['count']:>5}  {i['value']}" for i in report[name]]
    return "\n".join(lines)
