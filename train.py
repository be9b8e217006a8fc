"""
Trains TexTok (--stage tokenizer) on one CPU, one GPU, or many GPUs and nodes, with one code path.

    python train.py                                    # tiny TexTok on the built-in shapes, CPU ok
    python train.py --model TexTok-B --image-size 256 --patch-size 16 --num-tokens 128 \\
        --data /data/imagenet/train --captions captions.jsonl --text-encoder t5-xl --batch-size 256
    torchrun --nproc_per_node=8 train.py ...           # DDP: same flags, --batch-size is global

What a step does (paper §3.2, losses following MAGVIT-v2 [49] and TiTok [50]):
    images + cached caption embeddings -> TexTok -> reconstruction
    tokenizer loss = l2 + lpips + kl  (+ hinge GAN once the discriminator has started)
    discriminator loss = hinge(real, fake) + LeCAM(real, fake)
"""
import argparse
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import ShardedSampler, load_splits, prompt_adherence
from devices import autocast as precision_context
from devices import distributed, mean_across_ranks
from dit import DiT, DiT_models, Diffusion, generate, make_dit_config
from files import (MissingFile, UserError, atomic_write, file_digest, flag_error, load_checkpoint, run_main,
                   write_json)
from pixels import psnr, save_grid, ssim, to_uint8
from textok import (INITS, LPIPS, TexTok, TexTok_models, TextEncoder, Discriminator, LeCAM, d_loss, g_loss,
                    kl_loss, l2_loss, make_config)


