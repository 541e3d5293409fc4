import cv2
import numpy as np
import pytest

from pointseg.lowlevel import lab_sobel_boundary, rgb_to_lab


def test_rgb_to_lab_reference_values_and_opencv():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    img[0, 0], img[0, 1], img[0, 2], img[0, 3] = (0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 0, 255)
    lab = rgb_to_lab(img)
    assert lab.dtype == np.float32 and lab.shape == (7, 9, 3)
    np.testing.assert_allclose(lab[0, 0], [0, 0, 0], atol=1e-4)
    np.testing.assert_allclose(lab[0, 1], [100, 0, 0], atol=1e-3)
    # published CIELAB (D65) values of the sRGB primaries (skimage, Lindbloom)
    np.testing.assert_allclose(lab[0, 2], [53.2408, 80.0925, 67.2032], atol=2e-3)
    np.testing.assert_allclose(lab[0, 3], [32.2970, 79.1875, -107.8602], atol=2e-3)
    # OpenCV's float conversion (an independent implementation, quantised a*/b*)
    cv = cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    np.testing.assert_allclose(lab, cv, atol=0.3)
    np.testing.assert_allclose(rgb_to_lab(img.astype(np.float32) / 255), lab, atol=1e-4)


def test_rgb_to_lab_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        rgb_to_lab(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        rgb_to_lab(np.zeros((4, 4, 3), np.int32))


@pytest.mark.parametrize("padding", ["reflect", "zero"])
def test_sobel_boundary_impulse_by_hand(padding):
    # One pixel of L = 6 in a zero 5x5 image. With the Sobel kernels
    # [[1,0,-1],[2,0,-2],[1,0,-1]] and its transpose: the 4-neighbours see
    # (Gx, Gy) = (12, 0) or (0, 12) -> E = 144 / 6 = 24, the diagonal ones
    # (6, 6) -> E = 72 / 6 = 12, the centre and everything else 0.
    lab = np.zeros((5, 5, 3))
    lab[2, 2, 0] = 6.0
    expected = np.zeros((5, 5))
    expected[1:4, 1:4] = 0.5
    expected[2, 1] = expected[2, 3] = expected[1, 2] = expected[3, 2] = 1.0
    expected[2, 2] = 0.0
    out = lab_sobel_boundary(lab, border=0, padding=padding)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_sobel_boundary_step_and_border():
    # A vertical step in the b channel between columns 1 and 2: both columns get
    # Gx = 4 * 10 -> the same energy, normalised to 1; reflect padding puts no
    # edge on the image border.
    lab = np.zeros((6, 5, 3))
    lab[:, 2:, 2] = 10.0
    out = lab_sobel_boundary(lab, border=0)
    expected = np.zeros((6, 5))
    expected[:, 1:3] = 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # zero padding (PSPS) creates a border edge; the maximum ignores it and it is clipped to 1
    big = np.full((20, 20, 3), 50.0)
    big[:, 10:, 0] = 52.0
    zero = lab_sobel_boundary(big, border=5, padding="zero")
    assert zero[0, 5] == 1.0 and zero[10, 9] == 1.0 and zero[10, 5] == 0.0
    assert lab_sobel_boundary(big, border=5)[0, 5] == 0.0
    assert not lab_sobel_boundary(np.ones((8, 8, 3))).any()
