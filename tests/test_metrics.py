"""PSNR and SSIM, as train.py reports them on held-out images, against hand-computed values."""
import math

import pytest
import torch

from eval_fid import psnr, ssim


def from_u8(v, shape=(1, 3, 8, 8)):
    """A constant image holding uint8 value v, in the [-1, 1] convention the code uses."""
    return torch.full(shape, v / 127.5 - 1)


def test_psnr_by_hand():
    a, b = from_u8(100), from_u8(110)  # every pixel off by 10/255
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(1 / (10 / 255) ** 2), rel=1e-5)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.all(psnr(x, x) >= 99)  # identical images: capped, not infinite


def test_ssim_by_hand():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2))
    # Two flat images: no variance, so SSIM is the luminance term (2 mx my + C1) / (mx^2 + my^2 + C1).
    mx, my, c1 = 60 / 255, 200 / 255, 0.01 ** 2
    expected = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
    assert ssim(from_u8(60, (1, 3, 16, 16)), from_u8(200, (1, 3, 16, 16))).item() == pytest.approx(expected, rel=1e-5)
    # A flipped sign (same variance, correlation -1) scores below zero, noise in between.
    img = torch.rand(1, 3, 16, 16) * 0.5
    assert ssim(img, -img).item() < 0 < ssim(img, img + 0.3 * torch.randn_like(img)).item() < 1
