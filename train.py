"""
Trains the paper's two stages (§3.2) on one CPU, one GPU, or many GPUs and nodes, with one code
path: TexTok (--stage tokenizer), then a DiT on its latent tokens (--stage dit).

    python train.py                                    # tiny TexTok on the built-in shapes, CPU ok
    python train.py --stage dit                        # a tiny DiT on that tokenizer's tokens
    python train.py --model TexTok-B --image-size 256 --patch-size 16 --num-tokens 128 \\
        --data /data/imagenet/train --captions captions.jsonl --text-encoder t5-xl --batch-size 256
    torchrun --nproc_per_node=8 train.py ...           # DDP: same flags, --batch-size is global
    python train.py ... --grad-accum 8 --grad-checkpoint  # the same global batch in less memory (docs/scale.md)

What a step does (losses following MAGVIT-v2 [49] and TiTok [50]; the DiT as DiT trains it):
    tokenizer  images + cached caption embeddings -> TexTok -> reconstruction
               tokenizer loss = l2 + lpips + kl  (+ hinge GAN once the discriminator has started)
               discriminator loss = hinge(real, fake) + LeCAM(real, fake)
    dit        cached latent tokens of the frozen tokenizer, noised at a random timestep -> the
               DiT predicts the noise (DDPM's epsilon loss), given a class or the caption

Where the recipe comes from: TexTok is Zha et al., "Language-Guided Image Tokenization for
Generation" (CVPR 2025; §, Table and Fig. numbers are its); [49] MAGVIT-v2 (Yu et al., ICLR 2024)
and [50] TiTok (Yu et al., NeurIPS 2024) give the tokenizer's losses, discriminator and schedule;
DiT (Peebles & Xie, ICCV 2023) and DDPM (Ho et al. 2020) the generation stage; nanoGPT the AdamW
groups and the cosine schedule; ADM (Dhariwal & Nichol 2021) the flips and the sample .npz.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (CAPTION_DETAILS, LatentSet, ShardedSampler, fetch_text, load_splits, make_loader, prompt_adherence,
                  spread_sample)
from devices import (autocast, check_shared, computed_once, distributed, hardware_defaults, mean_across_ranks, share,
                     temporary)
from dit import CONDS as DIT_CONDS
from dit import DiT, DiT_models, Diffusion, generate, make_dit_config
from files import (MissingFile, NpyRows, UserError, append_jsonl, check_output, check_ranges, check_resume, claim_out,
                   file_digest, flag_error, flag_text, json_digest, lock_out, read_checkpoint, run_main,
                   save_checkpoint, write_json)
from pixels import plot_log, psnr, save_grid, ssim, to_uint8
from textok import (CONDS, INITS, LPIPS, TEXT_IN, TEXT_MODES, Discriminator, LeCAM, TexTok, TexTok_models,
                    TextEncoder, d_loss, g_loss, kl_loss, l2_loss, make_config)

# Read this file top to bottom: the flags; the data and the frozen features computed from it once;
# the optimisation recipe; Run, the machinery both stages share; then each stage as one story (data,
# networks, the loop) with its evaluation. The run folder's guards (claim_out, read_checkpoint: never
# replace a run, resume only a checkpoint that fits) are in files.py, with the other input checks.

#################################################################################
#                                     Flags                                     #
#################################################################################

# Flags whose default depends on the stage: the tokenizer recipe (MAGVIT-v2 / TiTok style,
# shrunk to finish in minutes on a CPU) and the DiT recipe (DiT: AdamW, no weight decay,
# beta2 0.999, EMA 0.9999; its constant lr 1e-4 at batch 256 is raised here for small batches).
STAGE_DEFAULTS = {
    "tokenizer": dict(out="out/textok", steps=1000, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=50,
                      weight_decay=1e-4, beta2=0.99, ema_decay=0.999, eval_every=250, save_every=250),
    "dit": dict(out="out/dit", steps=3000, batch_size=64, lr=5e-4, min_lr=5e-5, warmup_steps=100,
                weight_decay=0.0, beta2=0.999, ema_decay=0.9999, eval_every=1000, save_every=500),
}


def get_args(argv=None):
    """The flags, the stage's defaults filled in, values no run can use refused (check_args)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="tokenizer", choices=list(STAGE_DEFAULTS), help="what to train")
    p.add_argument("--out", default=None, help="folder for checkpoints, grids and the log (out/textok, out/dit)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt-latest.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run (else refused): "
                   "a new log; its checkpoint and exported model are replaced as the new run saves")
    p.add_argument("--seed", type=int, default=0)
    # tokenizer (--stage tokenizer)
    p.add_argument("--model", default="TexTok-T", choices=list(TexTok_models))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--num-tokens", type=int, default=1, help="N latent image tokens (paper: 32-256 at 256 px); 1 at "
                   "32 px has as many pixel values per latent number (the bottleneck) as the paper's 64 at 256 px")
    p.add_argument("--token-dim", type=int, default=8, help="d channels per token (paper: 8)")
    p.add_argument("--text-in", default="both", choices=TEXT_IN, help="where the caption enters (Table 4d)")
    p.add_argument("--text-mode", default="in-context", choices=TEXT_MODES, help="how it enters (Table 4c)")
    p.add_argument("--cond", default="text", choices=CONDS, help="captions, or a class embedding (Table 4a)")
    p.add_argument("--init", default="local", choices=INITS,
                   help="local: attention starts by position (textok.init_locality); vit: the plain ViT init")
    p.add_argument("--text-encoder", default="minilm",
                   help="minilm (offline), t5-xl (paper, 256 px), t5-xxl (512 px), a hub name or a local folder")
    p.add_argument("--text-len", type=int, default=64, help="text tokens per caption (paper: 128)")
    p.add_argument("--text-drop", type=float, default=0.0, help="share of training images given the empty caption "
                   "instead of their own, so the tokens must carry the image without it (0: never, 1: always)")
    p.add_argument("--text-noise", type=float, default=None, help="Gaussian noise on the training captions' "
                   "embeddings, in units of each text token's RMS (0: none): what a caption says broadly survives, "
                   f"the exact caption that one training image goes with does not. Default: 1 when the run shows "
                   f"each training caption more than {MEMORISED_PASSES} times (--steps x --batch-size over the "
                   f"training images), where the detokenizer learns captions by heart; else 0 "
                   f"(docs/real-data.md)")
    # DiT (--stage dit)
    p.add_argument("--tokenizer", default="out/textok/tokenizer", help="trained tokenizer folder (train.py writes one)")
    p.add_argument("--dit-model", default="DiT-T", choices=list(DiT_models))
    p.add_argument("--dit-cond", default=None, choices=DIT_CONDS,
                   help="class-conditional DiT or DiT-T2I; default: text when the data has no class labels")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of the sample grids")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sample grids")
    # data
    p.add_argument("--data", default="builtin", help="'builtin' (captioned shapes), an image folder, webdataset "
                   "shards (a folder of .tar, a glob, shards/{00000..00099}.tar) or Parquet (a file, folder or glob)")
    p.add_argument("--captions", default=None, help="JSON-lines caption file for --data FOLDER")
    p.add_argument("--builtin-captions", default="full", choices=CAPTION_DETAILS, help="how much the built-in "
                   "captions say (the images are the same): all, all but the colours, all but the places, the "
                   "shape names only; how the caption's worth follows what it tells the tokens")
    p.add_argument("--caption-key", default=None, help="shards: the caption member's extension or a field of KEY.json "
                   "(default: KEY.txt, else \"caption\" in KEY.json); Parquet: the caption column (default: caption, text, ...)")
    p.add_argument("--image-key", default=None, help="shards: the image member's extension (default: jpg, jpeg, png, "
                   "webp); Parquet: the image column (default: image, jpg, ...)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad images/captions instead of failing")
    p.add_argument("--num-images", type=int, default=4096, help="size of the built-in training set")
    p.add_argument("--val-images", type=int, default=256, help="held-out images for PSNR/SSIM and grids")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on for real data, off for the built-in set)")
    p.add_argument("--cache-dir", default="cache", help="where caption embeddings and DiT latents are cached")
    p.add_argument("--num-workers", type=int, default=2)
    # optimisation (defaults per stage: see STAGE_DEFAULTS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch, split across ranks")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=None)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--grad-accum", type=int, default=1, help="K micro-batches of --batch-size / (K x ranks) per "
                   "rank and step: the same update in about 1/K of the activation memory (docs/scale.md)")
    p.add_argument("--grad-checkpoint", action="store_true", help="keep only each transformer block's input and "
                   "recompute the block in backward: far less activation memory for about a third more compute")
    p.add_argument("--ema-decay", type=float, default=None)
    # losses (tokenizer)
    p.add_argument("--l2-weight", type=float, default=1.0)
    p.add_argument("--lpips-weight", type=float, default=0.0,
                   help="perceptual loss weight (paper, MAGVIT-v2: 0.1); off by default: at 32 px it costs 2/3 of a CPU step")
    p.add_argument("--lpips-weights", default=None, help="local LPIPS weights file (else packaged, else download)")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--gan-weight", type=float, default=0.1, help="0 trains without the GAN")
    p.add_argument("--gan-loss", default="hinge", choices=["hinge", "non-saturating"])
    p.add_argument("--lecam-weight", type=float, default=0.001)
    p.add_argument("--disc-start", type=int, default=20000, help="the discriminator's first step: late, as in TiTok/"
                   "MAGVIT (a GAN on blurry reconstructions adds artifacts); the 1,000-step default never reaches it")
    p.add_argument("--disc-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--disc-channel-base", type=int, default=1024, help="16384 gives the paper's ~24M D at 256 px")
    p.add_argument("--disc-channel-max", type=int, default=128, help="512 for the paper's D")
    # systems
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA "
                   "when Triton is installed")
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="bf16 autocast or plain fp32 (default: "
                   "bf16 on GPUs that have it (compute capability 8.0+), else fp32; bf16 on the CPU runs the GPU's "
                   "mixed-precision path, as tests do)")
    p.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=None, help="first run one "
                   "throwaway step with everything a later step holds (the discriminator's too), so a batch that "
                   "does not fit fails in the first minute, not at --disc-start (default: on with CUDA)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="images per batch of the held-out evaluation")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=None, help="held-out metrics and image grids")
    p.add_argument("--save-every", type=int, default=None, help="overwrite ckpt-latest.pt")
    p.add_argument("--keep-every", type=int, default=0, help="also keep ckpt-<step>.pt every this many steps")
    args = p.parse_args(argv)
    for k, v in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_args(p, args)
    return args


