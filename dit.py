"""
A Diffusion Transformer (DiT, Peebles & Xie 2023) over TexTok's 1D latent tokens, and the
diffusion process it is trained and sampled with. TexTok §3.2 "Generation stage" and §4.1:

    - the DiT generates only the N x d image tokens; the caption is given to the detokenizer;
    - patch size 1: each of the N tokens is one DiT input token (no 2D grid, no patchify);
    - class-conditional: the original DiT (adaLN-Zero on timestep + class embedding);
    - text-to-image ("DiT-T2I", following PixArt-alpha): a cross-attention layer after the
      self-attention of every block attends to the cached caption embeddings.

    DiT             the network: eps_theta(x_t, t, class or caption)
    Diffusion       DDPM forward process, epsilon-prediction loss, DDPM and DDIM samplers,
                    classifier-free guidance
    generate        latent tokens sampled by the DiT, decoded into images by the detokenizer

Shapes: B batch, N latent tokens, d channels per token (TexTok: 8), D width, Lt text tokens,
Dt text-embedding width.
"""
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from files import MissingFile, UserError, atomic_write, load_config, load_weights, saved_kind, write_json


CONDS = ("class", "text")  # the original DiT (a class label), or DiT-T2I (cross-attention to the caption)


@dataclass
class DiTConfig:
    num_tokens: int = 32  # N: TexTok's latent tokens, the DiT's sequence length
    token_dim: int = 8  # d: channels per token
    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    cond: str = "class"  # "class" (DiT) or "text" (DiT-T2I)
    num_classes: int = 1000  # class-conditional: labels 0..num_classes-1; num_classes is the null class
    text_dim: int = 0  # text-to-image: width of the cached caption embeddings (T5-XL: 2048)
    text_len: int = 128  # text-to-image: caption tokens per caption
    dropout_prob: float = 0.1  # label / caption dropout for classifier-free guidance (DiT, PixArt: 0.1)

    def __post_init__(self):
        if self.cond not in CONDS:
            raise UserError(f"cond must be one of {CONDS}, got {self.cond!r}")
        if self.cond == "text" and self.text_dim <= 0:
            raise UserError("a text-to-image DiT (cond='text') needs text_dim, the caption-embedding width")
        if self.width % self.heads:
            raise UserError(f"width {self.width} is not divisible by heads {self.heads}")


# The original DiT sizes (DiT paper Table 1); the patch size is always 1 here (TexTok §4.1).
DiT_models = {
    "DiT-S": dict(depth=12, width=384, heads=6),
    "DiT-B": dict(depth=12, width=768, heads=12),
    "DiT-L": dict(depth=24, width=1024, heads=16),
    "DiT-XL": dict(depth=28, width=1152, heads=16),
    "DiT-T": dict(depth=4, width=128, heads=4),  # ours: a tiny one that trains on a CPU in minutes
}


def make_dit_config(size: str, **overrides) -> DiTConfig:
    if size not in DiT_models:
        raise UserError(f"unknown DiT size {size!r}; choose one of {', '.join(DiT_models)}")
    return DiTConfig(**{**DiT_models[size], **overrides})


