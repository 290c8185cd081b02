"""The toy world's exact classifier as a scorer: 1.0 when the image has the attribute, else 0.0.

It has no weights: its fingerprint is the hash of the classifier's source file, so a changed classifier
is a different judge.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from PIL import Image

from .base import Scorer


class AttributeScorer(Scorer):
    binary = True

    def __init__(self, attribute: str) -> None:
        from ..toy import attribute_kind
        from ..toy import scoring

        attribute_kind(attribute)  # unknown values fail here, before any sampling
        self.attribute = attribute
        self.name = f"attribute:{attribute}"
        source = Path(scoring.__file__).read_bytes()
        self.fingerprint = hashlib.sha256(source + attribute.encode()).hexdigest()[:16]

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        from ..toy import has_attribute

        return [float(has_attribute(im, self.attribute)) for im in images]