def check_args(p, args):
    """Values no run can use are refused here, before any data is read: one line naming the flag."""
    error = lambda message: flag_error(p, message)
    flag = lambda k: flag_text(args, k)
    if args.resume and args.overwrite:
        error("--resume continues the run in --out, --overwrite starts it over: pass one of them")
    if args.captions and args.data == "builtin":  # it would train on the built-in shapes, the file unread
        error(f"{flag('captions')} goes with --data FOLDER, the images it captions; pass --data")
    if args.builtin_captions != "full" and args.data != "builtin":  # a folder's captions are its file's
        error(f"--builtin-captions {args.builtin_captions} shortens the built-in captions; --data {args.data} has its "
              f"own: drop --builtin-captions")
    if args.lpips_weights and args.lpips_weight > 0 and not os.path.isfile(args.lpips_weights):  # read after the caches
        error(f"{flag('lpips_weights')}: no such file; fix the path, or leave it out (packaged or downloaded weights)")
    check_output(p, "--out", args.out, folder=True)
    check_output(p, "--cache-dir", args.cache_dir, folder=True)
    check_ranges(p, args, at_least_1=("image_size", "patch_size", "num_tokens", "token_dim", "text_len", "steps",
                                      "batch_size", "num_images", "val_images", "log_every", "eval_every",
                                      "save_every", "sample_steps", "grad_accum", "eval_batch_size"),
                 not_negative=("seed", "warmup_steps", "keep_every", "num_workers", "disc_start", "min_lr",
                               "weight_decay", "l2_weight", "lpips_weight", "kl_weight", "gan_weight", "lecam_weight",
                               "text_noise"),
                 positive=("lr", "disc_lr", "grad_clip"), below_1=("beta1", "beta2", "ema_decay"))
    if args.batch_size % args.grad_accum:
        error(f"{flag('batch_size')} is not a multiple of {flag('grad_accum')}: each step takes K equal micro-batches")
    if not 0 <= args.text_drop <= 1:
        error(f"{flag('text_drop')} is a share of the images: give a value in [0, 1]")
    if args.min_lr > args.lr:
        error(f"{flag('min_lr')} is above {flag('lr')}: the schedule decays from --lr to --min-lr")
    if args.sample_steps > Diffusion().T:
        error(f"{flag('sample_steps')}: the diffusion has {Diffusion().T} steps")
    if args.stage == "tokenizer":
        # The ViT cuts the image into whole patches; the StyleGAN2 discriminator halves it down to 4 x 4.
        if args.image_size % args.patch_size:
            error(f"{flag('image_size')} is not a multiple of {flag('patch_size')}")
        if builds_discriminator(args) and (args.image_size < 8 or args.image_size & (args.image_size - 1)):
            error(f"{flag('image_size')}: the discriminator needs a power of two, at least 8")


def builds_discriminator(args):
    """Whether a tokenizer run builds the GAN's discriminator (with its optimizer and LeCAM anchors):
    only a run that reaches --disc-start does."""
    return args.gan_weight > 0 and args.disc_start < args.steps


#################################################################################
#               Data, and the frozen features it is computed into once          #
#################################################################################

# Above this many passes over each training caption the detokenizer may learn captions by heart: it
# recognises a caption it trained with and redraws that picture, which a new image's caption cannot
# match (docs/real-data.md). Measured at 1 token, recognition at 19 passes (emoji names), 40 (900 emoji)
# and 125 (256 built-in scenes); none at 7.5 (OpenMoji), 7.8 (4,096 built-in scenes) and 31 (1,024
# built-in scenes: captions that describe exactly hold out longer than names). 12 is below every count
# where it was seen, so captions that describe pay for the noise between 12 and where they would need it.
MEMORISED_PASSES = 12


def default_text_noise(passes: float) -> float:
    """--text-noise's default: 1 (noise at each text token's RMS) when each training caption is seen
    more than MEMORISED_PASSES times, else 0 (the plain run)."""
    return 1.0 if passes > MEMORISED_PASSES else 0.0


def build_data(args, image_size, master):
    """(train set, held-out set, whether to flip); both stages call it, so the DiT sees exactly the
    images (and held-out split) the tokenizer saw."""
    # What a start need not redo goes to --cache-dir: the built-in images drawn once, a real set's decode
    # check. Rank 0 does it first; under torchrun the other ranks wait for it, then read what it wrote (and
    # if rank 0 refused the data, they refuse it too, from its record, rather than wait for ever).
    wait = dist.is_initialized()
    if wait and not master:
        dist.barrier()
    try:
        train_set, val_set = load_splits(args.data, args.captions, image_size, args.seed, args.num_images,
                                         args.val_images, args.skip_bad, progress=master,
                                         caption_key=args.caption_key, image_key=args.image_key,
                                         cache_dir=args.cache_dir, builtin_captions=args.builtin_captions)
    finally:
        if wait and master:
            dist.barrier()
    # Flips: ADM-style for real data; off for the built-in set, where a flip would contradict
    # "at the left" in the caption.
    hflip = args.hflip if args.hflip is not None else args.data != "builtin"
    return train_set, val_set, hflip


