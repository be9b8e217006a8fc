"""bench.py's analytic FLOP counts (the numerator of MFU) against torch's FLOP counter, within 2%,
on small configs of every model the benchmark times; and one tiny CPU run of the benchmark."""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from dit import DiT, DiTConfig
from textok import LPIPS, Discriminator, TexTok, make_config


def counted(fn, *args, **kwargs):
    # The math attention backend, so attention's matmuls are counted (the counter has no
    # formula for the fused CPU kernel). Halved: the counter counts 2 FLOPs per multiply-add
    # as we do, but over the batch of 2 used here.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn(*args, **kwargs)
    return fc.get_total_flops() / 2


@pytest.mark.parametrize("cond", ["class", "text"])
def test_dit_flops(cond):
    cfg = DiTConfig(num_tokens=16, width=64, depth=2, heads=4, cond=cond, text_dim=24, text_len=7)
    model = DiT(cfg)
    kw = dict(y=torch.tensor([0, 1])) if cond == "class" else dict(text=torch.randn(2, 7, 24))
    assert bench.dit_flops(cfg) == pytest.approx(counted(model, torch.randn(2, 16, 8), torch.tensor([1, 2]), **kw), rel=0.02)


@pytest.mark.parametrize("mode,text_in", [("in-context", "both"), ("in-context", "none"), ("in-context", "tokenizer"),
                                          ("cross-attn", "both"), ("cross-attn", "detokenizer")])
def test_textok_flops(mode, text_in):
    cfg = make_config("TexTok-T", image_size=16, patch_size=4, num_tokens=8, text_dim=24, text_len=7,
                      text_mode=mode, text_in=text_in)
    model = TexTok(cfg)
    got = counted(model, torch.randn(2, 3, 16, 16), torch.randn(2, 7, 24), sample=False)
    assert bench.textok_flops(cfg, 7) == pytest.approx(got, rel=0.02)


def test_conv_flops_of_discriminator_and_lpips():
    x = torch.randn(2, 3, 32, 32)
    for model in (Discriminator(32, 1024, 128), bench._VGG(LPIPS())):
        assert bench.conv_linear_flops(model, x) == pytest.approx(counted(model, x), rel=0.02)


def test_sd_vae_decoder_has_the_released_shape():
    # The grid baseline's decoder: Stable Diffusion's KL-f8 decoder has 49,490,199 parameters
    # (post-quant conv included) and turns a 32x32x4 latent into a 256x256 image.
    dec = bench.SDVAEDecoder()
    assert sum(p.numel() for p in dec.parameters()) == 49_490_199
    assert dec(torch.randn(1, 4, 3, 5)).shape == (1, 3, 24, 40)
    x = torch.randn(2, 4, 4, 4)
    assert bench.conv_linear_flops(dec, x) == pytest.approx(counted(dec, x), rel=0.02)


def test_tiny_benchmark_reports_every_rate_and_writes_them(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(["--image-size", "16", "--num-tokens", "8", "--dit-tokens", "8", "16", "--batch-size", "2",
                      "--sample-steps", "2", "--warmup", "1", "--iters", "1", "--text-len", "16", "--json", str(out)])
    assert [r["bench"] for r in res] == ["tokenizer train step", "dit", "dit", "generation", "text conditioning cost"]
    tok, dits, gen, text = res[0], res[1:3], res[3], res[4]
    # Each benchmark's rates are there and positive; a CPU has no peak FLOP/s, so no MFU is claimed.
    assert tok["img_per_s"] > 0 and tok["tflops_per_s"] > 0 and tok["mfu"] is None
    assert sum(tok["share_of_flops"].values()) == pytest.approx(1.0)
    assert [d["tokens"] for d in dits] == [8, 16]
    for d in dits:
        assert d["train_img_per_s"] > 0 and d["sample_img_steps_per_s"] > 0 and d["train_mfu"] is d["sample_mfu"] is None
    assert dits[1]["gflops_per_forward"] > dits[0]["gflops_per_forward"]  # twice the tokens, more work
    # Generation: a 16 px image is a 1x1 grid of SD-VAE latents (8x down, patch 2); the grid side's
    # time includes its decoder's, and the speedup is the ratio of the two times per image.
    assert gen["grid_tokens"] == 1 and gen["s_per_img_2d_grid"] > gen["s_decode_2d_grid"] > 0
    assert gen["speedup"] == pytest.approx(gen["s_per_img_2d_grid"] / gen["s_per_img_textok"])
    assert text["s_per_img_cached"] > 0 and text["s_per_img_uncached"] > 0
    # --json holds exactly the printed results, with the device they were measured on.
    saved = json.loads(out.read_text())
    assert saved["results"] == res and saved["device"].startswith("CPU")
