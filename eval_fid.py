"""
Evaluation metrics for TexTok (paper §4.2 "Evaluation protocol").

So far this file holds the pixel-level reconstruction metrics that train.py reports on held-out
images during training: PSNR and SSIM. The FID / IS / precision-recall protocol and the
command-line evaluation of a trained tokenizer are tracked as their own issue and land here.

Protocol: both metrics take images in [-1, 1], quantise them to uint8 first (as every saved or
published image is), and compare on [0, 1]; each returns one value per image.
"""
import torch
import torch.nn.functional as F


def to_unit(x):
    """[-1, 1] float -> [0, 1] float, rounded through uint8 as a saved PNG would be."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def psnr(a, b):
    """Peak signal-to-noise ratio in dB per image: 10 log10(1 / MSE), MSE over pixels and channels."""
    mse = (to_unit(a) - to_unit(b)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(a, b, window: int = 11, sigma: float = 1.5):
    """
    Structural similarity (Wang et al. 2004) per image, averaged over channels: an 11x11 Gaussian
    window with sigma 1.5, K1 = 0.01, K2 = 0.03 and 'valid' filtering, as in the authors' reference
    code. Images smaller than the window use a window as large as the image.
    """
    x, y = to_unit(a).double(), to_unit(b).double()
    C = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = torch.outer(g, g).expand(C, 1, window, window).to(x.device)
    blur = lambda t: F.conv2d(t, kernel, groups=C)  # local Gaussian-weighted mean, per channel
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K1 L)^2 and (K2 L)^2 with dynamic range L = 1
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()