def text_cache(run, captions, encoder_name, text_len, batch_size=64):
    """Caption embeddings by the frozen text encoder (§3.2), computed once (house rule 8): fp16
    .npy, memory-mapped (a dataset larger than RAM works), keyed by encoder, length and captions.
    Each rank embeds its share of the captions and writes it batch by batch: none holds the cache."""
    key = json_digest([encoder_name, text_len, captions])[:16]
    emb_path, mask_path = (os.path.join(run.args.cache_dir, f"text-{key}-{s}.npy") for s in ("emb", "mask"))

    def compute(tag):
        # fp16 halves the cache (T5-XL on ImageNet: 1.28M x 128 x 2048 values, 670 GB in fp16), hence the
        # writing batch by batch and the memory map; fetch_text casts each batch to fp32.
        encoder = TextEncoder(encoder_name, text_len, run.device)
        rows, n = share(len(captions), batch_size, run.rank, run.world), len(captions)
        with NpyRows(temporary(emb_path, tag), (n, text_len, encoder.dim), np.float16, run.master) as emb, \
                NpyRows(temporary(mask_path, tag), (n, text_len), np.bool_, run.master) as mask:
            row = rows.start
            for e, m in encoder.encode_all(captions[rows.start:rows.stop], batch_size, progress=run.master):
                emb.write(row, e.numpy())  # (b, Nt, Dt) fp16
                mask.write(row, m.numpy())  # (b, Nt)
                row += len(e)

    def finish(tag, _):
        # The mask goes last: it is the file computed_once checks, so a cache cut off mid-write is computed
        # again, never read half-written. Temporary names are this run's: two runs may be filling one cache.
        for path in (emb_path, mask_path):
            os.replace(temporary(path, tag), path)
    computed_once(run.rank, run.world, mask_path, compute, finish)
    return np.load(emb_path, mmap_mode="r"), np.load(mask_path, mmap_mode="r")


def caption_caches(run, train_set, val_set, encoder_name, text_len):
    """(training cache, held-out cache); the held-out one ends with the empty caption (row len(val_set))."""
    # The empty caption is there for evaluate_tokenizer: decoding with it shows how much the caption is used.
    return (text_cache(run, train_set.captions, encoder_name, text_len),
            text_cache(run, val_set.captions + [""], encoder_name, text_len))


@torch.no_grad()
def latent_cache(run, tok, dataset, text, key_parts, batch_size=64):
    """The training set encoded once by the frozen tokenizer (posterior means, each image with its
    caption): fp32 (images, N, d), memory-mapped, and the per-channel mean and std of the latents.
    Each rank encodes its share of the images."""
    # Posterior means: DiT's own loop samples its VAE's posterior afresh each step, but a cache written
    # once would freeze a single draw of that noise, so the deterministic mean is stored instead.
    key = json_digest(key_parts)[:16]
    path, stats_path = (os.path.join(run.args.cache_dir, f"latents-{key}{s}") for s in (".npy", "-stats.json"))
    N, d = tok.cfg.num_tokens, tok.cfg.token_dim

    def compute(tag):
        rows = share(len(dataset), batch_size, run.rank, run.world)
        s1, s2 = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)  # sums of z and z^2
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=batch_size,
                                             num_workers=2)
        with NpyRows(temporary(path, tag), (len(dataset), N, d), np.float32, run.master) as out:
            for x, idx, lab in tqdm(loader, desc="encoding latents", unit="batch", disable=not run.master):
                t, m = fetch_text(text, idx, run.device)
                with run.autocast:
                    z = tok.encode(x.to(run.device), t, m, lab.to(run.device)).float().cpu()  # (b, N, d)
                out.write(int(idx[0]), z.numpy())  # rows idx[0], idx[0] + 1, ...: the loader keeps their order
                s1.add_(z.double().sum((0, 1)))
                s2.add_(z.double().pow(2).sum((0, 1)))
        return {"s1": s1.tolist(), "s2": s2.tolist()}  # float64 survives JSON exactly

    def finish(tag, sums):
        os.replace(temporary(path, tag), path)
        s1, s2 = (torch.tensor([r[k] for r in sums], dtype=torch.float64).sum(0) for k in ("s1", "s2"))  # (d,)
        # The DiT sees latents scaled to unit variance per channel, the scale DDPM's noise schedule
        # assumes: what LDM's and DiT's constant 0.18215 does for SD-VAE latents, measured here.
        mean = s1 / (len(dataset) * N)
        std = (s2 / (len(dataset) * N) - mean ** 2).clamp_min(1e-12).sqrt()  # (d,): E[z^2] - E[z]^2, never 0
        write_json(stats_path, {"mean": mean.tolist(), "std": std.tolist(), "images": len(dataset)})  # last
    computed_once(run.rank, run.world, stats_path, compute, finish)
    with open(stats_path) as f:
        return np.load(path, mmap_mode="r"), json.load(f)


#################################################################################
#                           The optimisation recipe                             #
#################################################################################

def lr_at(step, base, args):
    """Linear warmup, then cosine decay to min_lr (scaled by base / lr for the discriminator), as
    TiTok's recipe and nanoGPT schedule it."""
    floor = args.min_lr * base / args.lr
    if step < args.warmup_steps:
        return base * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))


def adamw(model, lr, args, device):
    """AdamW with weight decay on 2-D weights only (every matmul and embedding); biases, norms,
    learned tokens and position embeddings are not decayed (as nanoGPT). Fused on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() == 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() != 2]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=other, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")


def optimizer_step(opt, model, loss_of, K, params, lr, clip):
    """One step of `opt` at learning rate `lr` on K micro-batches, the gradient norm clipped to `clip`.
    `loss_of(k)` runs micro-batch k through `model` (DDP-wrapped or not) -> (loss, {name: term}).
    Returns (the terms averaged over the K micro-batches, the gradient norm before clipping; logged:
    a spike there is the first sign of a bad lr)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    terms = accumulate(model, loss_of, K)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return terms, grad_norm


def accumulate(model, loss_of, K):
    """Gradient accumulation: backward of each micro-batch's loss divided by K, so the summed gradient
    is that of the mean over all K micro-batches, i.e. of one batch K times as large (every loss here
    is a mean over its images). Each micro-batch's activations are freed by its backward before the
    next forward: memory is that of one micro-batch. Under DDP the gradients are all-reduced once, in
    the last backward; no_sync keeps the others local. -> the terms averaged over the micro-batches."""
    runs = []
    for k in range(K):
        with no_sync(model) if k < K - 1 else contextlib.nullcontext():  # no_sync covers forward and backward
            loss, terms = loss_of(k)
            (loss / K if K > 1 else loss).backward()  # K = 1: the plain step, not even a division by 1
        runs.append(terms)
    if K == 1:
        return runs[0]
    return {name: sum(terms[name] for terms in runs) / K for name in runs[0]}


def no_sync(model):
    """DDP's no_sync of `model` (DDP, or torch.compile of a DDP) when it is one, else nothing to do."""
    ddp = getattr(model, "_orig_mod", model)  # torch.compile keeps the module it compiled there
    return ddp.no_sync() if isinstance(ddp, DDP) else contextlib.nullcontext()


def allocate_state(opt):
    """Allocates `opt`'s AdamW moments now, as its first step would, leaving the weights and the step
    count as they were: a step at lr 0 on zero gradients moves nothing (the weight decay factor is
    1 - 0 * wd = 1, the moments stay 0), and its step counters are set back to 0. A resumed optimizer
    that already holds moments is left alone (a step would decay them)."""
    if opt.state:
        return
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    for state in opt.state.values():
        state["step"].zero_()
    opt.zero_grad(set_to_none=True)


def ema_update(ema_params, params, step, decay):
    """EMA of the weights, with the warm-up of TensorFlow's ExponentialMovingAverage(num_updates):
    early on the average forgets faster, so a short run's EMA is not dominated by the init."""
    # lerp_(ema, p, w) is ema += w (p - ema), i.e. ema = (1 - w) ema + w p, for every tensor in one call.
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1 + step) / (10 + step)))


