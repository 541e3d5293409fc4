"""Image files in, ``(H, W, 3) uint8`` RGB out, through fsspec URIs.

Every reader in pointseg decodes pixels here, so one set of rules holds
everywhere:

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so the array
  is the image as a viewer shows it. Pass ``exif_transpose=False`` for the raw
  pixel grid (COCO's ``height``/``width`` describe the raw grid; see
  :func:`pointseg.data.coco.read_coco_instances`).
* Grayscale (``1``, ``L``, ``I;16*``, ``I``) is replicated to three channels.
  16-bit samples are rescaled, not clipped: ``v8 = round(v16 * 255 / 65535)``,
  so 0 -> 0, 65535 -> 255 and 32768 -> 128. A 32-bit ``I`` image (how Pillow may
  open a 16-bit PNG) is treated as 16-bit when all its values lie in
  ``[0, 65535]``; anything else is an error rather than a guess.
* Palette images are expanded through their palette.
* Alpha (``RGBA``, ``LA``, ``PA``, palette transparency) is composited on
  black: ``rgb8 = round(rgb * alpha / 255)``. Fully transparent pixels become
  black whatever colour the file stores under them, so the result does not
  depend on hidden data; opaque pixels are unchanged.
* 16-bit-per-channel RGB PNGs are reduced to 8 bits by Pillow on open (high
  byte); Pillow has no 48-bit mode, so that is what they give.
* A missing, truncated or undecodable file raises :class:`ImageDecodeError`
  naming the file and the reason: a file that starts like a JPEG, PNG, GIF,
  BMP, TIFF or WebP but does not decode is "truncated or corrupt", anything
  else "not a recognised image format". Truncation is detected because decoding is
  forced with ``Image.load()`` while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
  is left ``False`` (its default); this module never turns it on, and a
  truncated JPEG is therefore an error, never a silently grey image.
"""

from __future__ import annotations

import io
import re
import warnings

import cv2
import fsspec
import numpy as np
from PIL import Image, ImageFile, ImageOps

__all__ = [
    "ImageDecodeError",
    "read_image",
    "read_image_as_annotated",
    "decode_image_bytes",
    "encode_png",
    "encode_jpeg",
    "join_uri",
    "OutsidePathError",
    "resolve_under",
]


class ImageDecodeError(ValueError):
    """An image file that could not be read or decoded.

    Attributes ``uri`` (the file) and ``reason`` (what went wrong) are kept so
    a pipeline can record a per-image error instead of failing the run.
    """

    def __init__(self, uri: str, reason: str):
        self.uri = str(uri)
        self.reason = str(reason)
        super().__init__(f"cannot decode image {self.uri!r}: {self.reason}")

    def __reduce__(self):  # keep (uri, reason) across pickling (Ray workers)
        return (type(self), (self.uri, self.reason))


def join_uri(base: str, name: str) -> str:
    """``base/name`` for local paths and fsspec URIs (``memory://``, ``s3://b``).

    An absolute ``name`` (``/x.jpg`` or one with a protocol) is returned as is;
    an empty ``base`` gives ``name``.
    """
    base, name = str(base), str(name)
    if not base or "://" in name or name.startswith("/"):
        return name
    if base.endswith("/"):  # also covers a bare "memory://"
        return base + name
    return base + "/" + name


class OutsidePathError(ValueError):
    """A dataset's file name that would be read from outside the dataset's folder.

    Attributes ``name`` (the name as the dataset gives it), ``root`` (the
    folder) and ``reason``.
    """

    def __init__(self, name: str, root: str | None, reason: str):
        self.name, self.root, self.reason = str(name), root, str(reason)
        where = f"under {root!r}" if root is not None else "relative to the working directory"
        super().__init__(f"file_name {self.name!r}: {self.reason}; pointseg reads dataset files only {where} "
                         "(set dataset.allow_outside_paths: true to trust this dataset's paths)")

    def __reduce__(self):
        return (type(self), (self.name, self.root, self.reason))


def _outside_reason(name: str) -> str | None:
    """Why ``name`` is not a plain relative name, or ``None`` when it is one."""
    if "://" in name or "::" in name or name.startswith(("file:", "memory:")):  # "::" chains fsspec URLs
        return "is a URI with a scheme"
    if name.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:[/\\]", name):
        return "is an absolute path"
    depth = 0
    for part in name.replace("\\", "/").split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "climbs above the folder with '..'"
        elif part not in ("", "."):
            depth += 1
    return None


def resolve_under(root: str | None, name: str, allow_outside: bool = False) -> str:
    """The URI pointseg reads for the file a dataset calls ``name`` in its folder ``root``.

    A dataset's file names (COCO ``file_name``, panoptic PNG names) are
    relative to its folder, and pointseg reads nothing else. ``name`` is
    normalised (empty and ``.`` parts dropped, ``a/..`` removed) and joined to
    ``root`` with :func:`join_uri`; ``root=None`` leaves it relative to the
    working directory.

    Raises :class:`OutsidePathError` when ``name`` would leave ``root``: a
    ``..`` that climbs above it (``\\`` counts as a separator here), an
    absolute path (``/x``, ``~/x``, ``C:\\x``, ``\\\\host``) or a URI with a
    scheme (``s3://``, ``file://``, ``http://``, ``memory://``). Also an empty
    name or one with a NUL character. ``allow_outside=True``
    (``dataset.allow_outside_paths``) trusts the dataset: such names are used
    as :func:`join_uri` gives them (absolute and scheme names as they are).
    """
    name = str(name)
    if not name.strip() or "\x00" in name:
        raise OutsidePathError(name, root, "is empty" if "\x00" not in name else "contains a NUL character")
    reason = _outside_reason(name)
    if reason is not None:
        if not allow_outside:
            raise OutsidePathError(name, root, reason)
        return join_uri(root, name) if root is not None else name
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            parts.pop()  # cannot underflow: _outside_reason checked the depth
        elif part not in ("", "."):
            parts.append(part)
    if not parts:
        raise OutsidePathError(name, root, "names the folder itself, not a file")
    rel = "/".join(parts)
    return join_uri(root, rel) if root is not None else rel


