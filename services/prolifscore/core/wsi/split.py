"""80/20 slide-level train/validation split, stratified by tumor score, fixed seed.

Two entry points give the same kind of answer: `stratified_splits` when the whole set is
known (the ingest CLI sees every slide, so each score class gets exactly its share), and
`hash_split` for a lone message (the tiling service sees one slide at a time: a seeded hash
within the slide's score stratum, stable across runs and machines).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable

TRAIN = "train"
VALIDATION = "validation"


def _unit(slide_id: str, seed: int, salt: str = "") -> float:
    digest = hashlib.sha256(f"{seed}:{salt}:{slide_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(slide_id: str, tumor_score: int | None, seed: int, validation: float) -> str:
    return VALIDATION if _unit(slide_id, seed, str(tumor_score)) < validation else TRAIN


def stratified_splits(
    slides: Iterable[tuple[str, int | None]], seed: int, validation: float
) -> dict[str, str]:
    """Exactly round(validation * n) slides of each score stratum go to validation."""
    strata: dict[int | None, list[str]] = defaultdict(list)
    for slide_id, score in slides:
        strata[score].append(slide_id)
    out: dict[str, str] = {}
    for score, ids in strata.items():
        ordered = sorted(ids, key=lambda s: _unit(s, seed, str(score)))
        n_val = math.floor(validation * len(ordered) + 0.5)
        for i, slide_id in enumerate(ordered):
            out[slide_id] = VALIDATION if i < n_val else TRAIN
    return out