#################################################################################
#                     Run: the machinery both stages share                      #
#################################################################################

class Run:
    """
    Everything the two stages share, written once. A stage builds its data and networks, then:

        run.start(model, cfg, ...)                                 # EMA + AdamW, resume, banner, compile + DDP
        run.check_memory(...)                                      # --memory-check: one throwaway step first
        for x, idx, labels, text, mask in run.batches(data, ...):  # this rank's share of each global batch
            g = run.draws()                                        # the step's randomness, drawn as by one rank
            parts = run.micro_batches(x, ...)                      # --grad-accum K: K equal slices of it
            def loss_of(k): ...                                    # micro-batch k's objective, under run.autocast
            terms, grad_norm = run.optimize(loss_of)               # lr, K backwards, clip, step, then the EMA
            run.end_step(terms, evaluate)                          # log; evaluate and checkpoint when due
        run.finish(...)                                            # export the EMA weights, plot the curves

    Saved and averaged is the unwrapped network (`raw`): no `_orig_mod.` or `module.` in its keys.
    """

    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.master = rank == 0  # rank 0 alone prints and writes files
        self.B = args.batch_size // world  # this rank's share of the global batch
        self.K = args.grad_accum  # micro-batches per step: B / K images go through the network at a time
        self.micro = self.B // self.K
        self.memory_check = device.type == "cuda" if args.memory_check is None else args.memory_check
        # bf16 and torch.compile where the device runs them (devices.hardware_defaults); flags given win.
        precision, self.compile, notice = hardware_defaults(device, args.precision, args.compile)
        self.autocast = autocast(device, precision)
        if notice and self.master:
            print(f"note: {notice} (--precision and --compile override)")
        self.ckpt_path = os.path.join(args.out, "ckpt-latest.pt")
        self.log_path = os.path.join(args.out, "log.jsonl")
        self.step = 0  # optimizer steps taken: the data position, the lr and every draw follow from it
        self.saved_step = None  # the step of ckpt-latest.pt once this run has saved or resumed one

    def start(self, model, cfg, name, summary, shown, parts=None, plain=None):
        """`model` gets its EMA and AdamW; --resume restores them, the stage's other `parts` (name ->
        module or optimizer), the step and the RNGs. Then the banner, args.json, compile and DDP."""
        args, device = self.args, self.device
        self.raw = model.to(device)
        self.ema = copy.deepcopy(self.raw).requires_grad_(False).eval()  # what is evaluated and exported
        self.opt = adamw(self.raw, args.lr, args, device)
        self.params, self.ema_params = list(self.raw.parameters()), list(self.ema.parameters())
        self.parts = {"model": self.raw, "ema": self.ema, "opt": self.opt, **(parts or {})}
        self.plain = {"config": asdict(cfg), **(plain or {})}
        if args.resume:
            ckpt = read_checkpoint(self.ckpt_path, args, device, self.master, asdict(cfg))
            for key, part in self.parts.items():
                if key not in ckpt and key in ("disc", "lecam", "opt_d") and ckpt["step"] <= args.disc_start:
                    continue  # saved by a run too short to reach --disc-start: D starts fresh, as it would have
                if key not in ckpt:
                    raise UserError(f"{self.ckpt_path} holds no {key}: it was saved by a run with other flags; "
                                    f"resume with those (see {os.path.join(args.out, 'args.json')})")
                part.load_state_dict(ckpt[key])
            # Every per-step draw is seeded by the step (draws); the global RNGs are restored too,
            # for anything a fork adds that draws from them.
            torch.set_rng_state(ckpt["rng_cpu"].cpu())
            if device.type == "cuda" and ckpt["rng_cuda"].numel():
                torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
            self.step = self.saved_step = ckpt["step"]
            del ckpt  # the weights now live in the modules; the copy would hold their size twice
        if self.master:
            print(f"{type(model).__name__} config: {json.dumps(asdict(cfg))}")
            print(f"{name}: {sum(p.numel() for p in self.params) / 1e6:.2f}M params | {summary} | {self.world} "
                  f"rank(s) on {device} | global batch {args.batch_size} | compile={self.compile}")
            write_json(os.path.join(args.out, "args.json"), vars(args))
        for m in self.raw.modules():  # the ViTs of TexTok, the DiT
            if hasattr(m, "grad_checkpoint"):
                m.grad_checkpoint = args.grad_checkpoint
        self.model = self.wrap(self.raw)[1].train()  # what the loop calls
        self.bar = tqdm(total=args.steps, initial=self.step, disable=not self.master, desc=f"train {args.stage}",
                        unit="step", dynamic_ncols=True)
        self.shown, self.sums, self.count, self.t0 = shown, None, 0, time.time()

    def wrap(self, module):
        """(compiled, compiled and DDP-wrapped) `module`: torch.compile when on (the default with
        CUDA); DDP under torchrun, which averages the gradients across ranks during backward."""
        compiled = torch.compile(module) if self.compile else module
        if not dist.is_initialized():
            return compiled, compiled
        ddp = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # compile(DDP(m)), not DDP(compile(m)): DDP around a compiled module sees one backward node and
        # all-reduces every gradient after backward has ended; compiling the DDP module lets the compiler
        # cut the graph at DDP's 25 MB buckets, so each bucket's all-reduce overlaps the rest of backward.
        return compiled, torch.compile(ddp) if self.compile else ddp

    def batches(self, dataset, workers, text=None):
        """This rank's batches until end_step has counted --steps, on the device: (inputs, indices (on
        the CPU), labels, caption embeddings and mask, the rows of the cache `text`: None without one).
        Step k reads the same images on one rank or eight, fresh or resumed (ShardedSampler)."""
        sampler = ShardedSampler(len(dataset), self.B, self.rank, self.world, self.args.seed)
        epoch, pos = divmod(self.step, sampler.steps_per_epoch)
        # One loader for the run (its workers persist), its sampler moved to each epoch's start before it reads.
        loader = make_loader(dataset, self.B, sampler, workers, pin=self.device.type == "cuda", text=text,
                             trim=not self.compile)
        # Pinned memory: the copies are queued behind the GPU's work; from pageable memory each would wait for it.
        to = lambda v: None if v is None else v.to(self.device, non_blocking=True)
        while self.step < self.args.steps:
            sampler.set_position(epoch, pos)
            for x, idx, lab, t, m in loader:
                yield to(x), idx, to(lab), None if t is None else to(t).float(), to(m)  # fp16 cache -> fp32
                if self.step >= self.args.steps:  # checked before the loader reads a batch past the end
                    return
            epoch, pos = epoch + 1, 0

    def draws(self):
        """The generator of this step's randomness, seeded by (seed, step): draw for the *global* batch
        and keep this rank's rows (mine), and DDP equals one process and resume is exact."""
        return torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.step)

    def mine(self, t):
        """This rank's rows of a tensor drawn for the global batch, on its device (pinned first on CUDA,
        so that the copy does not wait for the GPU to finish the work already queued)."""
        t = t[self.rank * self.B:(self.rank + 1) * self.B]
        return (t.pin_memory() if self.device.type == "cuda" else t).to(self.device, non_blocking=True)

    def micro_batches(self, *tensors):
        """--grad-accum K: this rank's batch cut into K consecutive micro-batches, [(t1[k], t2[k], ...)]
        for k < K (None stays None). K = 1 is the batch itself. Step k reads the same images and draws
        with any K: only how many go through the network at a time changes."""
        if self.K == 1:
            return [tensors]
        cut = [t.split(self.micro) if t is not None else [None] * self.K for t in tensors]
        return list(zip(*cut))

    def optimize(self, loss_of):
        """The trained network's step at this step's learning rate over the K micro-batches (`loss_of(k)`
        -> (loss, terms)), then its EMA; -> (the terms averaged over the step, the grad norm)."""
        lr = lr_at(self.step, self.args.lr, self.args)
        terms, grad_norm = optimizer_step(self.opt, self.model, loss_of, self.K, self.params, lr,
                                          self.args.grad_clip)  # DDP averaged the grads over the ranks
        ema_update(self.ema_params, self.params, self.step, self.args.ema_decay)
        return terms, grad_norm

    def check_memory(self, step, evaluate, optimizers):
        """--memory-check (default on CUDA): before the first step, what the largest step will hold, so
        a batch that does not fit fails now rather than hours in (the discriminator's activations and
        AdamW moments appear first at --disc-start): every optimizer's moments, then `step()`, the
        forward and backward of one micro-batch of zeros through everything a step runs, then on rank 0
        `evaluate()`, an evaluation batch beside the gradients still held. No weight, moment, buffer or
        random number changes (zeros in, lr 0, no draws): the run goes on as without the check."""
        if not self.memory_check:
            return
        try:
            for opt in optimizers:
                allocate_state(opt)
            step()
            if self.master:
                with torch.no_grad():
                    evaluate()
        except torch.cuda.OutOfMemoryError:  # one line instead of the allocator's report
            raise UserError(f"out of GPU memory in a step of {self.micro} images per micro-batch (or an evaluation "
                            f"batch of {self.args.eval_batch_size}): raise --grad-accum (now {self.K}), add "
                            f"--grad-checkpoint or lower --eval-batch-size; docs/scale.md lists what fits") from None
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    def end_step(self, terms, evaluate):
        """Counts the step and logs `terms` ({name: scalar tensor}); rank 0 evaluates (`evaluate()` ->
        (scores, grid path, a line to print)) and saves when due, the others wait for it at the next
        gradient all-reduce."""
        self.step += 1
        self.log(terms)
        if not self.master:
            return
        self.bar.update(1)
        args, last = self.args, self.step == self.args.steps
        if self.step % args.eval_every == 0 or last:
            scores, grid, line = evaluate()
            self.bar.write(f"step {self.step}: {line}")
            append_jsonl(self.log_path, {"step": self.step, "eval": scores, "grid": grid})
        if self.step % args.save_every == 0 or last:
            self.checkpoint(self.ckpt_path)
        if args.keep_every and self.step % args.keep_every == 0:
            self.checkpoint(os.path.join(args.out, f"ckpt-{self.step:07d}.pt"))

    def log(self, terms):
        """Terms summed on the device (no host sync per step), averaged per --log-every and rank."""
        values = torch.stack([v.detach() for v in terms.values()])  # (terms,), still on the device
        self.sums, self.count = values if self.sums is None else self.sums + values, self.count + 1
        if self.step % self.args.log_every and self.step != self.args.steps:
            return
        avg = mean_across_ranks(self.sums / self.count).tolist()  # the one host sync of the interval
        rate = round(self.count * self.args.batch_size / (time.time() - self.t0), 1)
        row = {"step": self.step, **{k: round(v, 6) for k, v in zip(terms, avg)},
               "lr": lr_at(self.step - 1, self.args.lr, self.args), "img_per_s": rate}
        if self.master:
            self.bar.set_postfix(**{k: f"{row[k]:.4f}" for k in self.shown}, img_s=rate)
            append_jsonl(self.log_path, row)
        self.sums, self.count, self.t0 = None, 0, time.time()

    def checkpoint(self, path):
        """What a resumed run needs (the data position follows from the step), tensors and plain types."""
        cuda = self.device.type == "cuda"
        save_checkpoint({"step": self.step, "rng_cpu": torch.get_rng_state(),
                         "rng_cuda": torch.cuda.get_rng_state(self.device) if cuda else torch.zeros(0),
                         "args": vars(self.args), **{k: part.state_dict() for k, part in self.parts.items()},
                         **self.plain}, path)
        if path == self.ckpt_path:
            self.saved_step = self.step

    def grid_path(self, kind):
        """Where this step's image grid goes: <out>/<kind>-<step>.png."""
        return os.path.join(self.args.out, f"{kind}-{self.step:07d}.png")

    def finish(self, folder, export, grid_kind, next_step=None):
        """Rank 0 exports the EMA weights (`export(<out>/<folder>)`), plots the curves, says where."""
        self.bar.close()
        if not self.master:
            return
        out, curves = os.path.join(self.args.out, folder), os.path.join(self.args.out, "curves.png")
        export(out)
        plot_log(self.log_path, curves)
        print(f"done. checkpoint: {self.ckpt_path}\n      {folder} (EMA weights, safetensors): {out}\n      last grid: "
              f"{self.grid_path(grid_kind)}\n      log: {self.log_path}, curves: {curves}"
              + (f"\n      next: {next_step}" if next_step else ""))