def read_image(uri: str, exif_transpose: bool = True) -> np.ndarray:
    """Read an image file at ``uri`` (any fsspec URI or local path).

    Returns ``(H, W, 3) uint8`` RGB, decoded by the rules in the module
    docstring. Raises :class:`ImageDecodeError` when the file is missing,
    unreadable, truncated or not an image.
    """
    return decode_image_bytes(_read_bytes(uri), uri, exif_transpose=exif_transpose)


def read_image_as_annotated(uri: str, height: int, width: int) -> np.ndarray:
    """The image in the pixel grid its annotation uses: the one rule of every stage.

    EXIF orientation is applied, unless the annotation's ``height x width`` is
    the stored (unrotated) grid and not the rotated one: then the labels were
    drawn on the stored pixels (the COCO convention) and those are returned.
    ``height`` or ``width`` <= 0 means unknown (EXIF applied). A size that
    matches neither grid raises :class:`ImageDecodeError` naming both sizes.
    """
    data = _read_bytes(uri)
    img = decode_image_bytes(data, uri)
    if height <= 0 or width <= 0 or img.shape[:2] == (height, width):
        return img
    raw = decode_image_bytes(data, uri, exif_transpose=False)
    if raw.shape[:2] == (height, width):
        return raw
    raise ImageDecodeError(uri, f"image is {img.shape[1]}x{img.shape[0]} (WxH) but annotated as {width}x{height}")


def _read_bytes(uri: str) -> bytes:
    if not str(uri).strip():  # fsspec would open the working directory
        raise ImageDecodeError(uri, "no file name (the dataset's file_name was rejected or is empty)")
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageDecodeError(uri, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(uri, "is a directory, not an image file") from None
    except PermissionError as e:
        raise ImageDecodeError(uri, f"permission denied ({e})") from None
    except OSError as e:
        raise ImageDecodeError(uri, f"cannot read file ({type(e).__name__}: {e})") from None
    return data


def decode_image_bytes(data: bytes, name: str = "<bytes>", exif_transpose: bool = True) -> np.ndarray:
    """Decode encoded image bytes (e.g. a Parquet ``image`` cell) to RGB.

    ``name`` is only used in error messages. Returns ``(H, W, 3) uint8``.
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by another module: truncated images "
            f"may decode silently (decoding {name})",
            stacklevel=2,
        )
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()  # force the full decode: truncation raises here
            if exif_transpose:
                im = _exif_transpose(im, name)
            return _to_rgb(im, name)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(name, f"too many pixels ({e})") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        fmt = _signature(data)
        if fmt is None:
            raise ImageDecodeError(name, f"not a recognised image format ({len(data)} bytes)") from None
        # a file that starts like an image but does not decode was cut short or damaged; PIL's own
        # words vary with where the cut falls ("Truncated File Read", "cannot identify", ...)
        msg = "cannot identify the image" if isinstance(e, Image.UnidentifiedImageError) else str(e)
        raise ImageDecodeError(name, f"truncated or corrupt {fmt} data ({len(data)} bytes; {msg})") from None


#: Leading bytes of the formats datasets ship; used only to word decode errors.
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _signature(data: bytes) -> str | None:
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for sig, fmt in _SIGNATURES.items() if head.startswith(sig)), None)


def _exif_transpose(im: Image.Image, name: str) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception as e:  # a broken EXIF block should not lose the pixels
        warnings.warn(f"{name}: ignoring unreadable EXIF orientation ({e})", stacklevel=3)
        return im
    return im if out is None else out


def _scale16(a: np.ndarray) -> np.ndarray:
    """16-bit samples -> 8 bit with rounding: ``round(v * 255 / 65535)``."""
    a = a.astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _composite_on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``round(rgb * alpha / 255)`` for uint8 ``rgb (H,W,3)`` and ``alpha (H,W)``."""
    num = rgb.astype(np.uint32) * alpha.astype(np.uint32)[..., None]
    return ((num + 127) // 255).astype(np.uint8)


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I;16"):
        gray = _scale16(np.array(im))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "I":
        a = np.array(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageDecodeError(
                name, f"32-bit integer pixels in [{a.min()}, {a.max()}] do not fit 16 bits; no 8-bit mapping is defined"
            )
        gray = _scale16(a)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        raise ImageDecodeError(name, "floating-point images (mode 'F') are not supported")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.array(im.convert("RGBA"), dtype=np.uint8)
        return _composite_on_black(rgba[..., :3], rgba[..., 3])
    # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's own conversion is exact or standard.
    return np.array(im.convert("RGB"), dtype=np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """``(H, W, 3) uint8`` RGB -> lossless PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(_check_rgb(rgb)).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """``(H, W, 3) uint8`` RGB -> JPEG bytes (lossy; ``quality`` 1..95)."""
    buf = io.BytesIO()
    Image.fromarray(_check_rgb(rgb)).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got shape {rgb.shape} dtype {rgb.dtype}")
    return np.ascontiguousarray(rgb)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, C)`` -> ``(size, size, C)`` with area interpolation (the image itself, made C-contiguous,
    when it already has that size): the square network input of EPLD, P2Seg and Point2Mask's MapNet."""
    image = np.asarray(image)
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