# Flags whose default depends on the stage: the tokenizer recipe (MAGVIT-v2 / TiTok style,
# shrunk to finish in minutes on a CPU) and the DiT recipe (DiT: AdamW, no weight decay,
# beta2 0.999, EMA 0.9999; its constant lr 1e-4 at batch 256 is raised here for small batches).
STAGE_DEFAULTS = {
    "tokenizer": dict(out="out/textok", steps=700, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=50,
                      weight_decay=1e-4, beta2=0.99, ema_decay=0.999, eval_every=200, save_every=200),
    "dit": dict(out="out/dit", steps=3000, batch_size=64, lr=5e-4, min_lr=5e-5, warmup_steps=100,
                weight_decay=0.0, beta2=0.999, ema_decay=0.9999, eval_every=1000, save_every=500),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="tokenizer", choices=["tokenizer", "dit"], help="what to train")
    p.add_argument("--out", default=None, help="folder for checkpoints, grids and the log (out/textok, out/dit)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt-latest.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out that holds one: its log starts over, its checkpoint and "
                        "exported model are replaced as the new run saves (without it, such an --out is refused)")
    p.add_argument("--seed", type=int, default=0)
    # tokenizer (--stage tokenizer)
    p.add_argument("--model", default="TexTok-T", choices=list(TexTok_models))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--num-tokens", type=int, default=32, help="N latent image tokens")
    p.add_argument("--token-dim", type=int, default=8, help="d channels per token (paper: 8)")
    p.add_argument("--text-in", default="both", choices=["none", "tokenizer", "detokenizer", "both"])
    p.add_argument("--text-mode", default="in-context", choices=["in-context", "cross-attn"])
    p.add_argument("--cond", default="text", choices=["text", "class"], help="captions, or a class embedding")
    p.add_argument("--init", default="local", choices=INITS,
                   help="local: attention starts by position (TexTok.init_local_attention); vit: the plain ViT init")
    p.add_argument("--text-encoder", default="minilm",
                   help="minilm (offline), t5-xl (paper, 256 px), t5-xxl (512 px), a hub name or a local folder")
    p.add_argument("--text-len", type=int, default=64, help="text tokens per caption (paper: 128)")
    # DiT (--stage dit)
    p.add_argument("--tokenizer", default="out/textok/tokenizer", help="trained tokenizer folder (train.py writes one)")
    p.add_argument("--dit-model", default="DiT-T", choices=list(DiT_models))
    p.add_argument("--dit-cond", default=None, choices=["class", "text"],
                   help="class-conditional DiT or DiT-T2I; default: text when the data has no class labels")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of the sample grids")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sample grids")
    # data
    p.add_argument("--data", default="builtin", help="'builtin' (captioned shapes) or an image folder")
    p.add_argument("--captions", default=None, help="JSON-lines caption file for --data FOLDER")
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
    p.add_argument("--ema-decay", type=float, default=None)
    # losses (tokenizer)
    p.add_argument("--l2-weight", type=float, default=1.0)
    p.add_argument("--lpips-weight", type=float, default=0.1, help="0 trains without LPIPS")
    p.add_argument("--lpips-weights", default=None, help="local LPIPS weights file (else packaged, else download)")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--gan-weight", type=float, default=0.1, help="0 trains without the GAN")
    p.add_argument("--gan-loss", default="hinge", choices=["hinge", "non-saturating"])
    p.add_argument("--lecam-weight", type=float, default=0.001)
    p.add_argument("--disc-start", type=int, default=20000,
                   help="step at which the discriminator starts; late, as in TiTok/MAGVIT recipes: a GAN on "
                        "blurry reconstructions only adds artifacts (the 700-step default never reaches it)")
    p.add_argument("--disc-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--disc-channel-base", type=int, default=1024, help="16384 gives the paper's ~24M D at 256 px")
    p.add_argument("--disc-channel-max", type=int, default=128, help="512 for the paper's D")
    # systems
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                   help="autocast to bf16 or plain fp32 (default: bf16 on CUDA, fp32 on the CPU; bf16 on the CPU "
                        "runs the GPU's mixed-precision code path, as the tests do)")
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
    flag = lambda k: f"--{k.replace('_', '-')} {getattr(args, k)}"
    if args.resume and args.overwrite:
        error("--resume continues the run in --out, --overwrite starts it over: pass one of them")
    for k in ("image_size", "patch_size", "num_tokens", "token_dim", "text_len", "steps", "batch_size",
              "num_images", "val_images", "log_every", "eval_every", "save_every", "sample_steps"):
        if getattr(args, k) < 1:
            error(f"{flag(k)}: must be at least 1")
    for k in ("warmup_steps", "keep_every", "num_workers", "disc_start", "min_lr", "weight_decay", "l2_weight",
              "lpips_weight", "kl_weight", "gan_weight", "lecam_weight"):
        if getattr(args, k) < 0:
            error(f"{flag(k)}: must not be negative")
    for k in ("lr", "disc_lr", "grad_clip"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            error(f"{flag(k)}: must be positive")
    for k in ("beta1", "beta2", "ema_decay"):
        if not 0 <= getattr(args, k) < 1:
            error(f"{flag(k)}: must be in [0, 1)")
    if args.min_lr > args.lr:
        error(f"{flag('min_lr')} is above {flag('lr')}: the schedule decays from --lr to --min-lr")
    if args.sample_steps > Diffusion().T:
        error(f"{flag('sample_steps')}: the diffusion has {Diffusion().T} steps")
    if args.stage == "tokenizer":
        if args.image_size % args.patch_size:
            error(f"{flag('image_size')} is not a multiple of {flag('patch_size')}")
        if args.image_size < 8 or args.image_size & (args.image_size - 1):
            error(f"{flag('image_size')}: the discriminator needs a power of two, at least 8")


#################################################################################
#                             Caption-embedding cache                           #
#################################################################################

def text_cache(captions, encoder_name, text_len, cache_dir, device, rank):
    """
    Caption embeddings for a list of captions, computed once and cached on disk as fp16 .npy
    (memory-mapped, so a dataset larger than RAM works), keyed by encoder, length and captions.
    Rank 0 computes; other ranks wait at a barrier and read the same files.
    """
    key = hashlib.sha256(json.dumps([encoder_name, text_len, captions]).encode()).hexdigest()[:16]
    emb_path, mask_path = (os.path.join(cache_dir, f"text-{key}-{s}.npy") for s in ("emb", "mask"))
    if rank == 0 and not os.path.exists(mask_path):
        os.makedirs(cache_dir, exist_ok=True)
        encoder = TextEncoder(encoder_name, text_len, device)
        emb, mask = encoder.encode_all(captions)
        for path, arr in ((emb_path, emb.numpy()), (mask_path, mask.numpy())):
            def write(tmp, arr=arr):
                with open(tmp, "wb") as f:  # a file, not a name: np.save would add ".npy" to the name
                    np.save(f, arr)
            atomic_write(path, write, shared=True)  # two runs may be filling one cache
        del encoder
    if dist.is_initialized():
        dist.barrier()
    return np.load(emb_path, mmap_mode="r"), np.load(mask_path, mmap_mode="r")


def fetch_text(cache, idx, device, trim=False):
    """Rows `idx` of a cache -> (embeddings (B, Nt, Dt) float32, mask (B, Nt) bool) on device.
    trim=True cuts the padding past the batch's longest caption. That is exact, because padded
    keys are masked out of attention, and it saves a third of the compute on short captions; it
    is off under torch.compile, which would recompile for every new length."""
    order = np.asarray(idx)
    emb, mask = np.ascontiguousarray(cache[0][order]), np.ascontiguousarray(cache[1][order])
    if trim:
        length = max(1, int(mask.sum(1).max()))
        emb, mask = emb[:, :length], mask[:, :length]
    return (torch.from_numpy(emb).to(device, non_blocking=True).float(),
            torch.from_numpy(mask).to(device, non_blocking=True))


def build_data(args, image_size, master):
    """(train set, held-out set, whether to flip): the built-in shapes or a captioned folder.
    Both stages call this, so the DiT sees exactly the images (and held-out split) the tokenizer saw."""
    train_set, val_set = load_splits(args.data, args.captions, image_size, args.seed, args.num_images,
                                     args.val_images, args.skip_bad, progress=master)
    # Flips: ADM-style for real data; off for the built-in set, where a flip would contradict
    # "at the left" in the caption.
    hflip = args.hflip if args.hflip is not None else args.data != "builtin"
    return train_set, val_set, hflip


#################################################################################
#                                   Utilities                                   #
#################################################################################

def lr_at(step, base, args):
    """Linear warmup, then cosine decay to min_lr (scaled by base / lr for the discriminator)."""
    floor = args.min_lr * base / args.lr
    if step < args.warmup_steps:
        return base * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))