#################################################################################
#                          Stage 1: the TexTok tokenizer                        #
#################################################################################

def train_tokenizer(run):
    """--stage tokenizer: TexTok learns to pass images through N latent tokens of d channels with
    the caption beside them (§3.2, Fig. 2), from L2 + LPIPS + KL, plus the GAN with LeCAM."""
    args, device = run.args, run.device
    # ---- data: images, and their captions embedded once by the frozen text encoder ----
    train_set, val_set, hflip = build_data(args, args.image_size, run.master)
    use_text = args.cond == "text" and args.text_in != "none"
    if args.text_noise is None:  # the default, set before args.json and the checkpoint record it
        passes = args.steps * args.batch_size / len(train_set)  # how often the run shows each caption
        args.text_noise = default_text_noise(passes)
        if use_text and run.master:
            print(f"--text-noise {args.text_noise:g} (the default: this run shows each training caption "
                  f"{passes:.1f} times; noise above {MEMORISED_PASSES})")
    train_text = val_text = None
    if use_text:
        train_text, val_text = caption_caches(run, train_set, val_set, args.text_encoder, args.text_len)
    if args.cond == "class" and train_set.labels is None:
        raise UserError("--cond class needs class labels: use class folders or a 'label' per caption line")

    # ---- the networks: TexTok (Run adds its EMA and AdamW), the GAN's, LPIPS ----
    cfg = make_config(args.model, image_size=args.image_size, patch_size=args.patch_size, num_tokens=args.num_tokens,
                      token_dim=args.token_dim, text_dim=train_text[0].shape[-1] if use_text else 1,
                      text_len=args.text_len, text_in=args.text_in, text_mode=args.text_mode, cond=args.cond,
                      num_classes=max(train_set.labels) + 1 if args.cond == "class" else 1,
                      text_encoder=args.text_encoder if use_text else "", init=args.init)
    torch.manual_seed(args.seed + run.rank)  # the inits, whether or not the caches were just computed
    model = TexTok(cfg)
    gan = builds_discriminator(args)
    parts, about_disc = {}, "no discriminator (--gan-weight 0, or --disc-start past --steps)"
    if gan:
        disc = Discriminator(args.image_size, args.disc_channel_base, args.disc_channel_max).to(device)
        lecam = LeCAM().to(device)
        opt_d = adamw(disc, args.disc_lr or args.lr, args, device)
        parts = dict(disc=disc, lecam=lecam, opt_d=opt_d)  # checkpointed beside TexTok
        about_disc = f"discriminator {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M"
    lpips = LPIPS.load(args.lpips_weights, device) if args.lpips_weight > 0 else None  # frozen VGG16 features
    run.start(model, cfg, args.model, f"{about_disc} | {len(train_set)} train / {len(val_set)} held-out images",
              shown=("l2", "lpips", "d"), parts=parts)
    if gan:  # the critic of the tokenizer's adversarial term needs no DDP: D is frozen there
        critic, disc_ddp = run.wrap(disc)
    zero = torch.zeros((), device=device)  # the terms a step without LPIPS or the GAN logs
    if use_text and args.text_drop > 0:  # what --text-drop gives: the held-out cache's last row (caption_caches)
        empty_text, empty_mask = fetch_text(val_text, [len(val_set)], device)  # (1, Nt, Dt), (1, Nt)

    # -- the tokenizer's step: reconstruct through the posterior sample (noise fixes it) --
    # TexTok §3.2 after MAGVIT-v2: L2 + LPIPS + a KL that only keeps the latent near N(0, I), + GAN once D starts.
    def tokenizer_loss(x, text, mask, lab, noise, adversarial, recons):
        with run.autocast:
            recon, post = run.model(x, text, mask, lab, noise=noise)  # (b, 3, H, W), Posterior of (b, N, d)
            loss_lpips = lpips(recon, x).mean() if lpips is not None else zero
        loss_l2, loss_kl = l2_loss(recon, x), kl_loss(post)  # fp32 (house rule 6)
        loss = args.l2_weight * loss_l2 + args.lpips_weight * loss_lpips + args.kl_weight * loss_kl
        loss_g = zero
        if adversarial:
            disc.requires_grad_(False)  # D is only a critic here: gradients reach the image, not D
            with run.autocast:
                loss_g = g_loss(critic(recon), args.gan_loss)
            disc.requires_grad_(True)
            loss = loss + args.gan_weight * loss_g
        recons.append(recon.detach())  # what D is shown as fake in its step
        return loss, dict(loss=loss, l2=loss_l2, lpips=loss_lpips, kl=loss_kl, g_adv=loss_g)

    # -- the discriminator's step: real and fake in one batch, so one DDP forward/backward --
    # LeCAM (Tseng et al. 2021) ties D's logits to moving averages, so D overfits less to data seen every epoch.
    def disc_loss(x, recon, means):
        with run.autocast:  # parts=2: minibatch-std groups never mix real and fake
            real, fake = disc_ddp(torch.cat([x, recon]), parts=2).float().chunk(2)  # (b,) logits each
        loss_lecam, loss_d = lecam(real, fake), d_loss(real, fake, args.gan_loss)
        means.append(torch.stack([real.mean(), fake.mean()]).detach())  # for the anchors, after the step
        return loss_d + args.lecam_weight * loss_lecam, dict(d=loss_d, lecam=loss_lecam)

    def zeros_batch(b):  # for --memory-check: b images of zeros with the longest caption a batch can have
        x = torch.zeros(b, 3, args.image_size, args.image_size, device=device)  # (b, 3, H, W)
        Nt, Dt = args.text_len, train_text[0].shape[-1] if use_text else 0
        text = torch.zeros(b, Nt, Dt, device=device) if use_text else None  # (b, Nt, Dt)
        mask = torch.ones(b, Nt, dtype=torch.bool, device=device) if use_text else None  # (b, Nt)
        return x, text, mask, torch.zeros(b, dtype=torch.long, device=device)  # labels (b,)

    def throwaway_step():  # both steps' forward and backward on one micro-batch, as from --disc-start on
        x, text, mask, lab = zeros_batch(run.micro)
        noise, recons = torch.zeros(run.micro, cfg.num_tokens, cfg.token_dim, device=device), []  # (b, N, d)
        tokenizer_loss(x, text, mask, lab, noise, gan, recons)[0].backward()
        if gan:
            disc_loss(x, recons[0], [])[0].backward()

    def evaluation_batch():  # one held-out batch through the EMA tokenizer, and the attention shares
        x, text, mask, lab = zeros_batch(args.eval_batch_size)
        with run.autocast:
            run.ema(x, text, mask, lab, sample=False)
        if use_text and args.text_mode == "in-context":
            run.ema.text_attention(x, text, mask, lab)

    run.check_memory(throwaway_step, evaluation_batch, [run.opt] + ([opt_d] if gan else []))

    # ---- the loop ----
    # (B, 3, H, W), (B,), the captions (B, Nt, Dt) and (B, Nt) or None: read in the loader's workers
    for x, idx, lab, text, mask in run.batches(train_set, args.num_workers, train_text):
        # Each draw is made for the global batch and sliced to this rank (run.mine), and the flips are
        # drawn even with --no-hflip: step k draws the same numbers on any number of ranks, with any flags.
        g = run.draws()
        noise = run.mine(torch.randn(args.batch_size, cfg.num_tokens, cfg.token_dim, generator=g))  # (B, N, d)
        flip = run.mine(torch.rand(args.batch_size, generator=g)) < 0.5  # (B,)
        if hflip:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if use_text and args.text_drop > 0:
            # Caption dropout, as text-to-image models train for guidance: an image given the empty caption
            # must pass through its tokens alone, so the tokens cannot leave to the caption what a new
            # image's caption will not say. Drawn after the others: --text-drop 0 is the plain run exactly.
            drop = run.mine(torch.rand(args.batch_size, generator=g)) < args.text_drop  # (B,)
            L = text.shape[1]  # trimmed to the batch's longest caption, never shorter than the empty one
            text = torch.where(drop[:, None, None], empty_text[:, :L], text)  # (B, L, Dt)
            mask = torch.where(drop[:, None], empty_mask[:, :L], mask)  # (B, L)
        if use_text and args.text_noise > 0:
            # Conditioning augmentation (as cascaded diffusion models noise what they condition on): each text
            # token moves by noise at --text-noise times its own RMS, so the decoder can still read what kind of
            # words a caption holds, but not recognise one training caption and redraw its image from memory.
            # Drawn at the full caption length, whatever the batch was trimmed to: the same on any rank count.
            eps = run.mine(torch.randn(args.batch_size, args.text_len, text.shape[-1], generator=g))
            clean = text.float()
            rms = clean.square().mean(-1, keepdim=True).sqrt()  # (B, L, 1)
            text = (clean + args.text_noise * rms * eps[:, :text.shape[1]].to(device)).to(text.dtype)
        adversarial = gan and run.step >= args.disc_start
        # --grad-accum K: the batch goes through in K micro-batches of B/K (the same images and draws as
        # K = 1). Every loss is a per-image mean, so the update is K = 1's; only D's minibatch-std
        # feature, a statistic of groups of 4 consecutive images, sees groups cut at micro-batch ends
        # when B/K is no multiple of 4.
        micro, recons = run.micro_batches(x, text, mask, lab, noise), []
        terms, grad_norm = run.optimize(lambda k: tokenizer_loss(*micro[k], adversarial, recons))

        d_terms = dict(d=zero, lecam=zero)
        if adversarial:
            means = []
            d_terms, _ = optimizer_step(opt_d, disc_ddp, lambda k: disc_loss(micro[k][0], recons[k], means), run.K,
                                        disc.parameters(), lr_at(run.step, args.disc_lr or args.lr, args),
                                        args.grad_clip)
            lecam.update(*mean_across_ranks(torch.stack(means).mean(0)))  # the step's mean logits, on all ranks

        run.end_step(dict(**terms, **d_terms, grad_norm=grad_norm),
                     evaluate=lambda: evaluate_tokenizer(run, val_set, val_text, train_set, train_text))
    run.finish("tokenizer", run.ema.save_pretrained, "recon")


