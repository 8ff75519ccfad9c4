"""Robust image loading for training data.

Every training image goes through :func:`load_image`, which decodes the whole file up front (so
truncated or corrupt files fail here, with the file named, rather than deep inside a training step),
applies the EXIF orientation and returns an 8-bit ``RGB`` image whatever the file's mode.
:func:`check_images` loads a whole data set once before training and reports *every* bad file at
once, or skips them with a warning when ``data.skip_bad_images`` is set.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from personalize.errors import DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_16_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(DataError):
    """One image file that cannot be used, with the reason why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class BadImagesError(DataError):
    """Several unusable images; the message lists every one with its reason, one per line."""

    def __init__(self, bad: list[tuple[Path, str]], what: str = "data"):
        self.bad = bad
        lines = [f"{what}: {len(bad)} bad image(s) (set data.skip_bad_images=true to skip them):"]
        lines += [f"  {path}: {reason}" for path, reason in bad]
        super().__init__("\n".join(lines))


def list_images(folder: str | Path, what: str = "data.instance_images") -> list[Path]:
    """The image files directly in ``folder`` (not recursive), sorted; hidden files are ignored."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what}: {folder} is not a folder")
    try:  # a link whose target is missing is kept: check_images names it like any unreadable file
        entries = [p for p in folder.iterdir()
                   if not p.name.startswith(".") and (p.is_file() or (p.is_symlink() and not p.exists()))]
    except OSError as err:
        raise DataError(f"{what}: cannot read folder {folder}: {err}") from err
    images = sorted(p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{what}: no image files in folder {folder} ({len(entries)} other file(s); "
                        f"looked for {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def _to_8_bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit (by its full range) or 32-bit int/float image (by its own min/max) to mode ``L``."""
    array = np.asarray(image).astype(np.float64)
    if image.mode in _16_BIT_MODES:
        low, high = 0.0, 65535.0
    else:
        array = np.nan_to_num(array)
        low, high = float(array.min()), float(array.max())
    if high > low:
        array = (array - low) / (high - low) * 255.0
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to ``RGB``; transparent areas become white."""
    if image.mode in _16_BIT_MODES or image.mode in ("I", "F"):
        return _to_8_bit(image).convert("RGB")
    has_transparency = image.mode in _ALPHA_MODES or (
        "transparency" in image.info and image.mode in ("P", "L", "RGB", "1"))
    if has_transparency:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV, ...


def load_image(path: str | Path) -> Image.Image:
    """Fully decode ``path``, apply its EXIF orientation and return it as an ``RGB`` image.

    Raises :class:`ImageError` (with ``.path`` and ``.reason``) for any file that cannot be used.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with Image.open(path) as opened:
            opened.load()  # decode now: truncated or corrupt data fails here, not later
            return to_rgb(ImageOps.exif_transpose(opened))
    except ImageError:
        raise
    except FileNotFoundError as err:
        if path.is_symlink():
            raise ImageError(path, f"a symbolic link to {os.readlink(path)}, which does not exist") from err
        raise ImageError(path, "file does not exist") from err
    except UnidentifiedImageError as err:
        raise ImageError(path, "not an image (cannot identify image file)") from err
    except Image.DecompressionBombError as err:
        raise ImageError(path, f"too large: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # Errors from open/stat itself are I/O problems; errors while decoding are corrupt data.
        if isinstance(err, OSError) and err.errno is not None:
            raise ImageError(path, f"cannot read: {err}") from err
        raise ImageError(path, f"truncated or corrupt: {err}") from err


def check_images(paths: list[Path], min_size: int, skip_bad: bool, what: str) -> list[Path]:
    """Load every image once and return the usable ones.

    An image is bad when :func:`load_image` fails or its short side is below ``min_size``. Bad images
    raise :class:`BadImagesError` listing all of them, or, with ``skip_bad``, are skipped with a
    warning. Raises :class:`DataError` when no usable image is left.
    """
    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for path in paths:
        path = Path(path)
        try:
            width, height = load_image(path).size
        except ImageError as err:
            bad.append((path, err.reason))
            continue
        if min(width, height) < min_size:
            bad.append((path, f"too small: {width}x{height}, need at least {min_size} px on the short side"))
        else:
            good.append(path)
    if bad and not skip_bad:
        raise BadImagesError(bad, what)
    if bad:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        warnings.warn(f"{what}: skipping {len(bad)} bad image(s):\n{listing}", UserWarning, stacklevel=2)
    if not good:
        raise DataError(f"{what}: no usable images ({len(bad)} bad of {len(paths)})"
                        + (f":\n{listing}" if bad else ""))
    return good
