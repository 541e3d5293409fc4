"""Image decoding rules of pointseg.data.images, on a corpus built in tmp_path."""

from __future__ import annotations

import io
import pickle

import fsspec
import numpy as np
import pytest
from PIL import Image, ImageFile

from pointseg.data.images import (
    ImageDecodeError,
    decode_image_bytes,
    encode_jpeg,
    encode_png,
    join_uri,
    read_image,
)


def _save(im: Image.Image, path, **kw) -> str:
    im.save(path, **kw)
    return str(path)


def test_rgb_png_roundtrip_exact(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    path.write_bytes(encode_png(rgb))
    out = read_image(str(path))
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, rgb)
    np.testing.assert_array_equal(read_image("file://" + str(path)), rgb)


def test_grayscale_png_replicated(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = read_image(_save(Image.fromarray(g, "L"), tmp_path / "g.png"))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_rgba_png_composited_on_black(tmp_path):
    rgba = np.array(
        [[[200, 100, 50, 255], [200, 100, 50, 128]], [[10, 250, 90, 0], [255, 255, 255, 1]]], dtype=np.uint8
    )
    out = read_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    a = rgba[..., 3:].astype(float)
    expected = np.floor(rgba[..., :3] * a / 255 + 0.5).astype(np.uint8)  # round half up
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])  # opaque unchanged
    np.testing.assert_array_equal(out[1, 0], [0, 0, 0])  # transparent -> black


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    v = np.array([[0, 1000, 32768], [40000, 65000, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(v), tmp_path / "g16.png")
    with Image.open(path) as im:  # the file really is 16-bit
        assert im.mode in ("I;16", "I")
    out = read_image(path)
    expected = np.floor(v.astype(float) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)
    assert out[0, 1, 0] == 4  # clipping would have given 255


def test_palette_png_expanded(tmp_path):
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [7, 8, 9]], dtype=np.uint8)
    idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.ravel().tolist())
    out = read_image(_save(im, tmp_path / "p.png"))
    np.testing.assert_array_equal(out, palette[idx])


def test_palette_png_with_transparency(tmp_path):
    palette = np.array([[255, 0, 0], [0, 255, 0]], dtype=np.uint8)
    idx = np.array([[0, 1]], dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.ravel().tolist())
    out = read_image(_save(im, tmp_path / "pt.png", transparency=1))
    np.testing.assert_array_equal(out, [[[255, 0, 0], [0, 0, 0]]])


def _exif_jpeg(raw: np.ndarray, orientation: int) -> bytes:
    im = Image.fromarray(raw)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    return buf.getvalue()


def test_jpeg_exif_orientation_6_is_rotated(tmp_path):
    # raw 16 rows x 32 cols, four flat quadrant colours (JPEG-friendly)
    raw = np.zeros((16, 32, 3), np.uint8)
    raw[:8, :16] = (250, 0, 0)
    raw[:8, 16:] = (0, 250, 0)
    raw[8:, :16] = (0, 0, 250)
    raw[8:, 16:] = (250, 250, 250)
    path = tmp_path / "exif6.jpg"
    path.write_bytes(_exif_jpeg(raw, 6))
    out = read_image(str(path))
    # Orientation 6: the viewer rotates the stored grid 90 degrees clockwise.
    expected = np.rot90(raw, k=-1)
    assert out.shape == (32, 16, 3)
    err = np.abs(out.astype(int) - expected.astype(int)).mean()
    wrong_way = np.abs(out.astype(int) - np.rot90(raw, k=1).astype(int)).mean()
    assert err < 4 and wrong_way > 50
    # top-left of the displayed image is the stored bottom-left (blue)
    assert out[2, 2, 2] > 200 and out[2, 2, 0] < 50
    raw_out = read_image(str(path), exif_transpose=False)
    assert raw_out.shape == (16, 32, 3)


def test_truncated_jpeg_raises(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode_jpeg(noise)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageDecodeError) as e:
        read_image(str(path))
    assert str(path) in str(e.value) and "truncated" in str(e.value)
    assert e.value.uri == str(path)
    # the intact file decodes
    full = tmp_path / "full.jpg"
    full.write_bytes(data)
    assert read_image(str(full)).shape == (64, 64, 3)


def test_non_image_and_missing_and_empty(tmp_path):
    txt = tmp_path / "notes.jpg"
    txt.write_text("this is not an image")
    with pytest.raises(ImageDecodeError, match="not a recognised image format") as e:
        read_image(str(txt))
    assert "notes.jpg" in str(e.value)
    assert isinstance(e.value, ValueError)

    missing = tmp_path / "nope.png"
    with pytest.raises(ImageDecodeError, match="file not found") as e:
        read_image(str(missing))
    assert "nope.png" in str(e.value)

    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image_bytes(b"", "cell 3")
    with pytest.raises(ImageDecodeError, match="directory"):
        read_image(str(tmp_path))
    with pytest.raises(ImageDecodeError, match="no file name"):
        read_image("")


def test_memory_uri_and_bytes():
    rgb = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    with fsspec.open("memory://imgs/x.png", "wb") as f:
        f.write(encode_png(rgb))
    np.testing.assert_array_equal(read_image(join_uri("memory://imgs", "x.png")), rgb)
    np.testing.assert_array_equal(decode_image_bytes(encode_png(rgb), "row 0"), rgb)
    with pytest.raises(ImageDecodeError, match="memory://imgs/y.png"):
        read_image("memory://imgs/y.png")


def test_error_pickles_and_join_uri():
    e = pickle.loads(pickle.dumps(ImageDecodeError("s3://b/k.jpg", "file not found")))
    assert (e.uri, e.reason) == ("s3://b/k.jpg", "file not found")
    assert join_uri("memory://", "a.jpg") == "memory://a.jpg"
    assert join_uri("s3://bucket/dir/", "a.jpg") == "s3://bucket/dir/a.jpg"
    assert join_uri("/data/imgs", "a.jpg") == "/data/imgs/a.jpg"
    assert join_uri("", "a.jpg") == "a.jpg"
    assert join_uri("/data", "/abs/a.jpg") == "/abs/a.jpg"


def test_every_cut_of_a_jpeg_or_png_is_reported_as_truncated(tmp_path):
    """Wherever the file is cut, a damaged JPEG/PNG says so (PIL's own message varies with the cut)."""
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12] = (200, 40, 40)
    png = encode_png(rgb)
    idat = png.index(b"IDAT")
    # the deflate data ends 4 bytes (zlib's Adler-32) before the IDAT payload does
    pixels_end = idat + 4 + int.from_bytes(png[idat - 4 : idat], "big") - 4
    for n in range(pixels_end, len(png)):  # cuts that lose only checksums and IEND keep every pixel
        np.testing.assert_array_equal(decode_image_bytes(png[:n], "cut"), rgb)
    for data, end in ((encode_jpeg(rgb), None), (png, pixels_end)):
        for n in range(8, end or len(data) - 1):
            with pytest.raises(ImageDecodeError, match="truncated or corrupt (JPEG|PNG) data") as e:
                decode_image_bytes(data[:n], "cut")
            assert f"({n} bytes;" in e.value.reason
    with pytest.raises(ImageDecodeError, match=r"not a recognised image format \(9 bytes\)"):
        decode_image_bytes(b"plain txt", "t")