@torch.no_grad()
def decode_with_captions(run, dataset, text, rows, empty):
    """Per batch of `dataset`: (images, {"own" | "other" | "empty": the EMA tokenizer's reconstruction
    (posterior mean) with each image's own caption, the next image's, the empty one}, own captions).
    `text` is a caption cache (None: no caption to change) and `rows[k]` the row of item k's caption;
    `empty` the empty caption, (1, Nt, Dt) and (1, Nt). What the caption adds is own against the others."""
    n = len(dataset)
    for x, idx, lab in torch.utils.data.DataLoader(dataset, batch_size=run.args.eval_batch_size, num_workers=0):
        x, lab = x.to(run.device), lab.to(run.device)
        own = fetch_text(text, [rows[k] for k in idx.tolist()], run.device, trim=not run.compile)  # (b, Nt, Dt), (b, Nt)
        captions = {"own": own}
        if text is not None:
            # "other": a real caption of this data that just does not describe this image.
            captions["other"] = fetch_text(text, [rows[(k + 1) % n] for k in idx.tolist()], run.device,
                                           trim=not run.compile)
            captions["empty"] = (empty[0].expand(len(idx), -1, -1), empty[1].expand(len(idx), -1))
        recon = {}
        for name, (t, m) in captions.items():
            with run.autocast:
                recon[name] = run.ema(x, t, m, lab, sample=False)[0].float()  # (b, 3, H, W)
        yield x, lab, recon, own


