"""Built-in image sources that need no network.

The natural photographs that ship inside the scikit-learn and scikit-image wheels stand in
for the ten whitened images (IMAGES.mat) of the original exercise.
"""

from __future__ import annotations

import numpy as np

NATURAL_IMAGE_NAMES = (
    "sklearn:china",
    "sklearn:flower",
    "skimage:astronaut",
    "skimage:camera",
    "skimage:chelsea",
    "skimage:coffee",
    "skimage:rocket",
    "skimage:grass",
    "skimage:gravel",
    "skimage:brick",
)
"""Photographs (no synthetic images, no microscopy) available offline."""


def _to_gray(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an RGB(A) uint8 image, or the image itself, as float64 in [0, 1]."""
    img = np.asarray(image, dtype=np.float64) / 255.0
    if img.ndim == 3:
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114])
    return img


def load_natural_image(name: str) -> np.ndarray:
    """One built-in photograph as a grayscale float64 array in [0, 1], shape (H, W)."""
    library, _, key = name.partition(":")
    if library == "sklearn":
        from sklearn.datasets import load_sample_image

        return _to_gray(load_sample_image(f"{key}.jpg"))
    if library == "skimage":
        import skimage.data

        return _to_gray(getattr(skimage.data, key)())
    raise ValueError(f"unknown built-in image {name!r}; known: {', '.join(NATURAL_IMAGE_NAMES)}")


def load_natural_images(names: tuple[str, ...] = NATURAL_IMAGE_NAMES) -> list[np.ndarray]:
    """The built-in photographs, grayscale float64 in [0, 1]; shapes differ per image."""
    return [load_natural_image(name) for name in names]
