"""
How fast is it? Throughput and model-FLOPs utilisation (MFU) of the tokenizer's training step, the
DiT's training step and sampling at several token counts, the generation time per image against
the same DiT on a 2D latent grid (DiT-XL/2 on SD-VAE latents, paper Fig. 4), and what text
conditioning costs. And how much memory a training step needs (--only memory), at the paper's sizes.

    python bench.py                                   # tiny sizes, runs on a CPU in about a minute
    python bench.py --tokenizer TexTok-B --image-size 256 --patch-size 16 --dit DiT-XL --batch-size 64 \\
        --sample-steps 250 --json bench-h100.json     # the paper's sizes on a GPU (bf16, compiled)
    python bench.py --only memory                     # per-image activations, the batch that fits (docs/scale.md)

MFU = (analytic FLOPs of what was run) / seconds / (the device's peak dense bf16 FLOP/s). The
FLOP counts are written out below as formulas; tests/test_bench.py checks them against
torch.utils.flop_counter on small configs. Only matmuls and convolutions are counted (softmax,
norms and activations are a few percent), as in the PaLM / nanoGPT MFU convention.
"""
import argparse
import contextlib
import time
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import dit
import textok
from devices import autocast, hardware_defaults
from dit import DiT, Diffusion, guided, make_dit_config
from files import write_json
from textok import LPIPS, Blur, Discriminator, TexTok, d_loss, g_loss, make_config

# Peak dense bf16 tensor-core FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12, "RTX 3090": 71e12}

#################################################################################
#                        Analytic FLOPs (2 per multiply-add)                    #
#################################################################################


def transformer_flops(S, D, depth, mlp_ratio=4.0, ctx=0):
    """One forward of `depth` pre-LN blocks over S tokens of width D:
        q, k, v projections 3 * 2 S D^2, output projection 2 S D^2, MLP 2 * 2 S D (mlp_ratio D),
        attention scores Q K^T 2 S^2 D and the weighted sum A V 2 S^2 D;
    with a cross-attention to `ctx` tokens: q and output 2 * 2 S D^2, k and v 2 * 2 ctx D^2,
    scores and sum 2 * 2 S ctx D."""
    per_block = 8 * S * D * D + 4 * mlp_ratio * S * D * D + 4 * S * S * D
    if ctx:
        per_block += 4 * S * D * D + 4 * ctx * D * D + 4 * S * ctx * D
    return depth * per_block


def textok_flops(cfg, text_len):
    """One TexTok forward (tokenize + detokenize) of one image, text padded to text_len tokens
    (in-context: text tokens join the sequence; padding is masked, not removed, so it costs)."""
    D, hw, N, p, d = cfg.width, cfg.grid ** 2, cfg.num_tokens, cfg.patch_size, cfg.token_dim
    flops = 2 * hw * 3 * p * p * D + 2 * N * D * 2 * d  # patch embedding, to (mean, logvar)
    flops += 2 * N * d * D + 2 * hw * D * 3 * p * p  # latent projection, to pixels
    for part, depth in (("tokenizer", cfg.enc_depth), ("detokenizer", cfg.dec_depth)):
        # The extra tokens this ViT reads: the padded caption where text enters it, one class token in a
        # class-conditional TexTok, else none.
        text = text_len if cfg.cond == "text" and cfg.text_for(part) else (1 if cfg.cond == "class" else 0)
        if cfg.cond == "text" and cfg.text_for(part):
            flops += 2 * text_len * cfg.text_dim * D  # linear projection of the caption
        if cfg.text_mode == "cross-attn" and text:
            flops += transformer_flops(hw + N, D, depth, cfg.mlp_ratio, ctx=text)
        else:
            flops += transformer_flops(hw + N + text, D, depth, cfg.mlp_ratio)
    return flops


