"""Seconds per image of each filter and annotator on the CPU, and curate throughput.

    python benchmarks/bench_filters.py                   # everything
    python benchmarks/bench_filters.py --only nudenet quality_brisque --no-curate
    python benchmarks/bench_filters.py --smoke DIR       # reuse `chatroom smoke-models`

Each component is built once, warmed up on one photo (model loading is reported
apart, as ``load_s``), then timed on every shared fashion photo one at a time, as
the engine does with a batch size of 1. Components whose plugin module or library is
missing are listed as skipped. CLIP, NIMA, OpenPose and Graphonomy run the smoke
models' random weights: their architectures, so their cost, are real only for
OpenPose and Graphonomy (full size); the tiny CLIP and NIMA time the code around a
model, not a real one. The full-size ones are timed on the first ``--heavy-images``
photos only.

The curate part runs ``chatroom curate <photos> --profile offline`` in-process and
the same filters and annotators over the same photos in a plain loop (load, check,
annotate, save), and prints both. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
REFS = (
    Path(os.environ.get("CHATROOM_SHARED", ROOT.parent / "shared"))
    / "data/reference/fashion"
)


def components(smoke: Path) -> list[tuple[str, str, str, dict]]:
    """(label, stage, component name, options) for everything worth timing."""
    return [
        ("image_checks", "filter", "image_checks", {}),
        ("nudenet", "filter", "nudenet", {}),
        ("pose (BlazePose)", "filter", "pose", {}),
        ("pose_keypoints (BlazePose)", "annotator", "pose_keypoints", {}),
        ("person_mask", "annotator", "person_mask", {}),
        ("mask_check (person_mask)", "annotator", "mask_check", {}),
        ("quality_brisque", "filter", "quality", {"metric": "brisque"}),
        (
            "quality_nima (tiny)",
            "filter",
            "quality",
            {"metric": "nima", "weights": str(smoke / "nima/nima-smoke.safetensors")},
        ),
        (
            "clip_nsfw (tiny CLIP)",
            "filter",
            "clip_nsfw",
            {
                "model": str(smoke / "clip"),
                "head": str(smoke / "clip_nsfw/head.safetensors"),
            },
        ),
        ("near_duplicates (phash)", "filter", "near_duplicates", {}),
        (
            "openpose (full size)",
            "filter",
            "openpose",
            {"checkpoint": str(smoke / "openpose"), "device": "cpu"},
        ),
        (
            "graphonomy (full size)",
            "annotator",
            "graphonomy",
            {"checkpoint": str(smoke / "graphonomy"), "device": "cpu"},
        ),
    ]


def photos(limit: int | None):
    from PIL import Image

    out = []
    for path in sorted(REFS.glob("*"))[:limit]:
        with Image.open(path) as img:
            out.append(img.convert("RGB"))
    return out


def candidate(image, number: int):
    from chatroom.models import Candidate, GenerationSettings, PromptSpec

    spec = PromptSpec(index=number, item_id=f"p{number}", prompt="", negative_prompt="")
    return Candidate(
        index=number,
        item_id=f"p{number}",
        spec=spec,
        settings=GenerationSettings(),
        image=image,
    )


def time_component(plugins, domain, stage, name, options, images) -> dict:
    from chatroom.components import Context, validate_options

    try:
        cls = plugins.component(stage, name)
    except Exception as exc:  # another helper's plugin not there yet
        return {"skipped": str(exc)}
    missing = [lib for lib, _ in cls.requires if not _importable(lib)]
    if missing:
        return {"skipped": f"missing {', '.join(missing)}"}
    for key in ("checkpoint", "weights", "model"):
        value = options.get(key)
        if value and not Path(value).exists():
            return {"skipped": f"no {key} at {value}"}

    started = time.perf_counter()
    component = cls(validate_options(cls, name, options), Context(domain))
    run = (
        (lambda c: component.check([c]))
        if stage == "filter"
        else (lambda c: component.annotate([c], [[]]))
    )
    run(candidate(images[0], 10_000))  # warm-up: loads the model
    load = time.perf_counter() - started

    seconds = []
    for number, image in enumerate(images):
        tick = time.perf_counter()
        run(candidate(image, number))
        seconds.append(time.perf_counter() - tick)
    component.close()
    seconds.sort()
    return {
        "load_s": round(load, 3),
        "mean_s": round(sum(seconds) / len(seconds), 4),
        "median_s": round(seconds[len(seconds) // 2], 4),
        "images": len(seconds),
    }


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def bench_curate(out: Path) -> dict:
    """``chatroom curate --profile offline`` against the same models in a loop."""
    from PIL import Image

    from chatroom.components import Context
    from chatroom.curate import curate, curate_engine

    started = time.perf_counter()
    summary = curate(REFS, out / "curated", profile="offline")
    engine_seconds = time.perf_counter() - started

    # the plain loop: the components the same profile resolves to, built once
    started = time.perf_counter()
    engine = curate_engine(REFS, out / "unused", profile="offline")
    resolved = engine.resolved
    context = Context(resolved.domain)
    filters = [
        (s, s.cls(s.options, context)) for s in resolved.components.get("filter", [])
    ]
    annotators = [
        (s, s.cls(s.options, context)) for s in resolved.components.get("annotator", [])
    ]
    folder = out / "loop"
    folder.mkdir(parents=True)
    kept = 0
    for number, path in enumerate(sorted(REFS.glob("*"))):
        with Image.open(path) as img:
            image = img.convert("RGB")
        work = candidate(image, number)
        rejected = False
        for spec, component in filters:
            verdict = component.check([work])[0]
            if not verdict.passed and not spec.observe:
                rejected = True
                break
        if rejected:
            continue
        notes = []
        for spec, component in annotators:
            note = component.annotate([work], [[]])[0]
            notes.append(note)
            if note.rejected and not spec.observe:
                rejected = True
                break
        if rejected:
            continue
        image.save(folder / f"{number}.jpg", quality=95)
        for note in notes:
            for part, mask in note.masks.items():
                mask.save(folder / f"{number}-{part}.png")
        kept += 1
    for _, component in filters + annotators:
        component.close()
    loop_seconds = time.perf_counter() - started
    images = len(list(REFS.glob("*")))
    return {
        "images": images,
        "components": [s.key for s, _ in filters + annotators],
        "curate_s": round(engine_seconds, 2),
        "curate_written": summary.written,
        "loop_s": round(loop_seconds, 2),
        "loop_kept": kept,
        "curate_images_per_s": round(images / engine_seconds, 3),
        "loop_images_per_s": round(images / loop_seconds, 3),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", type=Path, help="a `chatroom smoke-models` folder")
    parser.add_argument("--only", nargs="*", help="labels (or their first word)")
    parser.add_argument("--images", type=int, default=None, help="photos to use")
    parser.add_argument(
        "--heavy-images",
        type=int,
        default=3,
        help="photos for the full-size OpenPose and Graphonomy (tens of s each)",
    )
    parser.add_argument("--no-curate", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from chatroom.manager import Plugins
    from chatroom.resolve import Request, resolve

    with tempfile.TemporaryDirectory(prefix="chatroom-bench-") as tmp:
        smoke = args.smoke
        if smoke is None:
            from chatroom.smoke import write_smoke_models

            smoke = write_smoke_models(Path(tmp) / "smoke")
        plugins = Plugins()
        domain = resolve(
            Request(None, {"domain": "fashion", "references": str(REFS)}), plugins
        ).domain
        images = photos(args.images)
        results: dict = {"threads": torch.get_num_threads(), "per_image": {}}
        for label, stage, name, options in components(smoke):
            if args.only and not any(
                label == o or label.split()[0] == o for o in args.only
            ):
                continue
            subset = images[: args.heavy_images] if "full size" in label else images
            result = time_component(plugins, domain, stage, name, options, subset)
            results["per_image"][label] = result
            print(label, result, file=sys.stderr, flush=True)
        if not args.no_curate:
            results["curate"] = bench_curate(Path(tmp))
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