def adamw(model, lr, args, device):
    """AdamW with weight decay on 2-D weights only (every matmul and embedding); biases, norms,
    learned tokens and position embeddings are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() == 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() != 2]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=other, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")


def save_checkpoint(state, path):
    """Atomic (files.atomic_write): a crash or a full disk mid-write leaves the previous checkpoint
    intact and no temporary file."""
    def write(tmp):
        with open(tmp, "wb") as f:  # through a Python file, so that a full disk is an OSError(ENOSPC)
            torch.save(state, f)
    atomic_write(path, write)


RUN_FILES = ("ckpt-latest.pt", "tokenizer", "dit")  # what a run leaves in its --out


def claim_out(args, master):
    """A fresh run never replaces one silently: an --out that holds a run needs --resume (continue
    it) or --overwrite (start it over, with a new log)."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
    if found and not (args.resume or args.overwrite):
        raise UserError(f"{args.out} already holds a run ({os.path.join(args.out, found[0])}); pass --resume to "
                        f"continue it, --overwrite to start it over, or another --out")
    log_path = os.path.join(args.out, "log.jsonl")
    if args.overwrite and master and os.path.exists(log_path):
        os.remove(log_path)


def cut_log(log_path, step):
    """Drops the rows of log.jsonl past `step`: a resumed run replays the steps after its checkpoint
    and logs them again. A last line cut off by a kill is dropped too."""
    if not os.path.isfile(log_path):
        return
    keep = []
    with open(log_path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(keep)
    atomic_write(log_path, write)


def load_for_resume(ckpt_path, args, device, master, config):
    """The checkpoint to resume from, with the global RNG states restored, the log cut back to its
    step, and a warning for any flag that changed since it was written (steps and logging
    intervals may change freely). Its model must be the one `config` (the run's, a dict)
    describes: another --model or --num-tokens is one line, not a size mismatch per tensor."""
    if not os.path.exists(ckpt_path):
        raise MissingFile(f"{ckpt_path} not found; nothing to resume (drop --resume or fix --out)")
    ckpt = load_checkpoint(ckpt_path, ("step", "args", "config", "rng_cpu", "rng_cuda"), device=device,
                           fix="start over with --overwrite instead of --resume, or fix --out")
    if ckpt["args"].get("stage", "tokenizer") != args.stage:
        raise UserError(f"{ckpt_path} is a --stage {ckpt['args'].get('stage')} checkpoint; fix --out or --stage")
    if ckpt["step"] > args.steps:
        raise UserError(f"{ckpt_path} is at step {ckpt['step']}, past --steps {args.steps}; pass --steps "
                        f"{ckpt['step']} or more to resume it")
    differ = [k for k in config if ckpt["config"].get(k) != config[k]]
    if differ:
        saved = ", ".join(f"{k}={ckpt['config'].get(k)!r}" for k in differ)
        now = ", ".join(f"{k}={config[k]!r}" for k in differ)
        raise UserError(f"{ckpt_path} holds a model with {saved}, but these flags build one with {now}; resume "
                        f"with the flags it was trained with (see {os.path.join(args.out, 'args.json')}), or "
                        f"start over with --overwrite or another --out")
    torch.set_rng_state(ckpt["rng_cpu"].cpu())
    if device.type == "cuda" and ckpt["rng_cuda"].numel():
        torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
    free = ("resume", "overwrite", "steps", "eval_every", "save_every", "keep_every", "log_every", "num_workers")
    changed = {k: (v, vars(args)[k]) for k, v in ckpt["args"].items() if k in vars(args) and vars(args)[k] != v
               and k not in free}
    if changed and master:
        print(f"warning: resuming {ckpt_path} with changed flags (saved, now): {changed}")
    if master:
        cut_log(os.path.join(args.out, "log.jsonl"), ckpt["step"])
    return ckpt


def ema_update(ema_params, params, step, decay):
    """EMA of the weights, with the warm-up of TensorFlow's ExponentialMovingAverage(num_updates):
    early on the average forgets faster, so a short run's EMA is not dominated by the init."""
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1 + step) / (10 + step)))


def run_state(step, steps_per_epoch, args, device):
    """What every checkpoint holds besides networks and optimizers. All per-step randomness is
    seeded by the step (see the loops); the global RNG states are saved too, for anything a fork
    adds that draws from them."""
    return {"step": step, "data_position": {"epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch},
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0),
            "args": vars(args)}


class IntervalLog:
    """Loss terms summed on the device (no host sync per step), then averaged over each
    --log-every interval and across ranks; rank 0 writes them to log.jsonl and the progress bar."""

    def __init__(self, path, names, args, master, bar, shown):
        self.path, self.names, self.args, self.master, self.bar, self.shown = path, names, args, master, bar, shown
        self.sums, self.count, self.seen, self.t0 = None, 0, 0, time.time()

    def add(self, step, terms):
        self.sums = terms if self.sums is None else self.sums + terms
        self.count += 1
        self.seen += self.args.batch_size
        if step % self.args.log_every and step != self.args.steps:
            return
        avg = mean_across_ranks(self.sums / self.count).tolist()
        rec = {"step": step, **{k: round(v, 6) for k, v in zip(self.names, avg)},
               "lr": lr_at(step - 1, self.args.lr, self.args), "img_per_s": round(self.seen / (time.time() - self.t0), 1)}
        if self.master:
            self.bar.set_postfix(**{k: f"{rec[k]:.4f}" for k in self.shown}, img_s=rec["img_per_s"])
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.sums, self.count, self.seen, self.t0 = None, 0, 0, time.time()


