"""Low-level image maps: CIE L*a*b* colour and the LAB Sobel boundary map.

Plain numpy functions shared by the Point2Mask losses (local LAB affinity,
Point2Mask Appendix B Eq. 12) and the PSPS / Point2Mask transport costs
(low-level boundary map ``P^b_low``, Point2Mask Sec. 3.3.1).

Functions
---------
rgb_to_lab          sRGB -> CIE L*a*b* (D65) in real units, ``L`` in ``[0, 100]``.
lab_sobel_boundary  normalised Sobel gradient energy of the LAB image, ``[0, 1]``.

Substitution note
-----------------
Point2Mask takes ``P^b_low`` from Structured Edge detection [Dollar & Zitnick],
which needs a trained random-forest model file (``model.yml.gz``) that cannot
be obtained offline. pointseg uses instead the LAB Sobel map that the PSPS /
Point2Mask code base computes as its image boundary (``image_to_boundary``):
per-channel Sobel responses on the LAB image, squared, averaged over the six
responses, divided by the maximum away from the image border, clipped to
``[0, 1]``. It is a denser (texture-sensitive) edge map than SE, not a learnt
object contour.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rgb_to_lab", "lab_sobel_boundary", "SOBEL_X", "SOBEL_Y"]

#: Sobel kernels as cross-correlation kernels (the ``F.conv2d`` convention of
#: the PSPS code): ``SOBEL_X`` responds to a change along columns, ``SOBEL_Y``
#: along rows.
SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
SOBEL_Y = SOBEL_X.T.copy()


#: sRGB (linear) -> XYZ matrix (as in skimage / OpenCV); the D65 white is its
#: row sums (0.950456, 1, 1.088754, OpenCV's choice), so that grey is exactly a* = b* = 0.
_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE_D65 = _RGB_TO_XYZ.sum(axis=1)


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """sRGB image to CIE L*a*b* (D65 white) in real units.

    ::

        c_lin = c / 12.92                     if c <= 0.04045
                ((c + 0.055) / 1.055)^2.4     otherwise          (sRGB decoding)
        (X, Y, Z) = M c_lin / white_D65
        f(t) = t^(1/3) if t > (6/29)^3 else t / (3 (6/29)^2) + 4/29
        L = 116 f(Y) - 16,  a = 500 (f(X) - f(Y)),  b = 200 (f(Y) - f(Z))

    (skimage ``rgb2lab`` up to its white point, within 0.01). OpenCV's float
    ``RGB2Lab`` is within 0.3 of this but quantises a* / b*, so it is not used.

    Parameters
    ----------
    image : (H, W, 3) uint8 in ``[0, 255]``, or float in ``[0, 1]``, RGB order.

    Returns
    -------
    lab : (H, W, 3) float32. ``L`` in ``[0, 100]``, ``a`` and ``b`` roughly in
        ``[-128, 128]`` (not the 8-bit OpenCV encoding).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"rgb_to_lab: image must be (H, W, 3), got shape {image.shape}")
    if image.dtype == np.uint8:
        rgb = image.astype(np.float64) / 255.0
    elif np.issubdtype(image.dtype, np.floating):
        rgb = np.clip(image.astype(np.float64), 0.0, 1.0)
    else:
        raise ValueError(f"rgb_to_lab: image dtype must be uint8 or float in [0, 1], got {image.dtype}")
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = lin @ (_RGB_TO_XYZ.T / _WHITE_D65)
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab.astype(np.float32)


def _correlate3x3(channel: np.ndarray, kernel: np.ndarray, padding: str) -> np.ndarray:
    mode = {"reflect": "reflect", "zero": "constant"}[padding]
    p = np.pad(channel, 1, mode=mode)
    h, w = channel.shape
    out = np.zeros((h, w), dtype=np.float64)
    for i in range(3):
        for j in range(3):
            if kernel[i, j] != 0:
                out += kernel[i, j] * p[i : i + h, j : j + w]
    return out


def lab_sobel_boundary(lab: np.ndarray, border: int = 5, padding: str = "reflect") -> np.ndarray:
    """Low-level boundary map ``P^b_low``: normalised LAB Sobel energy.

    For each LAB channel ``c`` the Sobel responses ``G_x^c = S_x * lab_c`` and
    ``G_y^c = S_y * lab_c`` (3x3 cross-correlation) give::

        E(p)     = 1/6 * sum_c ( G_x^c(p)^2 + G_y^c(p)^2 )
        P_low(p) = clip( E(p) / max_{q in interior} E(q), 0, 1 )

    where the interior leaves out ``border`` pixels on every side (the whole
    image if it is too small), as in the PSPS code. This stands in for the
    Structured Edge map of Point2Mask Sec. 3.3.1 (see the module docstring).

    Parameters
    ----------
    lab : (H, W, 3) float, from :func:`rgb_to_lab`.
    border : pixels excluded from the normalising maximum on each side.
    padding : ``"reflect"`` (mirror, no edge at the image border; default) or
        ``"zero"`` (PSPS's ``conv2d(padding=1)``, which puts an artificial edge
        on the border, hence the ``border`` exclusion).

    Returns
    -------
    boundary : (H, W) float32 in ``[0, 1]``; all zeros for a constant image.
    """
    lab = np.asarray(lab, dtype=np.float64)
    if lab.ndim != 3 or lab.shape[2] != 3:
        raise ValueError(f"lab_sobel_boundary: lab must be (H, W, 3), got shape {lab.shape}")
    if padding not in ("reflect", "zero"):
        raise ValueError(f"lab_sobel_boundary: padding must be 'reflect' or 'zero', got {padding!r}")
    h, w = lab.shape[:2]
    if padding == "reflect" and (h < 2 or w < 2):
        raise ValueError(f"lab_sobel_boundary: reflect padding needs H, W >= 2, got {(h, w)}")
    energy = np.zeros((h, w), dtype=np.float64)
    for c in range(3):
        energy += _correlate3x3(lab[:, :, c], SOBEL_X, padding) ** 2
        energy += _correlate3x3(lab[:, :, c], SOBEL_Y, padding) ** 2
    energy /= 6.0
    interior = energy[border : h - border, border : w - border] if (h > 2 * border and w > 2 * border) else energy
    scale = max(float(interior.max()) if interior.size else 0.0, 1e-5)
    return np.clip(energy / scale, 0.0, 1.0).astype(np.float32)