@torch.no_grad()
def evaluate_tokenizer(run, val_set, val_text, train_set, train_text, rows_shown=8):
    """The EMA tokenizer on the held-out images: PSNR/SSIM with each one's caption, and how much the
    caption is used (PSNR with the next image's caption and an empty one; the attention it gets, per
    layer); the same PSNRs on as many training images; the grid of the first `rows_shown` held-out
    images. -> (scores, grid path, a line to print)."""
    args, ema = run.args, run.ema
    use_text = val_text is not None
    # The empty caption is the held-out cache's last row (caption_caches), hence len(val_set) held-out images.
    empty = fetch_text(val_text, [len(val_set)], run.device, trim=not run.compile) if use_text else None
    scores = {k: [] for k in ("psnr", "ssim", "psnr_other", "psnr_empty",
                              "train_psnr", "train_psnr_other", "train_psnr_empty")}
    titles = {"own": "recon", "other": "next row's caption", "empty": "empty caption"}
    grid = attention = None
    for x, lab, recon, (text, mask) in decode_with_captions(run, val_set, val_text, range(len(val_set)), empty):
        scores["ssim"].append(ssim(recon["own"], x))
        for name, r in recon.items():
            scores["psnr" + ("" if name == "own" else f"_{name}")].append(psnr(r, x))
        if attention is None and use_text and args.text_mode == "in-context":
            attention = ema.text_attention(x, text, mask, lab)  # own captions, first batch
        if grid is None:
            x8, own8 = x[:rows_shown], recon["own"][:rows_shown]
            err = ((own8 - x8).abs().mean(1, keepdim=True) * 2).clamp(0, 1).expand_as(x8) * 2 - 1  # 4|x - x^| in [0, 1]
            grid = [torch.stack(r) for r in zip(x8, *(v[:rows_shown] for v in recon.values()), err)]  # (cols, 3, H, W)
            grid_titles = ["input", *(titles[k] for k in recon), "|error| x4"]
    # The same on training images: a caption worth more there than on held-out images is one the model has
    # learnt to recognise ("this caption, this picture"), which a new image's caption cannot be.
    seen = spread_sample(train_set, len(val_set))
    for x, lab, recon, _ in decode_with_captions(run, seen, train_text, seen.indices, empty):
        for name, r in recon.items():
            scores["train_psnr" + ("" if name == "own" else f"_{name}")].append(psnr(r, x))
    out = {k: torch.cat(v).mean().item() for k, v in scores.items() if v}
    if attention is not None:
        out["text_attention"] = {k: [round(a, 4) for a in v] for k, v in attention.items()}
    path = run.grid_path("recon")
    save_grid(path, grid, grid_titles, val_set.captions[:rows_shown] if use_text else None)
    line = f"held-out PSNR {out['psnr']:.2f} dB, SSIM {out['ssim']:.4f}"
    if use_text:
        line += (f" | with another image's caption {out['psnr_other']:.2f} dB, with an empty caption "
                 f"{out['psnr_empty']:.2f} dB")
    line += f" | grid {path}\n  training images: PSNR {out['train_psnr']:.2f} dB"
    if use_text:
        line += f", with another's caption {out['train_psnr_other']:.2f}, with an empty one {out['train_psnr_empty']:.2f}"
        # The caption's worth on both, side by side: much more on training images is a caption learnt by heart
        # (docs/real-data.md: --text-noise, on by default past MEMORISED_PASSES passes, is the remedy).
        line += (f"\n  the caption's worth (own - another's): held-out {out['psnr'] - out['psnr_other']:.2f} dB, "
                 f"training images {out['train_psnr'] - out['train_psnr_other']:.2f} dB")
    if "text_attention" in out:
        line += "\n  attention to the caption per layer: " + ", ".join(
            f"{part} " + " ".join(f"{100 * a:.0f}%" for a in shares) for part, shares in out["text_attention"].items())
    return out, path, line


#################################################################################
#                        Stage 2: the DiT on TexTok's tokens                    #
#################################################################################

