"""The four splits of the scene data and why no test scene can appear in training.

Two mechanisms, each sufficient on its own for the images and together for the content:

- **Seeds per split.** Scene (split, index) draws from a random stream seeded by a hash of
  `"<version>/<split>/<index>"`, so two splits never share a stream.
- **Content buckets.** A scene's *layout* (what it shows: every object's cell, size, colour and
  shape; not the jitter or the background) hashes to a bucket in [0, 1000), and each split owns a
  range of buckets. The sampler redraws until the layout falls in its split's range, so a layout,
  and with it every question, answer and caption it yields, belongs to exactly one split.

Train owns 90% of the layouts; calibration, validation and test 3%, 3% and 4% (tens of thousands
of distinct layouts each, since there are billions in all).
"""

from __future__ import annotations

import hashlib

GENERATOR_VERSION = 1  # bump when a change alters any scene: cached images are keyed by it

SPLITS = ("train", "calibration", "validation", "test")
BUCKETS = 1000
BUCKET_RANGES = {"train": (0, 900), "calibration": (900, 930), "validation": (930, 960), "test": (960, 1000)}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown scene split {split!r}; one of {', '.join(SPLITS)}")


def stream_seed(split: str, index: int, purpose: str) -> int:
    """The seed of one random stream of scene (split, index): `purpose` separates the layout
    stream from the question stream."""
    check_split(split)
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    text = f"tlq-scenes/v{GENERATOR_VERSION}/{split}/{index}/{purpose}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def layout_bucket(layout_key: str) -> int:
    return int.from_bytes(hashlib.sha256(layout_key.encode()).digest()[:8], "big") % BUCKETS


def split_of_layout(layout_key: str) -> str:
    """The one split that owns this layout."""
    bucket = layout_bucket(layout_key)
    return next(s for s, (lo, hi) in BUCKET_RANGES.items() if lo <= bucket < hi)

# How the tools use the splits (the generator itself is unbounded): calibration records are drawn
# from the first CALIBRATION_POOL scenes of a split, evaluation uses the first EVAL_SCENES.
CALIBRATION_POOL = 1000
EVAL_SCENES = 500