def dit_flops(cfg, text_len=None):
    """One DiT forward on one sample: input/output projections, the timestep MLP, the adaLN
    regressions (6 D per block, 2 D for the final layer, once per sample, not per token), the
    blocks, and for DiT-T2I the caption MLP and the cross-attention."""
    D, N, d = cfg.width, cfg.num_tokens, cfg.token_dim
    # 256: the width of the sinusoidal timestep code that DiT's timestep MLP reads (dit.TimestepEmbedder).
    flops = 2 * N * d * D + 2 * N * D * d + 2 * 256 * D + 2 * D * D  # x in, eps out, timestep MLP
    flops += cfg.depth * 2 * D * 6 * D + 2 * D * 2 * D  # adaLN-Zero modulation
    ctx = 0
    if cfg.cond == "text":
        ctx = text_len or cfg.text_len
        flops += 2 * ctx * cfg.text_dim * D + 2 * ctx * D * D  # the caption MLP
    return flops + transformer_flops(N, D, cfg.depth, cfg.mlp_ratio, ctx=ctx)


def conv_linear_flops(model, *inputs):
    """Forward FLOPs of a convolutional network per sample, from its layers' shapes: a conv is
    2 (C_in / groups) k_h k_w per output element, a linear 2 in_features per output element, and
    the discriminator's depthwise 4x4 blur 2 x 16 per output element."""
    total = [0]  # a list, so that the hook below (a closure) can add to it

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, Blur):
            total[0] += 2 * out.numel() * m.kernel.shape[-1] * m.kernel.shape[-2]
        else:
            total[0] += 2 * out.numel() * m.in_features
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, Blur))]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return total[0] / inputs[0].shape[0]


#################################################################################
#                                    Timing                                     #
#################################################################################


def timed(fn, device, warmup=2, iters=5):
    """Seconds per call, after warm-up (compilation, autotuning), with CUDA synchronised."""
    for _ in range(warmup):
        fn()
    # CUDA runs asynchronously: without a synchronize the clock would stop when the kernels are
    # queued, not when they have run.
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def peak_flops(device, override=None):
    """The denominator of MFU in FLOP/s: --peak-tflops, else the datasheet value of the GPU's name
    (PEAK_BF16), else None (a CPU, or a GPU not in the table: MFU is not reported)."""
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None  # no meaningful tensor-core peak on a CPU: MFU is not reported
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


#################################################################################
#                                  Benchmarks                                   #
#################################################################################


def bench_tokenizer(args, device, autocast, peak):
    """The full tokenizer training step of train.py: TexTok forward/backward with L2 + LPIPS, the
    generator's adversarial term, and the discriminator's step on real + fake."""
    cfg = make_config(args.tokenizer, image_size=args.image_size, patch_size=args.patch_size,
                      num_tokens=args.num_tokens, text_dim=args.text_dim, text_len=args.text_len)
    B, R = args.batch_size, args.image_size
    # The paper's ~24M-parameter D from 128 px (channel base 16384, max 512); below, the small D of
    # train.py's defaults (1024, 128), as the paper's would dwarf a 32 px tokenizer.
    tok, disc = TexTok(cfg).to(device), Discriminator(R, 16384 if R >= 128 else 1024, 512 if R >= 128 else 128).to(device)
    lpips = LPIPS().to(device)  # random weights time the same as the real ones (and need no download)
    # Plain AdamW: its cost is per parameter, the same with train.py's weight-decay groups.
    opt, opt_d = torch.optim.AdamW(tok.parameters()), torch.optim.AdamW(disc.parameters())
    tok_c, disc_c = (torch.compile(tok), torch.compile(disc)) if args.compile else (tok, disc)
    x = torch.rand(B, 3, R, R, device=device) * 2 - 1  # (B, 3, R, R) images in [-1, 1]
    text = torch.randn(B, args.text_len, args.text_dim, device=device)  # (B, Lt, Dt), as cached embeddings
    mask = torch.ones(B, args.text_len, dtype=torch.bool, device=device)  # (B, Lt): every position real, the worst case

    def step():  # train.py's tokenizer step, with the GAN on (the most expensive step it takes)
        with autocast:
            recon, post = tok_c(x, text, mask)
            disc.requires_grad_(False)
            loss = F.mse_loss(recon.float(), x) + 0.1 * lpips(recon, x).mean() + 0.1 * g_loss(disc_c(recon))
            disc.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with autocast:
            real, fake = disc_c(torch.cat([x, recon.detach()])).float().chunk(2)
        opt_d.zero_grad(set_to_none=True)
        d_loss(real, fake).backward()
        opt_d.step()
    sec = timed(step, device, args.warmup, args.iters)
    # Per image: TexTok fwd + bwd = 3x forward; LPIPS runs on [x, recon] (2 images) forward and
    # backward to its input (frozen weights: one more forward's worth) = 4x one image; D: the
    # generator term is forward + input-gradient (2x), D's own step forward + full backward on 2
    # images (6x).
    f_tok = textok_flops(cfg, args.text_len)
    f_lpips = conv_linear_flops(_VGG(lpips), x[:1])
    f_disc = conv_linear_flops(disc, x[:2])
    flops = B * (3 * f_tok + 4 * f_lpips + 8 * f_disc)
    return {"bench": "tokenizer train step", "model": args.tokenizer, "image_size": R, "tokens": cfg.num_tokens,
            "batch": B, "img_per_s": B / sec, "tflops_per_s": flops / sec / 1e12,
            "mfu": flops / sec / peak if peak else None,
            "share_of_flops": {"textok": 3 * f_tok / (flops / B), "lpips": 4 * f_lpips / (flops / B),
                               "discriminator": 8 * f_disc / (flops / B)}}