#################################################################################
#                Embedding layers for timesteps, classes and captions            #
#################################################################################

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and ADM:
    half the channels are cos(t * f), half sin(t * f), for frequencies f from 1 to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Timestep -> D: a 256-channel sinusoidal code through a 2-layer MLP (DiT's choice)."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> D, with one extra row for the null class that classifier-free guidance
    uses. During training, labels are replaced by the null class where `drop` says (train.py
    draws it with probability DiTConfig.dropout_prob), so the same network also learns the
    unconditional model."""

    def __init__(self, num_classes, width):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, width)

    def forward(self, labels, drop=None):
        # drop: (B,) bool, True where the label is replaced by the null class.
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.table(labels)  # (B, D)


class CaptionEmbedder(nn.Module):
    """Cached caption embeddings (B, Lt, Dt) -> (B, Lt, D) keys/values for cross-attention.
    The null caption of classifier-free guidance is a learned (Lt, Dt) embedding, as in
    PixArt-alpha: a dropped caption is replaced by it, with every position attended to."""

    def __init__(self, text_dim, text_len, width):
        super().__init__()
        self.null = nn.Parameter(torch.randn(text_len, text_dim) / text_dim ** 0.5)
        # Two-layer projection of the text features into the DiT's width (PixArt's caption MLP).
        self.mlp = nn.Sequential(nn.Linear(text_dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, width))

    def forward(self, text, mask, drop=None):
        # text: (B, Lt, Dt); mask: (B, Lt) bool, True at real (non-padding) tokens; drop: (B,) bool.
        if drop is not None:
            Lt = text.shape[1]
            null = self.null[:Lt].to(text.dtype).expand_as(text)  # (B, Lt, Dt)
            text = torch.where(drop[:, None, None], null, text)
            mask = mask | drop[:, None]  # the null caption is attended to everywhere
        return self.mlp(text), mask  # (B, Lt, D), (B, Lt)


#################################################################################
#                                 DiT blocks                                    #
#################################################################################

def modulate(x, shift, scale):
    """adaLN: normalised x, scaled and shifted per sample by the condition."""
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, N, D)


class Attention(nn.Module):
    """Multi-head attention with F.scaled_dot_product_attention; cross-attention when ctx is given."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, ctx=None, mask=None):
        # x: (B, N, D); ctx: (B, L, D) or None (self-attention); mask: (B, L) bool, True = attend.
        B, N, D = x.shape
        ctx = x if ctx is None else ctx
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, H, N, D/H)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, D/H) each
        if mask is not None:
            mask = mask[:, None, None, :]  # (B, 1, 1, L)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class DiTBlock(nn.Module):
    """
    A DiT block with adaLN-Zero conditioning: the condition c (timestep + class) regresses a
    shift, scale and gate for the attention and the MLP branches. The regression is zero-
    initialised, so every gate starts at 0 and a fresh block is the identity (DiT §3.2).
    With cross_attn (DiT-T2I) a cross-attention to the caption sits between self-attention
    and the MLP; its output projection starts at zero for the same reason (as in PixArt).
    """

    def __init__(self, width, heads, mlp_ratio, cross_attn=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.cross_attn = None
        if cross_attn:
            self.norm_x = nn.LayerNorm(width, eps=1e-6)
            self.cross_attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c, ctx=None, ctx_mask=None):
        # x: (B, N, D) tokens; c: (B, D) condition; ctx: (B, Lt, D) caption keys/values or None.
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # (B, D) each
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, N, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_x(x), ctx, ctx_mask)  # (B, N, D)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map back to d channels; zero-initialised, so a fresh DiT
    predicts eps = 0."""

    def __init__(self, width, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, d)


def sincos_1d(length, width):
    """Fixed 1D sin-cos position embedding (DiT uses a fixed 2D one over its patch grid; TexTok's
    tokens form a 1D sequence, so one axis is enough)."""
    return timestep_embedding(torch.arange(length), width, max_period=10000)[None]  # (1, N, D)


class DiT(nn.Module):
    """eps_theta(x_t, t, condition) over N latent tokens of d channels, patch size 1."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.x_embed = nn.Linear(cfg.token_dim, D)  # patch size 1: one token in, one token out
        self.register_buffer("pos", sincos_1d(cfg.num_tokens, D), persistent=False)  # (1, N, D)
        self.t_embed = TimestepEmbedder(D)
        if cfg.cond == "class":
            self.y_embed = LabelEmbedder(cfg.num_classes, D)
        else:
            # The caption reaches the blocks through cross-attention only; c is the timestep
            # alone, as in PixArt-alpha (TexTok §4.1 adds just the cross-attention layer).
            self.text_embed = CaptionEmbedder(cfg.text_dim, cfg.text_len, D)
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.heads, cfg.mlp_ratio, cross_attn=cfg.cond == "text")
                                    for _ in range(cfg.depth))
        # DiT also learns the variance (2d outputs); we predict eps only (d outputs) and sample
        # with fixed variances, which is what the DDIM sampler needs and what the paper's
        # ablations would not distinguish.
        self.final = FinalLayer(D, cfg.token_dim)
        self.grad_checkpoint = False  # train.py --grad-checkpoint: recompute each block in backward
        self.initialize_weights()

    def initialize_weights(self):
        # As DiT: xavier-uniform linears, N(0, 0.02) for embeddings and the timestep MLP, then
        # zero for every adaLN regression and the final layer (adaLN-Zero).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.t_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if self.cfg.cond == "class":
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final.adaLN[-1].weight)
        nn.init.zeros_(self.final.adaLN[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def forward(self, x, t, y=None, text=None, text_mask=None, drop=None):
        """
        x: (B, N, d) noisy tokens x_t; t: (B,) timesteps in [0, 1000);
        y: (B,) class labels (the value num_classes is the null class), or
        text: (B, Lt, Dt) caption embeddings + text_mask: (B, Lt) bool;
        drop: (B,) bool, replace the condition by the null one there (training dropout, and the
        unconditional half of classifier-free guidance). Returns predicted eps, (B, N, d).
        """
        x = self.x_embed(x) + self.pos  # (B, N, D)
        c = self.t_embed(t)  # (B, D)
        ctx = ctx_mask = None
        if self.cfg.cond == "class":
            if y is None:
                raise ValueError("this DiT is class-conditional: pass y= (class labels)")
            c = c + self.y_embed(y, drop)  # (B, D)
        else:
            if text is None:
                raise ValueError("this DiT is text-to-image (DiT-T2I): pass text= and text_mask=")
            if text_mask is None:
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            ctx, ctx_mask = self.text_embed(text, text_mask, drop)  # (B, Lt, D), (B, Lt)
        for block in self.blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # Activation checkpointing: only the block's input is kept; backward reruns its forward.
                x = checkpoint(block, x, c, ctx, ctx_mask, use_reentrant=False)  # (B, N, D)
            else:
                x = block(x, c, ctx, ctx_mask)  # (B, N, D)
        return self.final(x, c)  # (B, N, d)

    # ---- save / load: config.json (+ what the DiT was trained against) + model.safetensors ----

    @staticmethod
    def config_from_dict(raw: dict) -> DiTConfig:
        known = {f.name for f in fields(DiTConfig)}
        return DiTConfig(**{k: v for k, v in raw.items() if k in known})

    def save_pretrained(self, folder: str, meta: dict):
        """meta: plain data the DiT cannot be used without (latent mean/std, the tokenizer)."""
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(folder, "model.safetensors"), lambda tmp: save_file(state, tmp))  # never half-written
        write_json(os.path.join(folder, "config.json"), {"config": asdict(self.cfg), "meta": meta})

    @classmethod
    def from_pretrained(cls, folder: str, device="cpu"):
        """-> (DiT in eval mode, meta)."""
        cfg_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
        for path in (cfg_path, weights):
            if not os.path.isfile(path):
                raise MissingFile(f"{path} not found: point at a folder written by DiT.save_pretrained() "
                                  f"(train.py --stage dit writes <out>/dit/)")
        if saved_kind(cfg_path) == "tokenizer":
            raise UserError(f"{folder} is a tokenizer, not a DiT; pass a DiT's folder (train.py --stage dit writes "
                            f"<out>/dit/) or its checkpoint")
        model = cls(load_config(DiTConfig, cfg_path, part="config"))
        with open(cfg_path) as f:
            meta = json.load(f).get("meta")  # valid JSON: load_config has read it
        if not isinstance(meta, dict):
            raise UserError(f"{cfg_path} has no 'meta' (the latent statistics and the tokenizer this DiT was "
                            f"trained against); restore the config.json saved with these weights")
        load_weights(model, weights, cfg_path, device)  # a config edited to another shape: one line
        return model.to(device).eval(), meta


#################################################################################
#                          The diffusion process (DDPM)                         #
#################################################################################

class Diffusion:
    """
    DDPM (Ho et al. 2020) as DiT trains it, in plain tensors:

      forward process  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  eps ~ N(0, I)
      schedule         beta_t linear from 1e-4 to 0.02 over T = 1000 steps (DDPM's, kept by
                       ADM and DiT), abar_t = prod_{s<=t} (1 - beta_s)
      training         predict eps: loss = || eps - eps_theta(x_t, t) ||^2, t uniform in [0, T)

    Both samplers walk down a subsequence of `steps` of the T timesteps (evenly spaced, as
    DiT's and ADM's respacing does), so 50-250 steps work without retraining (TexTok Fig. 4).
    """

    def __init__(self, T=1000, beta_start=1e-4, beta_end=0.02):
        self.T = T
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.abar = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64: the only table we need

    def q_sample(self, x0, t, noise):
        """x_t given x_0 (B, N, d), integer t (B,) and eps (B, N, d)."""
        # The table moves to the device once: copied from pageable memory every step, it would make the
        # host wait for the GPU to finish its queued work each time.
        if self.abar.device != x0.device:
            self.abar = self.abar.to(x0.device)
        abar = self.abar[t].float()[:, None, None]  # (B, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def loss(self, model, x0, t=None, noise=None, **cond):
        """The epsilon-prediction loss for one batch of clean tokens x0 (B, N, d). t (B,) and eps
        (B, N, d) are drawn here unless given (train.py draws them per global batch, for DDP and
        exact resume). `cond` goes to the model (y= or text=/text_mask=, drop=)."""
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.T, (B,), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        eps = model(self.q_sample(x0, t, noise), t, **cond)  # (B, N, d)
        return F.mse_loss(eps.float(), noise.float())

    def timesteps(self, steps):
        """`steps` timesteps from T-1 down to 0, evenly spaced (the respaced schedule)."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"sampling steps must be in 1..{self.T}, got {steps}")
        return torch.linspace(self.T - 1, 0, steps).round().long()

    @torch.no_grad()
    def sample(self, eps_fn, shape, steps=250, sampler="ddim", eta=0.0, generator=None, device="cpu"):
        """
        Draws x_0 of `shape` (B, N, d) from noise. eps_fn(x_t, t) -> eps (guidance included).

        Each step goes from timestep t to the previous kept timestep s < t (abar_s = 1 at the end).
        With x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), the prediction of x_0:
          ddim:  x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z,
                 sigma^2 = eta^2 (1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s)  (Song et al. 2021, eq. 16)
                 eta = 0 is deterministic; eta = 1 is DDPM's posterior variance.
          ddpm:  x_s = mean of q(x_s | x_t, x0_hat) + sigma z with the posterior variance
                 beta~ = (1 - abar_s)/(1 - abar_t) beta_ts, beta_ts = 1 - abar_t/abar_s
                 (Ho et al. eq. 7, on the respaced chain). Equal in law to ddim with eta = 1.
        x0_hat is not clipped: latent tokens are unbounded (unlike pixels).
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        abar = self.abar.to(device)
        x = torch.randn(shape, generator=generator).to(device)
        ts = self.timesteps(steps).tolist()
        for i in range(len(ts)):
            t = ts[i]
            a_t = abar[t]
            a_s = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=abar.dtype, device=device)
            eps = eps_fn(x, torch.full((shape[0],), t, device=device, dtype=torch.long)).double()
            xd = x.double()
            x0 = (xd - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # predicted x_0
            beta_ts = 1 - a_t / a_s  # the respaced step's beta
            if sampler == "ddim":
                var = eta ** 2 * (1 - a_s) / (1 - a_t) * beta_ts
                x_prev = a_s.sqrt() * x0 + (1 - a_s - var).clamp_min(0).sqrt() * eps
            else:
                var = (1 - a_s) / (1 - a_t) * beta_ts
                # Posterior mean: coefficients of x0_hat and x_t in q(x_s | x_t, x_0).
                x_prev = (a_s.sqrt() * beta_ts / (1 - a_t)) * x0 + ((1 - beta_ts).sqrt() * (1 - a_s) / (1 - a_t)) * xd
            if i + 1 < len(ts):  # no noise on the last step
                z = torch.randn(shape, generator=generator).to(device)
                x_prev = x_prev + var.sqrt() * z.double()
            x = x_prev.float()
        return x


def guided(model, scale, **cond):
    """
    eps_fn(x_t, t) for Diffusion.sample with classifier-free guidance (Ho & Salimans 2022):
    eps = eps_uncond + scale * (eps_cond - eps_uncond), applied to the whole prediction (the
    original DiT applies it to 3 of its 4 latent channels only, by its own account a quirk).
    The conditional and unconditional halves go through the network as one batch.
    scale = 1 is the conditional model alone, and skips the unconditional half.
    """
    def eps_fn(x, t):
        if scale == 1.0:
            return model(x, t, **cond)
        B = x.shape[0]
        both = {k: torch.cat([v, v]) for k, v in cond.items() if v is not None}
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), drop=drop, **both).chunk(2)
        return eps_u + scale * (eps_c - eps_u)
    return eps_fn