def train_dit(run):
    """--stage dit: a DiT learns to generate a trained tokenizer's N x d latent tokens (§3.2
    "Generation stage"; patch size 1, §4.1), from a class or the caption (DiT-T2I)."""
    args, device = run.args, run.device
    # ---- the frozen tokenizer, and the data it was trained on ----
    tok_weights = os.path.join(args.tokenizer, "model.safetensors")
    if not os.path.isfile(tok_weights):
        raise MissingFile(f"{tok_weights} not found: train a tokenizer first (python train.py) "
                          f"or pass --tokenizer FOLDER")
    tok = TexTok.from_pretrained(args.tokenizer, device).requires_grad_(False).eval()
    tcfg = tok.cfg
    train_set, val_set, _ = build_data(args, tcfg.image_size, run.master)
    labels = train_set.labels
    cond = args.dit_cond or ("class" if labels is not None and tcfg.cond == "class" else "text")
    if cond == "class" and labels is None:
        raise UserError("--dit-cond class needs class labels: use class folders or a 'label' per caption line")
    tok_text = tcfg.cond == "text" and tcfg.text_in != "none"  # the tokenizer reads captions
    encoder_name = tcfg.text_encoder or args.text_encoder  # a no-text baseline takes the DiT-T2I's from the flag
    train_text = val_text = None
    if tok_text or cond == "text":
        train_text, val_text = caption_caches(run, train_set, val_set, encoder_name, tcfg.text_len)

    # ---- the latent tokens of every training image, encoded once (house rule 8) ----
    # Keyed by the tokenizer's weights and the exact training set: a retrained tokenizer, or other
    # data, never reads another's latents.
    data_key = [args.data, args.captions, tcfg.image_size, args.seed, len(train_set), json_digest(train_set.captions)]
    data_key += [args.image_key] if args.image_key else []  # another image of the same captions (shards, Parquet)
    # An image replaced under its own name changes its file's size or modification time: for a folder, each
    # training image's file; for shards and Parquet, every file of the data (they hold the images).
    if args.data != "builtin":
        source = train_set.dataset
        paths = source.paths if hasattr(source, "paths") else [os.path.join(source.root, source.files[i])
                                                               for i in train_set.indices]
        data_key.append([(st.st_size, st.st_mtime_ns) for st in map(os.stat, paths)])
    tok_digest = file_digest(tok_weights)  # keys the latent cache; sample.py checks it against the tokenizer it gets
    latents, stats = latent_cache(run, tok, train_set, train_text if tok_text else None, [tok_digest, data_key])
    mean, std = (torch.tensor(stats[k], device=device).float() for k in ("mean", "std"))  # (d,) each

    # ---- the DiT (Run adds its EMA and AdamW), and what it cannot be used without ----
    # `meta` goes into the checkpoint and the exported folder: sample.py needs nothing else to generate.
    cfg = make_dit_config(args.dit_model, num_tokens=tcfg.num_tokens, token_dim=tcfg.token_dim, cond=cond,
                          num_classes=max(labels) + 1 if labels is not None else 1,
                          text_dim=train_text[0].shape[-1] if train_text is not None else 0, text_len=tcfg.text_len)
    meta = dict(latent_mean=stats["mean"], latent_std=stats["std"], tokenizer=os.path.abspath(args.tokenizer),
                tokenizer_config=asdict(tcfg), tokenizer_sha256=tok_digest, text_encoder=encoder_name,
                text_len=tcfg.text_len, num_classes=cfg.num_classes, data=args.data)
    torch.manual_seed(args.seed + run.rank)  # the init, whether or not the caches were just computed
    run.start(DiT(cfg), cfg, f"{args.dit_model} ({'DiT-T2I' if cond == 'text' else 'class-conditional'})",
              f"{len(train_set)} latents of {cfg.num_tokens} x {cfg.token_dim}", shown=("loss",),
              plain={"dit_meta": meta})
    diffusion = Diffusion()

    def dit_loss(x0, t, noise, drop, y, text, mask):  # one micro-batch: y (b,) or text (b, Nt, Dt) + mask (b, Nt)
        with run.autocast:
            loss = diffusion.loss(run.model, x0, t=t, noise=noise, drop=drop, y=y, text=text, text_mask=mask)
        return loss, dict(loss=loss)

    def throwaway_step():  # --memory-check: one micro-batch of zeros, with the longest caption a batch can have
        b, text = run.micro, cond == "text"
        x0 = torch.zeros(b, cfg.num_tokens, cfg.token_dim, device=device)  # (b, N, d), also the noise
        t = torch.zeros(b, dtype=torch.long, device=device)  # (b,), also the labels
        emb = torch.zeros(b, cfg.text_len, cfg.text_dim, device=device) if text else None  # (b, Nt, Dt)
        mask = torch.ones(b, cfg.text_len, dtype=torch.bool, device=device) if text else None  # (b, Nt)
        dit_loss(x0, t, x0, t.bool(), None if text else t, emb, mask)[0].backward()

    # The evaluation samples a few rows of k images without gradients: nothing to check beside a step.
    run.check_memory(throwaway_step, lambda: None, [run.opt])

    # ---- the loop ----
    # A memory map: no worker processes needed. The captions (DiT-T2I) come with the latents, as images' do.
    batches = run.batches(LatentSet(latents, labels), workers=0, text=train_text if cond == "text" else None)
    for z, idx, y, text, mask in batches:  # (B, N, d), (B,), (B,), (B, Nt, Dt) and (B, Nt) or None
        x0 = (z - mean) / std  # (B, N, d), unit scale per channel
        g = run.draws()  # t, eps and the condition dropout, as the tokenizer stage draws its noise
        t = run.mine(torch.randint(0, diffusion.T, (args.batch_size,), generator=g))  # (B,)
        noise = run.mine(torch.randn(args.batch_size, cfg.num_tokens, cfg.token_dim, generator=g))  # (B, N, d)
        # Classifier-free guidance (Ho & Salimans 2022), as DiT trains it: a tenth of the conditions is
        # dropped to the null one, so the same network also learns the unconditional noise.
        drop = run.mine(torch.rand(args.batch_size, generator=g)) < cfg.dropout_prob  # (B,) for the guidance
        y = y if cond == "class" else None  # (B,) labels, or the captions: (B, Nt, Dt) and (B, Nt)
        micro = run.micro_batches(x0, t, noise, drop, y, text, mask)  # --grad-accum K: K slices of B/K
        terms, grad_norm = run.optimize(lambda k: dit_loss(*micro[k]))
        run.end_step(dict(**terms, grad_norm=grad_norm),
                     evaluate=lambda: evaluate_dit(run, tok, meta, cond, tok_text, val_set, val_text))
    run.finish("dit", lambda folder: run.ema.save_pretrained(folder, meta), "samples",
               next_step=f"python sample.py --dit {run.ckpt_path}")


@torch.no_grad()
def evaluate_dit(run, tok, meta, cond, tok_text, val_set, val_text, rows_shown=6, rows_scored=16, k=4):
    """Per row a held-out image, then k samples of the EMA DiT: of its caption (T2I), or of its class,
    decoded with other held-out captions of it, as sample.py does; T2I on built-in captions also
    scores the adherence of `rows_scored` captions. -> (scores, grid path, a line to print)."""
    args, device = run.args, run.device
    rows, images, prompts, g = [], [], [], torch.Generator().manual_seed(args.seed)  # the same noise every evaluation
    scored = rows_scored if cond == "text" and args.data == "builtin" else rows_shown
    for i in range(min(scored, len(val_set))):
        y = text = mask = dec = dec_mask = None
        if cond == "class":
            y = torch.full((k,), val_set.labels[i], device=device)
            same = [j for j in range(len(val_set)) if val_set.labels[j] == val_set.labels[i]]
            dec_rows = [same[(n * 7) % len(same)] for n in range(k)]  # other unseen captions of the class
        else:
            dec_rows = [i] * k
            text, mask = fetch_text(val_text, dec_rows, device)  # (k, Nt, Dt), (k, Nt)
        if tok_text:  # T2I decodes with the caption it generated from
            dec, dec_mask = (text, mask) if text is not None else fetch_text(val_text, dec_rows, device)
        x = generate(run.ema, tok, meta, y, text, mask, dec, dec_mask, args.cfg_scale, args.sample_steps, "ddim",
                     0.0, g, device, run.autocast)  # (k, 3, H, W)
        if i < rows_shown:
            rows.append(torch.cat([val_set[i][0][None].to(device).float(), x]))  # (1 + k, 3, H, W)
        images.append(to_uint8(x))
        prompts += [val_set.captions[i]] * k
    path = run.grid_path("samples")
    save_grid(path, rows, ["held-out", "samples ->"])
    if scored != rows_scored:
        return {}, path, f"sample grid {path}"
    adherence = prompt_adherence(np.concatenate(images), prompts)[0]
    return ({"adherence": adherence}, path,
            f"sample grid {path} | prompt adherence {adherence:.3f} (real images score about 0.99)")


#################################################################################
#                                      Main                                     #
#################################################################################

def main(argv=None):
    """`python train.py FLAGS` and each torchrun rank run this; reproduce.py calls it in-process."""
    args = get_args(argv)
    with distributed() as (rank, world, device):
        # --batch-size is the global batch, as the paper's recipes state it; each rank takes an equal share.
        # --grad-accum K then cuts each rank's share into K micro-batches.
        if args.batch_size % (world * args.grad_accum):
            raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world} ranks x --grad-accum "
                            f"{args.grad_accum}: pass a multiple of {world * args.grad_accum}")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # house rule 6
        run = Run(args, rank, world, device)
        os.makedirs(args.out, exist_ok=True)
        check_shared(rank, {"--out": args.out, "--cache-dir": args.cache_dir})  # rank 0 writes there, all read
        # One run per --out at a time (the lock), then the checks that need no work, before any.
        with lock_out(args.out) if run.master else contextlib.nullcontext():
            claim_out(args, run.master)
            if args.resume:
                check_resume(run.ckpt_path, args)
            try:
                (train_tokenizer if args.stage == "tokenizer" else train_dit)(run)
            except KeyboardInterrupt:  # Ctrl-C: files.run_main prints this one line
                raise KeyboardInterrupt(stopped(run, argv)) from None
        if dist.is_initialized():
            dist.barrier()  # every rank leaves once rank 0 has written its files


def stopped(run, argv):
    """What a Ctrl-C prints: the step the run stopped at, and the command that continues it."""
    if hasattr(run, "bar"):
        run.bar.close()  # ends the progress bar's line, so the message has its own
    if run.saved_step is None:
        return f"train.py stopped at step {run.step}, before this run saved a checkpoint; run the same command again"
    flags = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]  # --overwrite would restart it
    command = shlex.join(["python", "train.py", *flags, *([] if "--resume" in flags else ["--resume"])])
    try:  # read back: a Ctrl-C just after a save's rename leaves a newer step there than saved_step says
        saved = torch.load(run.ckpt_path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:
        saved = run.saved_step
    return f"train.py stopped at step {run.step}; {run.ckpt_path} holds step {saved}; continue with: {command}"


if __name__ == "__main__":
    run_main(main)