class _VGG(nn.Module):
    """LPIPS' VGG16 trunk alone, for counting its conv FLOPs."""

    def __init__(self, lpips):
        super().__init__()
        self.lpips = lpips

    def forward(self, x):
        return self.lpips.features(x)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 conv on the skip when the width changes."""

    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  nn.GroupNorm(32, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


class _AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with 1x1-conv projections."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = nn.GroupNorm(32, c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C) each
        return x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W))


class SDVAEDecoder(nn.Module):
    """
    The shape of Stable Diffusion's KL-f8 VAE decoder (the one DiT-XL/2 decodes its latents
    with), random weights, for timing only: 4 latent channels -> 512 wide, a middle of
    res-attention-res, then four levels of three residual blocks at widths 512, 512, 256, 128
    with a nearest x2 upsample + 3x3 conv between levels, so a 32x32x4 latent becomes a 256x256
    image. 49.5M parameters, as the released decoder (checked in tests/test_bench.py).
    """

    def __init__(self, z_channels=4, widths=(512, 512, 256, 128)):
        super().__init__()
        layers = [nn.Conv2d(z_channels, z_channels, 1), nn.Conv2d(z_channels, widths[0], 3, padding=1),
                  _ResBlock(widths[0], widths[0]), _AttnBlock(widths[0]), _ResBlock(widths[0], widths[0])]
        cin = widths[0]
        for i, c in enumerate(widths):
            layers += [_ResBlock(cin, c), _ResBlock(c, c), _ResBlock(c, c)]
            cin = c
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # (B, 4, h, w) -> (B, 3, 8h, 8w)
        return self.net(z)


def make_dit(args, tokens, token_dim, device):
    """The --dit size over `tokens` tokens of `token_dim` channels: DiT-T2I with --t2i, else class-conditional."""
    cond = dict(cond="text", text_dim=args.text_dim, text_len=args.text_len) if args.t2i else dict(cond="class")
    return DiT(make_dit_config(args.dit, num_tokens=tokens, token_dim=token_dim, **cond)).to(device)


def dit_inputs(args, model, B, device):
    """Random conditions for a batch of B: ImageNet's 1000 class labels, or caption embeddings
    padded to --text-len with every position real (cross-attention then costs the most)."""
    if model.cfg.cond == "class":
        return dict(y=torch.randint(0, 1000, (B,), device=device))  # (B,)
    return dict(text=torch.randn(B, args.text_len, args.text_dim, device=device),
                text_mask=torch.ones(B, args.text_len, dtype=torch.bool, device=device))


def bench_dit(args, device, autocast, peak, tokens, token_dim=8, label=None):
    """DiT training step and sampling (per DDIM step with classifier-free guidance, i.e. a
    doubled batch) at one token count."""
    B = args.batch_size
    model = make_dit(args, tokens, token_dim, device)
    fwd = torch.compile(model) if args.compile else model
    opt, diff = torch.optim.AdamW(model.parameters()), Diffusion()
    x0 = torch.randn(B, tokens, token_dim, device=device)  # (B, N, d): stands in for cached latents
    cond = dit_inputs(args, model, B, device)

    def train_step():
        with autocast:
            loss = diff.loss(fwd, x0, **cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    eps_fn = guided(fwd, args.cfg_scale, **cond)

    @torch.no_grad()
    def sample_step():  # one guided step; every timestep costs the same, so any t will do
        with autocast:
            eps_fn(x0, torch.full((B,), 500, device=device))
    t_train = timed(train_step, device, args.warmup, args.iters)
    t_sample = timed(sample_step, device, args.warmup, args.iters)
    # Training is forward + backward, 3 forwards' worth (backward computes the gradients of both
    # inputs and weights); a guided sampling step is one forward of the doubled batch, 2 x B.
    f = dit_flops(model.cfg)
    return {"bench": label or "dit", "model": args.dit, "tokens": tokens, "token_dim": token_dim, "batch": B,
            "train_img_per_s": B / t_train, "train_mfu": 3 * B * f / t_train / peak if peak else None,
            "sample_steps_per_s": 1 / t_sample, "sample_img_steps_per_s": B / t_sample,
            "sample_mfu": 2 * B * f / t_sample / peak if peak else None, "gflops_per_forward": f / 1e9}


def bench_generation(args, device, autocast):
    """Seconds per generated image: `sample_steps` guided DiT steps + detokenization, for TexTok
    tokens and for the same DiT on a 2D latent grid (SD-VAE's 8x downsampling, 4 channels,
    patch 2: 256 tokens of 16 values at 256 px, 1024 at 512 px) decoded by an SD-VAE-shaped
    decoder. Both sides use the same DiT size, sampler and steps; the paper's Fig. 4 also adds
    the T5 text embedding to TexTok's side, which --only text measures separately."""
    B, steps = args.batch_size, args.sample_steps
    cfg = make_config(args.tokenizer, image_size=args.image_size, patch_size=args.patch_size,
                      num_tokens=args.num_tokens, text_dim=args.text_dim, text_len=args.text_len)
    tok = TexTok(cfg).to(device).eval()
    text = torch.randn(B, args.text_len, args.text_dim, device=device)  # (B, Lt, Dt)
    mask = torch.ones(B, args.text_len, dtype=torch.bool, device=device)  # (B, Lt)
    out = {}
    grid_tokens = (args.image_size // 8 // 2) ** 2  # SD-VAE downsamples 8x, DiT-XL/2 patches 2x2 of it
    for name, tokens, token_dim in (("textok", args.num_tokens, cfg.token_dim), ("2d-grid", grid_tokens, 16)):
        model = make_dit(args, tokens, token_dim, device).eval()
        fwd = torch.compile(model) if args.compile else model
        eps_fn = guided(fwd, args.cfg_scale, **dit_inputs(args, model, B, device))
        x = torch.randn(B, tokens, token_dim, device=device)  # (B, tokens, token_dim) noisy latents
        t = torch.full((B,), 500, device=device)  # any timestep: the cost is the same

        @torch.no_grad()
        def one_step():
            with autocast:
                eps_fn(x, t)
        sec = timed(one_step, device, args.warmup, args.iters) * steps  # every step costs the same
        if name == "textok":  # the detokenizer reads the caption too (the paper's T2I setting)
            z = torch.randn(B, cfg.num_tokens, cfg.token_dim, device=device)  # (B, N, d)

            @torch.no_grad()
            def detok():
                with autocast:
                    tok.decode(z, text, mask)
        else:
            vae = SDVAEDecoder().to(device).eval()
            vae = torch.compile(vae) if args.compile else vae
            z = torch.randn(B, 4, args.image_size // 8, args.image_size // 8, device=device)  # (B, 4, H/8, W/8)

            @torch.no_grad()
            def detok():
                with autocast:
                    vae(z)
        dec = timed(detok, device, args.warmup, args.iters)
        out[name], out[name + "-decode"] = (sec + dec) / B, dec / B
    return {"bench": "generation", "image_size": args.image_size, "sample_steps": steps, "cfg_scale": args.cfg_scale,
            "textok_tokens": args.num_tokens, "grid_tokens": grid_tokens, "s_per_img_textok": out["textok"],
            "s_per_img_2d_grid": out["2d-grid"], "speedup": out["2d-grid"] / out["textok"],
            "s_decode_textok": out["textok-decode"], "s_decode_2d_grid": out["2d-grid-decode"]}


def bench_text_cost(args, device, autocast):
    """Tokenize + detokenize a batch with cached caption embeddings, and with the frozen text
    encoder run on the captions first (the offline MiniLM unless --text-encoder says otherwise)."""
    from data import ShapesDataset
    from textok import TextEncoder
    B = args.batch_size
    encoder = TextEncoder(args.text_encoder, args.text_len, device)
    captions = ShapesDataset(B, 8).captions  # real captions, so the encoder's cost is a real caption's
    text, mask = (v.to(device) for v in encoder(captions))  # (B, Lt, Dt), (B, Lt)
    cfg = make_config(args.tokenizer, image_size=args.image_size, patch_size=args.patch_size,
                      num_tokens=args.num_tokens, text_dim=text.shape[-1], text_len=args.text_len)
    tok = TexTok(cfg).to(device).eval()
    x = torch.rand(B, 3, args.image_size, args.image_size, device=device) * 2 - 1

    @torch.no_grad()
    def cached():
        with autocast:
            tok(x, text, mask, sample=False)

    @torch.no_grad()
    def uncached():  # what a training step would cost if the encoder ran every step (house rule 8)
        t, m = (v.to(device) for v in encoder(captions))
        with autocast:
            tok(x, t, m, sample=False)
    # The difference is what running the frozen encoder every step would cost per image; train.py
    # pays it once per caption (text_cache), and the paper's Fig. 4 counts it once per generated image.
    a, b = timed(cached, device, args.warmup, args.iters), timed(uncached, device, args.warmup, args.iters)
    return {"bench": "text conditioning cost", "text_encoder": args.text_encoder, "batch": B,
            "s_per_img_cached": a / B, "s_per_img_uncached": b / B, "text_encoder_s_per_img": (b - a) / B}


def bench_loader(args, step_img_per_s):
    """
    Images/s through train.py's loader (data.make_loader: a map-style dataset shuffled by
    ShardedSampler, each batch's caption rows read from a memory-mapped cache of --text-len x
    --text-dim fp16 rows, in --loader-workers processes) for the built-in set drawn per item and
    drawn once (train.py draws it once into --cache-dir), and for the same JPEGs as a folder, as
    webdataset shards and as Parquet in row groups of 100 (the hub's), decoded and center-cropped to
    --image-size. Each rate stands beside the training step's (`step_img_per_s`, bench_tokenizer's):
    the lower of the two bounds training. Files are freshly written, so they are in the page cache:
    this is reading and decoding, not the disk. Timed from the first batch (the workers started).
    """
    import io
    import json
    import os
    import tarfile
    import tempfile

    import numpy as np
    from PIL import Image

    from data import ShapesDataset, ShardedSampler, load_splits, make_loader
    n, side = args.loader_images, args.loader_source_size
    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = []
        for i in range(n):  # smooth colour fields plus grain: about the size of an ImageNet JPEG at this side
            low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
            arr = np.clip(np.asarray(low, np.int16) + rng.integers(-12, 13, (side, side, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=90)
            jpegs.append(buf.getvalue())
        folder, shards = os.path.join(tmp, "folder"), os.path.join(tmp, "shards")
        os.makedirs(folder)
        os.makedirs(shards)
        with open(os.path.join(tmp, "caps.jsonl"), "w") as f:
            for i, b in enumerate(jpegs):
                with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as g:
                    g.write(b)
                f.write(json.dumps({"file": f"{i:06d}.jpg", "caption": f"image {i}"}) + "\n")
        for s in range(0, n, 1000):  # img2dataset's shard size, 1,000 samples
            with tarfile.open(os.path.join(shards, f"{s // 1000:05d}.tar"), "w") as tar:
                for i in range(s, min(s + 1000, n)):
                    for name, payload in ((f"{i:06d}.jpg", jpegs[i]), (f"{i:06d}.txt", f"image {i}".encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        sources = {"folder": (folder, os.path.join(tmp, "caps.jsonl")), "shards": (shards, None)}
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in jpegs],
                                     "caption": [f"image {i}" for i in range(n)]}),
                           os.path.join(tmp, "d.parquet"), row_group_size=100)
            sources["parquet"] = (os.path.join(tmp, "d.parquet"), None)
        except ImportError:
            print("Parquet skipped: pip install pyarrow")
        # A caption cache as train.py's: fp16 rows, memory-mapped, captions of 10 to 40 tokens (trimmed per batch).
        shape = (n, args.text_len, args.text_dim)
        text = (np.lib.format.open_memmap(os.path.join(tmp, "emb.npy"), "w+", np.float16, shape),  # (n, Lt, Dt)
                np.arange(args.text_len)[None] < rng.integers(10, 41, (n, 1)))  # (n, Lt)
        datasets = {"builtin, drawn per item": ShapesDataset(n, args.image_size),
                    "builtin, drawn once": ShapesDataset(n, args.image_size, cache_dir=os.path.join(tmp, "cache"))}
        for name, (data, captions) in sources.items():
            datasets[name] = load_splits(data, captions, args.image_size, val_images=1, progress=False)[0]
        for name, dataset in datasets.items():
            sampler = ShardedSampler(len(dataset), args.batch_size)
            loader = iter(make_loader(dataset, args.batch_size, sampler, args.loader_workers, text=text, trim=True))
            next(loader)  # the workers have started
            t0, seen = time.perf_counter(), 0
            for x, *_ in loader:
                seen += len(x)
            rate = seen / (time.perf_counter() - t0)
            results.append({"bench": "loader", "format": name, "images": seen, "image_size": args.image_size,
                            "workers": args.loader_workers, "img_per_s": rate, "step_img_per_s": step_img_per_s,
                            "bound_by": "loader" if rate < step_img_per_s else "step",
                            **({} if name.startswith("builtin") else
                               {"source_px": side, "kb_per_image": sum(map(len, jpegs)) / n / 1e3})})
    return results


#################################################################################
#                                    Memory                                     #
#################################################################################

GiB, MiB = 2 ** 30, 2 ** 20
# Cards of 24, 48 and 80 GiB: an RTX 3090/4090 holds 24 GiB, an A100/H100 80 GB 80 GiB; an L40S or A6000 ("48 GB")
# holds 45 GiB, so take a few images off its column.
GPUS_GB = (24, 48, 80)


@contextlib.contextmanager
def fake_tensors():
    """Networks and inputs built in the block are fake tensors (FakeTensorMode): shapes, dtypes and a
    device, no data and no arithmetic, so the paper's sizes are counted in seconds on any CPU and in
    no memory. trunc_normal_ redraws until its values are in range, a loop fake tensors cannot run;
    a plain normal stands in for it (initial values change no shape)."""
    @torch.no_grad()
    def normal_(t, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        return t.normal_(mean, std)
    with FakeTensorMode(), mock.patch.object(nn.init, "trunc_normal_", normal_):
        yield


@contextlib.contextmanager
def saved_activations(params):
    """Counts the bytes autograd keeps for backward while a forward runs in the block: every tensor
    saved for backward (saved_tensors_hooks), and the inputs that --grad-checkpoint keeps in their
    place (torch.utils.checkpoint runs its block under its own hooks, which hide what it recomputes);
    each storage once, the weights (`params`) not at all. Yields a dict whose "bytes" is filled in."""
    storage = lambda t: t.untyped_storage()._cdata  # one id per storage, shared by its views
    seen, out = {storage(p) for p in params}, {"bytes": 0}

    def count(t):
        if isinstance(t, torch.Tensor) and storage(t) not in seen:
            seen.add(storage(t))
            out["bytes"] += t.untyped_storage().nbytes()
        return t

    def checkpoint_counted(fn, *args, **kwargs):
        for a in args:
            count(a)
        return checkpoint(fn, *args, **kwargs)
    checkpoint = textok.checkpoint
    textok.checkpoint = dit.checkpoint = checkpoint_counted
    try:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            yield out
    finally:
        textok.checkpoint = dit.checkpoint = checkpoint


def per_image(forward, params, B=2):
    """Saved-activation bytes per image of `forward(b)`, under bf16 autocast as a GPU step runs: the
    count at b = B minus that at b = 1, divided by B - 1, so what does not grow with the batch (the
    bf16 copies of the weights that autocast makes) is left out. Call it inside fake_tensors()."""
    params, counts = list(params), []
    for b in (1, B):
        with torch.autocast("cpu", dtype=torch.bfloat16), saved_activations(params) as saved:
            forward(b)
        counts.append(saved["bytes"])
    return (counts[1] - counts[0]) / (B - 1)


def textok_memory(args, size, R, p, N):
    """(Inside fake_tensors.) One row: TexTok `size` at R px (patch p, N tokens), per training image:
    TexTok's activations without and with --grad-checkpoint, LPIPS', the discriminator's as the
    tokenizer's critic (one image) and in its own step (real + fake: two); and the static bytes of
    everything trained."""
    cfg = make_config(size, image_size=R, patch_size=p, num_tokens=N, text_dim=args.text_dim, text_len=args.text_len)
    tok = TexTok(cfg)
    disc = Discriminator(R, 16384, 512)  # the paper's ~24M-parameter D (train.py: --disc-channel-base 16384 ...)
    lpips = LPIPS().requires_grad_(False)
    images = lambda b: torch.rand(b, 3, R, R) * 2 - 1  # (b, 3, R, R)
    text = lambda b: (torch.randn(b, args.text_len, args.text_dim), torch.ones(b, args.text_len, dtype=torch.bool))

    def tokenizer(b, checkpointed):
        for vit in (tok.encoder, tok.decoder):
            vit.grad_checkpoint = checkpointed
        tok(images(b), *text(b))
    recon = lambda b: images(b).requires_grad_()  # the tokenizer's output: gradients flow back through it
    row = {"bench": "memory", "model": size, "image_size": R, "patch_size": p, "tokens": N,
           "textok_mib": per_image(lambda b: tokenizer(b, False), tok.parameters()) / MiB,
           "textok_checkpointed_mib": per_image(lambda b: tokenizer(b, True), tok.parameters()) / MiB,
           "lpips_mib": per_image(lambda b: lpips(recon(b), images(b)), lpips.parameters()) / MiB,
           "critic_mib": per_image(lambda b: disc.requires_grad_(False)(recon(b)), disc.parameters()) / MiB}
    disc.requires_grad_(True)
    row["d_step_mib"] = 2 * per_image(lambda b: disc(images(b)), disc.parameters()) / MiB
    # Static, per parameter: trained nets fp32 weights, gradients and AdamW's two moments (16 bytes),
    # TexTok also its EMA (4), each its bf16 weight copies under autocast (2); LPIPS' frozen VGG 4 + 2.
    n_tok, n_d, n_lpips = (sum(q.numel() for q in m.parameters()) for m in (tok, disc, lpips))
    row["params_m"] = {"textok": n_tok / 1e6, "discriminator": n_d / 1e6, "lpips": n_lpips / 1e6}
    row["static_gib"] = (22 * n_tok + 18 * n_d + 6 * n_lpips) / GiB
    # The step's peak: TexTok's backward starts with TexTok's, LPIPS' and the critic's activations alive;
    # D's step comes after they are freed, on twice the images.
    for mode, textok_key in (("", "textok_mib"), ("_checkpointed", "textok_checkpointed_mib")):
        row[f"step{mode}_mib"] = max(row[textok_key] + row["lpips_mib"] + row["critic_mib"], row["d_step_mib"])
    return fits(row, row["static_gib"], ("step_mib", "step_checkpointed_mib"))


def dit_memory(args, size, N):
    """(Inside fake_tensors.) One row: DiT `size` over N tokens (class-conditional, or T2I with --t2i), per
    training sample, without and with --grad-checkpoint; static: fp32 weights, gradients, AdamW, EMA, bf16 copies."""
    cond = dict(cond="text", text_dim=args.text_dim, text_len=args.text_len) if args.t2i else dict(cond="class")
    # make_dit's network, built here: its .to(device) cannot move fake tensors.
    model, diff = DiT(make_dit_config(size, num_tokens=N, token_dim=8, **cond)), Diffusion()

    def step(b, checkpointed):
        model.grad_checkpoint = checkpointed
        diff.loss(model, torch.randn(b, N, 8), **dit_inputs(args, model, b, torch.device("cpu")))
    n = sum(q.numel() for q in model.parameters())
    row = {"bench": "memory", "model": size, "tokens": N, "params_m": n / 1e6,
           "step_mib": per_image(lambda b: step(b, False), model.parameters()) / MiB,
           "step_checkpointed_mib": per_image(lambda b: step(b, True), model.parameters()) / MiB,
           "static_gib": 22 * n / GiB}
    return fits(row, row["static_gib"], ("step_mib", "step_checkpointed_mib"))


def fits(row, static_gib, keys):
    """Adds, per GPU size and per key, the micro-batch that fits: 90% of the card (the rest for the CUDA
    context, cuBLAS/cuDNN workspaces and the allocator's fragmentation), less the static memory,
    over the activations per image. An estimate: train.py --memory-check on the card is the test."""
    for gb in GPUS_GB:
        for key in keys:
            free = 0.9 * gb * GiB - static_gib * GiB
            row[f"fits_{gb}gb{key[len('step'):-len('_mib')]}"] = max(0, int(free // (row[key] * MiB)))
    return row


def bench_memory(args):
    """The memory table of docs/scale.md: TexTok-S/B at 128 px (patch 8, 64 tokens) and 256 px (patch 16,
    128 tokens), DiT-B/XL at --dit-tokens, with the paper's caption length and width (--text-len,
    --text-dim: 128 and 2048 for T5-XL). Forward passes on fake tensors at batch 1 and 2: a minute, no GPU."""
    with fake_tensors():
        rows = [textok_memory(args, size, R, p, N) for size in ("TexTok-S", "TexTok-B")
                for R, p, N in ((128, 8, 64), (256, 16, 128))]
        rows += [dit_memory(args, size, N) for size in ("DiT-B", "DiT-XL") for N in args.dit_tokens]
    return rows


def get_args(argv=None):
    """What to time: the models' sizes (tiny by default, the paper's in the module docstring) and how."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the models' sizes (defaults: the tiny ones a CPU trains; the paper's are in the docstring above)
    p.add_argument("--tokenizer", default="TexTok-T")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--num-tokens", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=384, help="caption embedding width (T5-XL: 2048; MiniLM: 384)")
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--text-encoder", default="minilm", help="for the text-cost benchmark")
    p.add_argument("--dit", default="DiT-T")
    p.add_argument("--t2i", action="store_true", help="benchmark DiT-T2I (cross-attention) instead of class DiT")
    p.add_argument("--dit-tokens", type=int, nargs="+", default=[32, 64, 128, 256])
    # how each is timed
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA and Triton")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak (for MFU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--loader-images", type=int, default=1000, help="images the loader benchmark writes and reads")
    p.add_argument("--loader-source-size", type=int, default=384, help="their side before the crop to --image-size")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader worker processes (train.py --num-workers)")
    p.add_argument("--only", nargs="+", default=None,
                   choices=["tokenizer", "dit", "generation", "text", "loader", "memory"],
                   help="default: all but loader and memory (loader times the tokenizer step too, to set "
                        "the two side by side; memory: run it with --text-len 128 --text-dim 2048)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None):
    """Times the chosen benchmarks on this machine's GPU (else its CPU): one printed line per result,
    and, with --json, the results beside the device and the flags."""
    args = get_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Timed as train.py and sample.py run: tf32 matmuls; compiled and under bf16 autocast where the GPU runs them.
    precision, args.compile, notice = hardware_defaults(device, None, args.compile)
    if notice:
        print(f"note: {notice}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = autocast(device, precision)
    peak = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name} | peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {name} | MFU not reported (no peak)")
    only = set(args.only or ["tokenizer", "dit", "generation", "text"])
    results = []
    if "tokenizer" in only:
        results.append(bench_tokenizer(args, device, amp, peak))
    if "dit" in only:
        results += [bench_dit(args, device, amp, peak, n) for n in args.dit_tokens]  # the DiT's cost grows with N
    if "generation" in only:
        results.append(bench_generation(args, device, amp))
    if "text" in only:
        results.append(bench_text_cost(args, device, amp))
    if "loader" in only:  # one result per data format, beside the step's rate: the slower of the two bounds training
        step = next((r for r in results if r["bench"] == "tokenizer train step"), None)
        if step is None:
            step = bench_tokenizer(args, device, amp, peak)
            results.append(step)
        results += bench_loader(args, step["img_per_s"])
    if "memory" in only:
        results += bench_memory(args)  # counted on the CPU whatever the device: the bytes are the same
    for r in results:
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:  # the device and flags beside the numbers: a rate means nothing without them
        write_json(args.json, {"device": name, "args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    main()