@torch.no_grad()
def generate(dit, tok, meta, labels=None, text=None, text_mask=None, dec_text=None, dec_mask=None,
             cfg_scale=4.0, steps=50, sampler="ddim", eta=0.0, generator=None, device="cpu", autocast=None):
    """
    The whole generation stage (TexTok §3.2): images (B, 3, H, W) in [-1, 1]. The DiT samples
    normalised tokens conditioned on `labels` (B,) or on caption embeddings `text` (B, Lt, Dt) +
    `text_mask`, with guidance `cfg_scale`; they are un-normalised with the latent statistics
    the DiT was trained with (`meta`, saved beside it) and decoded by the tokenizer `tok` with
    the caption `dec_text`/`dec_mask` (None for a tokenizer without text). train.py's sample
    grids and sample.py both generate through here.
    """
    autocast = autocast or nullcontext()
    B = labels.shape[0] if labels is not None else text.shape[0]
    cond = dict(y=labels) if dit.cfg.cond == "class" else dict(text=text, text_mask=text_mask)

    def model(x, t, **kw):
        with autocast:
            return dit(x, t, **kw).float()

    z = Diffusion().sample(guided(model, cfg_scale, **cond), (B, dit.cfg.num_tokens, dit.cfg.token_dim),
                           steps=steps, sampler=sampler, eta=eta, generator=generator, device=device)
    mean = torch.as_tensor(meta["latent_mean"], device=device).float()
    std = torch.as_tensor(meta["latent_std"], device=device).float()
    z = z * std + mean  # (B, N, d): back to the tokenizer's scale
    with autocast:
        return tok.decode(z, dec_text, dec_mask).float().clamp(-1, 1)
