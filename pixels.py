"""
Pixels, and the pictures a run writes. The models work on float images in [-1, 1]; people look
at PNGs of uint8 pixels. This file is the one place that converts between the two, scores one
against another, lays images out in a grid, and draws a run's curves. It imports nothing of the
project, so train.py, sample.py, eval_fid.py and reproduce.py all stand on it.

    to_unit, to_uint8   [-1, 1] floats -> [0, 1] floats / uint8 arrays, rounded as a saved PNG is
    psnr, ssim          per-image reconstruction scores (train.py's held-out evaluation and
                        eval_fid.py recon report the same numbers)
    save_grid           rows of images as one PNG: small images enlarged, a title per column,
                        the row captions in a .txt beside it
    plot_log            a run's log.jsonl as curves.png: the loss terms, and the held-out scores
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

#################################################################################
#                                  Conversions                                  #
#################################################################################


def to_unit(x):
    """[-1, 1] float -> [0, 1] float, rounded through uint8 as a saved PNG would be, so a score
    measured here is the score of the image a user opens."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def to_uint8(x):
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, H, W, 3) numpy: what a PNG holds, and step 1 of
    the FID protocol (eval_fid.py: images are uint8 before the Inception sees them)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


#################################################################################
#                           Pixel metrics: PSNR, SSIM                           #
#################################################################################

def psnr(a, b):
    """Peak signal-to-noise ratio in dB per image: 10 log10(1 / MSE), MSE over pixels and channels
    of [0, 1] images. Identical images give 100 dB (the MSE is floored at 1e-10), not infinity."""
    mse = (to_unit(a) - to_unit(b)).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))  # (B,)


def ssim(a, b, window: int = 11, sigma: float = 1.5):
    """
    Structural similarity (Wang et al. 2004) per image, averaged over channels: an 11x11 Gaussian
    window with sigma 1.5, K1 = 0.01, K2 = 0.03 and 'valid' filtering, as in the authors' reference
    code. Images smaller than the window use a window as large as the image. In float64, since
    the variances are small differences of large sums.
    """
    x, y = to_unit(a).double(), to_unit(b).double()  # (B, C, H, W) each
    C = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()  # (window,), a normalised 1D Gaussian
    kernel = torch.outer(g, g).expand(C, 1, window, window).to(x.device)  # (C, 1, w, w): one per channel
    blur = lambda t: F.conv2d(t, kernel, groups=C)  # local Gaussian-weighted mean, per channel
    mx, my = blur(x), blur(y)  # (B, C, H', W') local means
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K1 L)^2 and (K2 L)^2 with dynamic range L = 1
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))  # (B, C, H', W')
    return s.flatten(1).mean(1).float()  # (B,)


#################################################################################
#                                  Image grids                                  #
#################################################################################

TILE = 160  # small images are enlarged to about this many pixels a side, so a 32 px grid is readable
TITLE_BAR = 14  # pixels above the grid for the column titles (PIL's default font is 11 px high)


def save_grid(path, rows, titles=None, captions=None):
    """
    One PNG of images in [-1, 1]: `rows` is a list of (C, 3, H, W) tensors, one row of C images
    each. Images under TILE pixels are enlarged by a whole factor, with nearest-neighbour so
    pixels stay sharp (the detail a tokenizer loses is what the grid is for). `titles` (one per
    column) go in a white bar on top; `captions` (one per row) go to a .txt beside the PNG as
    "row i: caption", since a caption is too long to draw under a 32 px image.
    """
    tiles = np.concatenate([np.concatenate(list(to_uint8(r)), axis=1) for r in rows], axis=0)  # (R*H, C*W, 3)
    scale = max(1, TILE // rows[0].shape[-1])
    img = Image.fromarray(tiles).resize((tiles.shape[1] * scale, tiles.shape[0] * scale), Image.NEAREST)
    top = TITLE_BAR if titles else 0
    canvas = Image.new("RGB", (img.width, img.height + top), "white")
    canvas.paste(img, (0, top))
    if titles:
        draw, w = ImageDraw.Draw(canvas), img.width // len(titles)
        for i, name in enumerate(titles):
            draw.text((i * w + 2, 1), name, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    if captions is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            f.write("".join(f"row {i}: {c}\n" for i, c in enumerate(captions)))


#################################################################################
#                                Training curves                                #
#################################################################################

def plot_log(log_path, png_path):
    """log.jsonl's loss terms and held-out scores (PSNR with three captions: their gaps are the caption's effect)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    rows = {}
    with open(log_path) as f:
        for line in f:  # one row per (step, kind); should a step appear twice, the last counts
            r = json.loads(line)
            rows[(r["step"], "eval" in r)] = r
    train_rows = [r for (_, is_eval), r in sorted(rows.items()) if not is_eval]
    evals = [{**r["eval"], "step": r["step"]} for (_, is_eval), r in sorted(rows.items()) if is_eval]
    losses = [k for k in ("loss", "l2", "lpips", "g_adv", "d") if any(r.get(k) for r in train_rows)]
    scores = [k for k in ("psnr", "psnr_other", "psnr_empty", "adherence") if any(k in r for r in evals)]
    panels = [("loss", train_rows, losses)] + ([("held-out", evals, scores)] if scores else [])
    names = {"psnr": "PSNR, own caption", "psnr_other": "PSNR, another image's caption",
             "psnr_empty": "PSNR, empty caption", "adherence": "prompt adherence"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, src, keys) in zip(axes[0], panels):
        for k in keys:
            ax.plot([r["step"] for r in src if k in r], [r[k] for r in src if k in r],
                    marker="" if title == "loss" else "o", label=names.get(k, k))
        if title == "loss":
            ax.set_yscale("log")  # the terms span orders of magnitude
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
