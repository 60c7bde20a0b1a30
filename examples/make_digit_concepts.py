"""Regenerate the example concept folders from scikit-learn's digits.

scikit-learn ships the 8x8 handwritten digits (1,797 images, 10 classes)
inside the package, so these are real images obtained without any download.
Each chosen digit class becomes one concept folder of RGB PNGs, upscaled
(bilinear) from 8x8 to ``--size`` pixels, white strokes on black:

    examples/concepts/digit3/000.png ... 007.png
    examples/concepts/digit5/...
    examples/concepts/digit7/...

Usage:  python examples/make_digit_concepts.py [--out examples/concepts]
                                               [--digits 3 5 7] [--per-concept 8] [--size 32]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def digit_images(digit: int, count: int, size: int, offset: int = 0) -> list:
    """``count`` PIL RGB images of class ``digit`` (the first ones in dataset order after ``offset``)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    data = load_digits()
    idx = np.flatnonzero(data.target == digit)[offset: offset + count]
    if len(idx) < count:
        raise ValueError(f"only {len(idx)} images of digit {digit} available after offset {offset}")
    out = []
    for i in idx:
        img8 = (data.images[i] / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)
        img = Image.fromarray(img8, mode="L").resize((size, size), Image.BILINEAR)
        out.append(img.convert("RGB"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "concepts"))
    ap.add_argument("--digits", type=int, nargs="+", default=[3, 5, 7])
    ap.add_argument("--per-concept", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args(argv)
    if args.per_concept < 1:
        ap.error("--per-concept must be >= 1")
    out = Path(args.out)
    for d in args.digits:
        folder = out / f"digit{d}"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        for j, img in enumerate(digit_images(d, args.per_concept, args.size)):
            tmp = folder / f".{j:03d}.png.tmp"
            img.save(tmp, format="PNG", optimize=True)
            os.replace(tmp, folder / f"{j:03d}.png")
        print(f"wrote {args.per_concept} images to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
