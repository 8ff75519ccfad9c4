"""Tests for personalize.data.images with real (and really broken) files written to tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from personalize.data.images import (
    IMAGE_EXTENSIONS, BadImagesError, DataError, ImageError, check_images, list_images, load_image)


def save_rgb(path, size=(64, 48), color=(10, 200, 30), **kwargs):
    Image.new("RGB", size, color).save(path, **kwargs)
    return path


def noisy_image(path, size=(64, 64)):
    """A random image, so the compressed data is large enough that half of it is really missing."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def bad_folder(tmp_path):
    """Two good images and one of each kind of bad file, with the reason expected for each."""
    good = [save_rgb(tmp_path / "good1.png"), save_rgb(tmp_path / "good2.jpg")]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a JPEG\n")
    bad = {
        "empty.png": "empty file (0 bytes)",
        "text.jpg": "not an image (cannot identify image file)",
        "cut.png": "truncated or corrupt",
        "cut.jpg": "truncated or corrupt",
        "small.png": "too small: 8x40, need at least 32 px on the short side",
    }
    truncate(noisy_image(tmp_path / "cut.png"))
    truncate(noisy_image(tmp_path / "cut.jpg"))
    save_rgb(tmp_path / "small.png", size=(8, 40))
    return tmp_path, good, bad


# --- list_images ---------------------------------------------------------------------------------

def test_list_images_filters_and_sorts(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.webp", ".hidden.png", "notes.txt", "e.gif"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a folder with an image suffix is not an image
    (tmp_path / "sub.png" / "inner.png").write_bytes(b"x")  # and the search is not recursive
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.gif"]
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"} == IMAGE_EXTENSIONS


def test_list_images_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        list_images(missing, "data.class_images")
    assert str(info.value) == f"data.class_images: folder {missing} does not exist"


def test_list_images_not_a_folder(tmp_path):
    file = save_rgb(tmp_path / "x.png")
    with pytest.raises(DataError, match="is not a folder"):
        list_images(file)


def test_list_images_no_images(tmp_path):
    (tmp_path / "readme.txt").write_text("no pictures here")
    (tmp_path / ".secret.png").write_bytes(b"hidden")
    with pytest.raises(DataError) as info:
        list_images(tmp_path)
    message = str(info.value)
    assert message.startswith("data.instance_images:")
    assert str(tmp_path) in message
    assert all(ext in message for ext in IMAGE_EXTENSIONS)


# --- load_image: errors --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["empty.png", "text.jpg", "cut.png", "cut.jpg"])
def test_load_image_errors(bad_folder, name):
    folder, _, bad = bad_folder
    with pytest.raises(ImageError) as info:
        load_image(folder / name)
    assert isinstance(info.value, DataError)
    assert info.value.path == folder / name
    assert info.value.reason.startswith(bad[name])
    assert name in str(info.value)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "gone.png")
    assert info.value.reason == "file does not exist"


# --- check_images --------------------------------------------------------------------------------

def test_check_images_lists_every_bad_file(bad_folder):
    folder, good, bad = bad_folder
    paths = list_images(folder)
    assert len(paths) == len(good) + len(bad)
    with pytest.raises(BadImagesError) as info:
        check_images(paths, min_size=32, skip_bad=False, what="data.instance_images")
    message = str(info.value)
    assert message.startswith(
        f"data.instance_images: {len(bad)} bad image(s) (set data.skip_bad_images=true to skip them):")
    lines = message.splitlines()[1:]
    assert len(lines) == len(bad)
    for name, reason in bad.items():
        assert any(line.startswith(f"  {folder / name}: {reason}") for line in lines), (name, message)
    assert {p.name: r.split(":")[0] for p, r in info.value.bad} == {n: r.split(":")[0] for n, r in bad.items()}
    assert not any(g.name in message for g in good)


def test_check_images_skip_bad_warns_and_returns_good(bad_folder):
    folder, good, bad = bad_folder
    with pytest.warns(UserWarning) as record:
        kept = check_images(list_images(folder), min_size=32, skip_bad=True, what="data.instance_images")
    assert kept == sorted(good)
    warned = "\n".join(str(w.message) for w in record)
    for name, reason in bad.items():
        assert name in warned and reason in warned