def save_due(step, args, checkpoint, latest):
    """Overwrites ckpt-latest every --save-every steps and at the end; keeps a copy every --keep-every."""
    if step % args.save_every == 0 or step == args.steps:
        checkpoint(latest)
    if args.keep_every and step % args.keep_every == 0:
        checkpoint(os.path.join(args.out, f"ckpt-{step:07d}.pt"))


def save_args(args):
    write_json(os.path.join(args.out, "args.json"), vars(args))


def plot_log(log_path, png_path):
    """The run's curves from its log.jsonl: the training loss terms against the step and, where
    the log has held-out evaluations, their scores (the tokenizer: PSNR with each image's own
    caption, another image's and an empty one, so the caption's effect is a gap between lines)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = {}
    with open(log_path) as f:
        for line in f:  # one row per (step, kind); should a step appear twice, the last counts
            r = json.loads(line)
            rows[(r["step"], "eval" in r)] = r
    train_rows = sorted((r for (_, e), r in rows.items() if not e), key=lambda r: r["step"])
    evals = sorted((r for (_, e), r in rows.items() if e), key=lambda r: r["step"])
    panels = [("loss", [k for k in ("loss", "l2", "lpips", "g_adv", "d") if any(r.get(k) for r in train_rows)])]
    scores = [k for k in ("psnr", "psnr_other", "psnr_empty", "adherence") if any(k in r["eval"] for r in evals)]
    if scores:
        panels.append(("held-out", scores))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False)
    names = {"psnr": "PSNR, own caption", "psnr_other": "PSNR, another image's caption",
             "psnr_empty": "PSNR, empty caption", "adherence": "prompt adherence"}
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            src = train_rows if title == "loss" else [r["eval"] | {"step": r["step"]} for r in evals]
            ax.plot([r["step"] for r in src if k in r], [r[k] for r in src if k in r], marker="" if title == "loss" else "o",
                    label=names.get(k, k))
        if title == "loss":
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


#################################################################################
#                                    Training                                   #
#################################################################################

def train_tokenizer(args, rank, world, device, master, B, use_compile, autocast):
    """--stage tokenizer: TexTok with L2 + LPIPS + KL (+ GAN and LeCAM once the discriminator starts)."""
    train_set, val_set, hflip = build_data(args, args.image_size, master)
    use_text = args.cond == "text" and args.text_in != "none"
    text_dim = 0
    if use_text:
        enc_device = device if device.type == "cuda" else "cpu"
        train_text = text_cache(train_set.captions, args.text_encoder, args.text_len, args.cache_dir, enc_device, rank)
        # The held-out cache gets one extra row, the empty caption, for the grid's third column.
        val_text = text_cache(val_set.captions + [""], args.text_encoder, args.text_len, args.cache_dir, enc_device, rank)
        text_dim = train_text[0].shape[-1]
    num_classes = 1
    if args.cond == "class":
        labels = train_set.labels
        if labels is None:
            raise UserError("--cond class needs class labels: use class folders or a 'label' per caption line")
        num_classes = max(labels) + 1

    # ---- models: TexTok (+ EMA), discriminator, LPIPS, LeCAM ----
    cfg = make_config(args.model, image_size=args.image_size, patch_size=args.patch_size, num_tokens=args.num_tokens,
                      token_dim=args.token_dim, text_dim=text_dim or 1, text_len=args.text_len,
                      text_in=args.text_in, text_mode=args.text_mode, cond=args.cond, num_classes=num_classes,
                      text_encoder=args.text_encoder if use_text else "", init=args.init)
    raw_model = TexTok(cfg).to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    use_gan = args.gan_weight > 0
    raw_disc = Discriminator(args.image_size, args.disc_channel_base, args.disc_channel_max).to(device)
    lecam = LeCAM().to(device)
    lpips = LPIPS.load(args.lpips_weights, device) if args.lpips_weight > 0 else None
    opt = adamw(raw_model, args.lr, args, device)
    opt_d = adamw(raw_disc, args.disc_lr or args.lr, args, device)

    step = 0
    ckpt_path = os.path.join(args.out, "ckpt-latest.pt")
    if args.resume:
        ckpt = load_for_resume(ckpt_path, args, device, master, asdict(cfg))
        raw_model.load_state_dict(ckpt["model"]); ema.load_state_dict(ckpt["ema"])
        raw_disc.load_state_dict(ckpt["disc"]); lecam.load_state_dict(ckpt["lecam"])
        opt.load_state_dict(ckpt["opt"]); opt_d.load_state_dict(ckpt["opt_d"])
        step = ckpt["step"]
        del ckpt

    n_params = sum(p.numel() for p in raw_model.parameters())
    if master:
        print(f"TexTok config: {json.dumps(asdict(cfg))}")
        print(f"{args.model}: {n_params / 1e6:.2f}M params | discriminator {sum(p.numel() for p in raw_disc.parameters()) / 1e6:.2f}M "
              f"| {len(train_set)} train / {len(val_set)} held-out images | {world} rank(s) on {device} "
              f"| global batch {args.batch_size} | compile={use_compile}")
        save_args(args)

    model, disc = raw_model, raw_disc
    if use_compile:
        model, disc = torch.compile(raw_model), torch.compile(raw_disc)
    disc_fwd = disc  # used for the generator's adversarial term: no DDP, params frozen there
    if dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        disc = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = ShardedSampler(len(train_set), B, rank, world, args.seed)
    spe = sampler.steps_per_epoch

    def batches(from_step):
        """Endless (images, indices, labels) batches from global step `from_step` on."""
        epoch, pos = divmod(from_step, spe)
        while True:
            sampler.set_position(epoch, pos)
            loader = torch.utils.data.DataLoader(train_set, batch_size=B, sampler=sampler, drop_last=True,
                                                 num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                                 persistent_workers=False)
            yield from loader
            epoch, pos = epoch + 1, 0

    val_loader = torch.utils.data.DataLoader(val_set, batch_size=64, num_workers=0)

    @torch.no_grad()
    def evaluate():
        """The EMA tokenizer on held-out images: PSNR/SSIM with each image's own caption, and how
        much the caption is used: PSNR with the next held-out image's caption and with an empty
        caption, and the share of attention the image side gives to the caption, per layer."""
        n = len(val_set)
        scores = {"psnr": [], "ssim": [], "psnr_other": [], "psnr_empty": []}
        captions = {"own": None, "other": lambda idx: [(i + 1) % n for i in idx], "empty": lambda idx: [n] * len(idx)}
        grid, attention = None, None
        for x, idx, lab in val_loader:
            x, lab = x.to(device), lab.to(device)
            recon = {}
            for name, rows in captions.items():
                text = mask = None
                if use_text:
                    text, mask = fetch_text(val_text, rows(idx.tolist()) if rows else idx, device, trim=not use_compile)
                elif rows:
                    break  # no caption to change
                with autocast:
                    recon[name] = ema(x, text, mask, lab, sample=False)[0].float()
                if attention is None and use_text and args.text_mode == "in-context":
                    attention = ema.text_attention(x, text, mask, lab)  # own captions, first batch
            scores["psnr"].append(psnr(recon["own"], x)); scores["ssim"].append(ssim(recon["own"], x))
            for name in ("other", "empty"):
                if name in recon:
                    scores[f"psnr_{name}"].append(psnr(recon[name], x))
            if grid is None:
                titles = {"own": "recon", "other": "next row's caption", "empty": "empty caption"}
                err = ((recon["own"][:8] - x[:8]).abs().mean(1, keepdim=True) * 2).clamp(0, 1).expand_as(x[:8]) * 2 - 1
                grid = ([torch.stack(r) for r in zip(x[:8], *(v[:8] for v in recon.values()), err)],
                        ["input", *(titles[k] for k in recon), "|error| x4"], val_set.captions[:8] if use_text else None)
        out = {k: torch.cat(v).mean().item() for k, v in scores.items() if v}
        if attention is not None:
            out["text_attention"] = {k: [round(a, 4) for a in v] for k, v in attention.items()}
        return out, grid

    def checkpoint(path):
        save_checkpoint({**run_state(step, spe, args, device),
                         "model": raw_model.state_dict(), "ema": ema.state_dict(), "disc": raw_disc.state_dict(),
                         "lecam": lecam.state_dict(), "opt": opt.state_dict(), "opt_d": opt_d.state_dict(),
                         "config": asdict(cfg)}, path)

    # ---- the loop ----
    log_path = os.path.join(args.out, "log.jsonl")
    data = batches(step)
    model.train(); disc.train()
    ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())
    bar = tqdm(total=args.steps, initial=step, disable=not master, desc="train", unit="step", dynamic_ncols=True)
    log = IntervalLog(log_path, ["loss", "l2", "lpips", "kl", "g_adv", "d", "lecam", "grad_norm"], args, master, bar,
                      shown=["l2", "lpips", "d"])
    while step < args.steps:
        x, idx, lab = next(data)
        x, lab = x.to(device, non_blocking=True), lab.to(device, non_blocking=True)
        text = mask = None
        if use_text:
            text, mask = fetch_text(train_text, idx, device, trim=not use_compile)
        # Per-step randomness (posterior noise, flips) is drawn for the *global* batch from a
        # generator seeded by (seed, step), and each rank takes its slice: one rank or eight,
        # fresh or resumed, the same step sees the same numbers.
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        noise = torch.randn(args.batch_size, cfg.num_tokens, cfg.token_dim, generator=g)[rank * B:(rank + 1) * B]
        flip = torch.rand(args.batch_size, generator=g)[rank * B:(rank + 1) * B] < 0.5
        if hflip:
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        adversarial = use_gan and step >= args.disc_start
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args)

        # -- tokenizer step --
        with autocast:
            recon, post = model(x, text, mask, lab, noise=noise.to(device))
            loss_lpips = lpips(recon, x).mean() if lpips is not None else torch.zeros((), device=device)
        loss_l2, loss_kl = l2_loss(recon, x), kl_loss(post)
        loss = args.l2_weight * loss_l2 + args.lpips_weight * loss_lpips + args.kl_weight * loss_kl
        loss_g = torch.zeros((), device=device)
        if adversarial:
            raw_disc.requires_grad_(False)  # D is only a critic here: gradients reach the image, not D
            with autocast:
                loss_g = g_loss(disc_fwd(recon), args.gan_loss)
            raw_disc.requires_grad_(True)
            loss = loss + args.gan_weight * loss_g
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        opt.step()
        ema_update(ema_params, model_params, step, args.ema_decay)  # what is evaluated and shared

        # -- discriminator step: real and fake in one batch, so one DDP forward/backward --
        loss_d = loss_lecam = torch.zeros((), device=device)
        if adversarial:
            for group in opt_d.param_groups:
                group["lr"] = lr_at(step, args.disc_lr or args.lr, args)
            with autocast:
                real, fake = disc(torch.cat([x, recon.detach()])).float().chunk(2)
            loss_lecam = lecam(real, fake)
            loss_d = d_loss(real, fake, args.gan_loss)
            opt_d.zero_grad(set_to_none=True)
            (loss_d + args.lecam_weight * loss_lecam).backward()
            torch.nn.utils.clip_grad_norm_(raw_disc.parameters(), args.grad_clip)
            opt_d.step()
            lecam.update(*mean_across_ranks(torch.stack([real.mean(), fake.mean()]).detach()))

        step += 1
        log.add(step, torch.stack([loss.detach(), loss_l2.detach(), loss_lpips.detach(), loss_kl.detach(),
                                   loss_g.detach(), loss_d.detach(), loss_lecam.detach(), grad_norm.detach()]))
        if master:
            bar.update(1)

        # -- held-out evaluation + reconstruction grid, checkpoints --
        if master and (step % args.eval_every == 0 or step == args.steps):
            scores, grid = evaluate()
            grid_path = os.path.join(args.out, f"recon-{step:07d}.png")
            save_grid(grid_path, *grid)
            bar.write(f"step {step}: held-out PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f}"
                      + (f" | with another image's caption {scores['psnr_other']:.2f} dB, with an empty caption "
                         f"{scores['psnr_empty']:.2f} dB" if use_text else "") + f" | grid {grid_path}")
            if "text_attention" in scores:
                bar.write("  attention to the caption per layer: " + ", ".join(
                    f"{part} " + " ".join(f"{100 * a:.0f}%" for a in shares) for part, shares in scores["text_attention"].items()))
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "eval": scores, "grid": grid_path}) + "\n")
        if master:
            save_due(step, args, checkpoint, ckpt_path)
    bar.close()

    if master:
        ema.save_pretrained(os.path.join(args.out, "tokenizer"))
        plot_log(log_path, os.path.join(args.out, "curves.png"))
        print(f"done. checkpoint: {ckpt_path}\n      tokenizer (EMA weights, safetensors): "
              f"{os.path.join(args.out, 'tokenizer')}\n      reconstructions: {os.path.join(args.out, f'recon-{step:07d}.png')}"
              f"\n      log: {log_path}, curves: {os.path.join(args.out, 'curves.png')}")


#################################################################################
#                          Stage 2: the DiT on TexTok tokens                    #
#################################################################################

@torch.no_grad()
def latent_cache(tok, dataset, text, key_parts, cache_dir, device, rank, autocast, batch_size=64):
    """
    The training set encoded once by the tokenizer (posterior means, each image with its own
    caption) into an fp32 .npy of shape (images, N, d), memory-mapped, plus the per-channel mean
    and std of the latents (float64 sums), which the DiT uses to normalise its inputs. Keyed by
    the tokenizer's weights and the dataset; rank 0 computes, the other ranks wait and read.
    """
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    path, stats_path = (os.path.join(cache_dir, f"latents-{key}{s}") for s in (".npy", "-stats.json"))
    if rank == 0 and not os.path.exists(stats_path):  # the stats file is written last: it marks completion
        os.makedirs(cache_dir, exist_ok=True)
        N, d = tok.cfg.num_tokens, tok.cfg.token_dim
        s1, s2 = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)

        def encode_into(tmp):
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(dataset), N, d))
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=2)
            for x, idx, lab in tqdm(loader, desc="encoding latents", unit="batch"):
                t = m = None
                if text is not None:
                    t, m = fetch_text(text, idx, device)
                with autocast:
                    z = tok.encode(x.to(device), t, m, lab.to(device)).float().cpu()  # (b, N, d)
                out[idx.numpy()] = z.numpy()
                s1.add_(z.double().sum((0, 1)))
                s2.add_(z.double().pow(2).sum((0, 1)))
            out.flush()
        atomic_write(path, encode_into, shared=True)
        count = len(dataset) * N
        mean = s1 / count
        std = (s2 / count - mean ** 2).clamp_min(1e-12).sqrt()
        write_json(stats_path, {"mean": mean.tolist(), "std": std.tolist(), "images": len(dataset)})
    if dist.is_initialized():
        dist.barrier()
    with open(stats_path) as f:
        stats = json.load(f)
    return np.load(path, mmap_mode="r"), stats


def train_dit(args, rank, world, device, master, B, use_compile, autocast):
    """--stage dit: a DiT learns the distribution of a trained tokenizer's latent tokens (§3.2)."""
    # ---- the frozen tokenizer, and the data it was trained on ----
    tok_weights = os.path.join(args.tokenizer, "model.safetensors")
    if not os.path.isfile(tok_weights):
        raise MissingFile(f"{tok_weights} not found: train a tokenizer first (python train.py) "
                          f"or pass --tokenizer FOLDER")
    tok = TexTok.from_pretrained(args.tokenizer, device).requires_grad_(False).eval()
    tcfg = tok.cfg
    train_set, val_set, _ = build_data(args, tcfg.image_size, master)
    labels = train_set.labels
    dit_cond = args.dit_cond or ("class" if labels is not None and tcfg.cond == "class" else "text")
    if dit_cond == "class" and labels is None:
        raise UserError("--dit-cond class needs class labels: use class folders or a 'label' per caption line")
    tok_text = tcfg.cond == "text" and tcfg.text_in != "none"  # the tokenizer reads captions
    encoder_name = tcfg.text_encoder or args.text_encoder  # a no-text baseline takes the DiT-T2I's from the flag
    text_len = tcfg.text_len
    train_text = val_text = None
    if tok_text or dit_cond == "text":
        enc_device = device if device.type == "cuda" else "cpu"
        train_text = text_cache(train_set.captions, encoder_name, text_len, args.cache_dir, enc_device, rank)
        val_text = text_cache(val_set.captions + [""], encoder_name, text_len, args.cache_dir, enc_device, rank)
    data_key = [args.data, args.captions, tcfg.image_size, args.seed, len(train_set),
                hashlib.sha256(json.dumps(train_set.captions).encode()).hexdigest()]
    tok_digest = file_digest(tok_weights)  # keys the latent cache; sample.py checks it against the tokenizer it gets
    latents, stats = latent_cache(tok, train_set, train_text if tok_text else None,
                                  [tok_digest, data_key], args.cache_dir, device, rank, autocast)
    mean = torch.tensor(stats["mean"], device=device).float()
    std = torch.tensor(stats["std"], device=device).float()

    # ---- the DiT (+ EMA) ----
    num_classes = max(labels) + 1 if labels is not None else 1
    text_dim = train_text[0].shape[-1] if train_text is not None else 0
    cfg = make_dit_config(args.dit_model, num_tokens=tcfg.num_tokens, token_dim=tcfg.token_dim, cond=dit_cond,
                          num_classes=num_classes, text_dim=text_dim, text_len=text_len)
    raw_model = DiT(cfg).to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    opt = adamw(raw_model, args.lr, args, device)
    meta = dict(latent_mean=stats["mean"], latent_std=stats["std"], tokenizer=os.path.abspath(args.tokenizer),
                tokenizer_config=asdict(tcfg), tokenizer_sha256=tok_digest, text_encoder=encoder_name,
                text_len=text_len, num_classes=num_classes, data=args.data)
    step = 0
    ckpt_path = os.path.join(args.out, "ckpt-latest.pt")
    if args.resume:
        ckpt = load_for_resume(ckpt_path, args, device, master, asdict(cfg))
        raw_model.load_state_dict(ckpt["model"]); ema.load_state_dict(ckpt["ema"]); opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        del ckpt
    if master:
        print(f"DiT config: {json.dumps(asdict(cfg))}")
        print(f"{args.dit_model} ({'DiT-T2I' if dit_cond == 'text' else 'class-conditional'}): "
              f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M params | {len(train_set)} latents of "
              f"{cfg.num_tokens} x {cfg.token_dim} | {world} rank(s) on {device} | global batch {args.batch_size}")
        save_args(args)
    model = torch.compile(raw_model) if use_compile else raw_model
    if dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    diffusion = Diffusion()
    sampler = ShardedSampler(len(train_set), B, rank, world, args.seed)
    spe = sampler.steps_per_epoch
    all_labels = torch.tensor(labels) if labels is not None else None

    def sample_grid(path, rows_shown=6, rows_scored=16, k=4):
        """Rows of held-out conditions: the held-out image, then k samples from the EMA DiT
        (T2I: that image's caption; class: its class, decoded with other held-out captions of it).
        For T2I on built-in captions, also the prompt adherence of the samples of `rows_scored`
        held-out captions (eval_fid.prompt_adherence). Returns the scores logged."""
        rows, images, prompts, g = [], [], [], torch.Generator().manual_seed(args.seed)
        scored = rows_scored if dit_cond == "text" and args.data == "builtin" else rows_shown
        for i in range(min(scored, len(val_set))):
            y = text = mask = dec = dec_mask = None
            if dit_cond == "class":
                y = torch.full((k,), val_set.labels[i], device=device)
                same = [j for j in range(len(val_set)) if val_set.labels[j] == val_set.labels[i]]
                dec_rows = [same[(n * 7) % len(same)] for n in range(k)]  # other unseen captions of the class
            else:
                dec_rows = [i] * k
                text, mask = fetch_text(val_text, dec_rows, device)
            if tok_text:  # T2I decodes with the caption it generated from
                dec, dec_mask = (text, mask) if text is not None else fetch_text(val_text, dec_rows, device)
            x = generate(ema, tok, meta, y, text, mask, dec, dec_mask, args.cfg_scale, args.sample_steps, "ddim",
                         0.0, g, device, autocast)  # (k, 3, H, W)
            if i < rows_shown:
                rows.append(torch.cat([val_set[i][0][None].to(device).float(), x]))
            images.append(to_uint8(x))
            prompts += [val_set.captions[i]] * k
        save_grid(path, rows, ["held-out", "samples ->"])
        if scored == rows_scored:
            return {"adherence": prompt_adherence(np.concatenate(images), prompts)[0]}
        return {}

    def checkpoint(path):
        save_checkpoint({**run_state(step, spe, args, device), "model": raw_model.state_dict(),
                         "ema": ema.state_dict(), "opt": opt.state_dict(), "config": asdict(cfg), "dit_meta": meta}, path)

    # ---- the loop ----
    log_path = os.path.join(args.out, "log.jsonl")
    model.train()
    ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())
    bar = tqdm(total=args.steps, initial=step, disable=not master, desc="train dit", unit="step", dynamic_ncols=True)
    log = IntervalLog(log_path, ["loss", "grad_norm"], args, master, bar, shown=["loss"])
    order = None
    while step < args.steps:
        epoch, pos = divmod(step, spe)
        if pos == 0 or order is None:
            sampler.set_position(epoch, 0)
            order = list(sampler)  # this rank's indices for the epoch
        idx = order[pos * B:(pos + 1) * B]
        x0 = (torch.from_numpy(np.ascontiguousarray(latents[np.asarray(idx)])).to(device) - mean) / std  # (B, N, d)
        # t, eps and the condition dropout are drawn for the global batch from (seed, step), as in
        # the tokenizer stage: one rank or eight, fresh or resumed, a step sees the same numbers.
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        sl = slice(rank * B, (rank + 1) * B)
        t = torch.randint(0, diffusion.T, (args.batch_size,), generator=g)[sl].to(device)
        noise = torch.randn(args.batch_size, cfg.num_tokens, cfg.token_dim, generator=g)[sl].to(device)
        drop = (torch.rand(args.batch_size, generator=g)[sl] < cfg.dropout_prob).to(device)
        cond = {}
        if dit_cond == "class":
            cond["y"] = all_labels[idx].to(device)
        else:
            cond["text"], cond["text_mask"] = fetch_text(train_text, idx, device, trim=not use_compile)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args)
        with autocast:
            loss = diffusion.loss(model, x0, t=t, noise=noise, drop=drop, **cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        opt.step()
        ema_update(ema_params, model_params, step, args.ema_decay)
        step += 1
        log.add(step, torch.stack([loss.detach(), grad_norm.detach()]))
        if master:
            bar.update(1)
        if master and (step % args.eval_every == 0 or step == args.steps):
            grid_path = os.path.join(args.out, f"samples-{step:07d}.png")
            scores = sample_grid(grid_path)
            bar.write(f"step {step}: sample grid {grid_path}" + (f" | prompt adherence {scores['adherence']:.3f} "
                      f"(real images score about 0.99)" if scores else ""))
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "eval": scores, "grid": grid_path}) + "\n")
        if master:
            save_due(step, args, checkpoint, ckpt_path)
    bar.close()
    if master:
        ema.save_pretrained(os.path.join(args.out, "dit"), meta)
        plot_log(log_path, os.path.join(args.out, "curves.png"))
        print(f"done. checkpoint: {ckpt_path}\n      DiT (EMA weights, safetensors): {os.path.join(args.out, 'dit')}"
              f"\n      samples: {os.path.join(args.out, f'samples-{step:07d}.png')}\n      log: {log_path}, curves: "
              f"{os.path.join(args.out, 'curves.png')}"
              f"\n      next: python sample.py --dit {ckpt_path}")


def main(argv=None):
    args = get_args(argv)
    with distributed() as (rank, world, device):
        master = rank == 0
        if args.batch_size % world:
            raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world} ranks")
        B = args.batch_size // world  # this rank's share of the global batch
        torch.manual_seed(args.seed + rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        use_compile = device.type == "cuda" if args.compile is None else args.compile
        autocast = precision_context(device, args.precision)
        run = dict(rank=rank, world=world, device=device, master=master, B=B, use_compile=use_compile, autocast=autocast)
        claim_out(args, master)
        os.makedirs(args.out, exist_ok=True)
        (train_tokenizer if args.stage == "tokenizer" else train_dit)(args, **run)
        if dist.is_initialized():
            dist.barrier()  # every rank leaves once rank 0 has written its files

if __name__ == "__main__":
    run_main(main)