def test_check_images_none_usable(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    save_rgb(tmp_path / "small.png", size=(4, 4))
    with pytest.warns(UserWarning), pytest.raises(DataError, match="data.metadata: no usable images"):
        check_images(list_images(tmp_path), min_size=16, skip_bad=True, what="data.metadata")


def test_check_images_min_size_is_inclusive(tmp_path):
    path = save_rgb(tmp_path / "edge.png", size=(32, 100))
    assert check_images([path], min_size=32, skip_bad=False, what="x") == [path]


# --- load_image: mode conversions ----------------------------------------------------------------

def load_pixels(image: Image.Image, path) -> np.ndarray:
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == image.size
    return np.asarray(loaded)


def test_rgba_transparent_becomes_white(tmp_path):
    image = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue
    pixels = load_pixels(image, tmp_path / "rgba.png")
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert pixels[0, 1].tolist() == [255, 255, 255]


def test_rgba_half_transparent_is_blended(tmp_path):
    image = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    value = load_pixels(image, tmp_path / "half.png")[0, 0]
    assert np.all(np.abs(value.astype(int) - 127) <= 1)


def test_la(tmp_path):
    image = Image.new("LA", (2, 1), (50, 255))
    image.putpixel((1, 0), (0, 0))
    pixels = load_pixels(image, tmp_path / "la.png")
    assert pixels[0].tolist() == [[50, 50, 50], [255, 255, 255]]


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert np.asarray(loaded)[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_palette_gif_without_transparency(tmp_path):
    image = Image.new("P", (2, 1), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pixels = load_pixels(image, tmp_path / "p.gif")
    assert pixels[0].tolist() == [[200, 10, 10], [200, 10, 10]]


def test_grayscale(tmp_path):
    pixels = load_pixels(Image.new("L", (3, 2), 77), tmp_path / "l.png")
    assert (pixels == 77).all()


def test_one_bit(tmp_path):
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    pixels = load_pixels(image, tmp_path / "bw.bmp")
    assert pixels[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=100)  # pure red
    assert Image.open(path).mode == "CMYK"
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (16, 16)
    r, g, b = np.asarray(loaded)[8, 8].astype(int)
    assert r > 240 and g < 15 and b < 15


def test_16_bit_grayscale_png(tmp_path):
    image = Image.fromarray(np.array([[65535, 0, 32896]], dtype=np.uint16))
    assert image.mode == "I;16"
    path = tmp_path / "gray16.png"
    image.save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (1, 3, 3)
    assert pixels[0, :, 0].tolist() == [255, 0, 128]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_16_bit_big_endian_tiff(tmp_path):
    image = Image.fromarray(np.array([[65535, 0, 257]], dtype=">u2"))
    assert image.mode == "I;16B"
    pixels = load_pixels(image, tmp_path / "gray16b.tif")
    assert pixels[0, :, 0].tolist() == [255, 0, 1]


def test_32_bit_int_scaled_by_own_range(tmp_path):
    image = Image.fromarray(np.array([[5, 10, 20]], dtype=np.int32))
    assert image.mode == "I"
    pixels = load_pixels(image, tmp_path / "int32.tif")
    assert pixels[0, :, 0].tolist() == [0, 85, 255]


def test_32_bit_float_scaled_by_own_range(tmp_path):
    image = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32))
    pixels = load_pixels(image, tmp_path / "float.tif")
    assert pixels[0, :, 0].tolist() == [0, 128, 255]


# --- load_image: EXIF orientation ----------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    image = Image.new("RGB", (4, 2), (255, 255, 255))
    image.putpixel((0, 0), (0, 0, 0))  # top-left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / f"rotated{suffix}"
    image.save(path, exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    assert Image.open(path).size == (4, 2)
    loaded = load_image(path)
    assert loaded.size == (2, 4)
    # Rotating 90 clockwise moves the stored top-left corner to the displayed top-right.
    pixels = np.asarray(loaded).astype(int)
    assert pixels[0, 1].sum() < pixels[0, 0].sum()
    assert pixels[0, 1].sum() < 3 * 128


def test_returned_image_is_detached_from_file(tmp_path):
    path = save_rgb(tmp_path / "plain.png", color=(1, 2, 3))
    image = load_image(path)
    path.unlink()
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (1, 2, 3)
