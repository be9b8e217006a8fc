"""What dit.py promises: the DiT sizes, adaLN-Zero, classifier-free guidance, samplers that are
deterministic and agree with each other, and a tiny DiT that learns a toy token distribution."""
import pytest
import torch

from dit import DiT, DiTConfig, Diffusion, guided, make_dit_config


def randomize(model, seed=0):
    """Random weights everywhere (a fresh DiT outputs exactly zero, which would make the
    guidance tests pass for the wrong reason)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("size,paper_m", [("DiT-S", 33), ("DiT-B", 130), ("DiT-L", 458), ("DiT-XL", 675)])
def test_original_dit_sizes(size, paper_m):
    # DiT paper Table 1 (33M/130M/458M/675M), here with patch size 1 over 256 tokens of d = 8.
    with torch.device("meta"):
        model = DiT(make_dit_config(size, num_tokens=256, token_dim=8))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - paper_m) / paper_m < 0.02, n


def test_shapes_for_both_conditionings():
    x, t = torch.randn(3, 16, 8), torch.tensor([0, 500, 999])
    dit = randomize(DiT(DiTConfig(num_tokens=16, width=64, depth=2, heads=4, num_classes=5)))
    assert dit(x, t, y=torch.tensor([0, 4, 5])).shape == (3, 16, 8)  # 5 = the null class
    t2i = randomize(DiT(DiTConfig(num_tokens=16, width=64, depth=2, heads=4, cond="text", text_dim=24, text_len=7)))
    text, mask = torch.randn(3, 7, 24), torch.ones(3, 7, dtype=torch.bool)
    out = t2i(x, t, text=text, text_mask=mask)
    assert out.shape == (3, 16, 8)
    # The caption matters, and padded caption positions do not.
    assert not torch.allclose(out, t2i(x, t, text=torch.randn(3, 7, 24), text_mask=mask))
    mask[:, 4:] = False
    a = t2i(x, t, text=text, text_mask=mask)
    text2 = text.clone()
    text2[:, 4:] = 100.0
    torch.testing.assert_close(a, t2i(x, t, text=text2, text_mask=mask))


@pytest.mark.parametrize("cross", [False, True])
def test_adaln_zero_makes_a_fresh_block_the_identity(cross):
    dit = DiT(DiTConfig(num_tokens=8, width=64, depth=1, heads=4, cond="text" if cross else "class",
                        text_dim=16, text_len=5))
    block = dit.blocks[0]
    x, c, ctx = torch.randn(2, 8, 64), torch.randn(2, 64), torch.randn(2, 5, 64)
    torch.testing.assert_close(block(x, c, ctx if cross else None), x, rtol=0, atol=0)
    # ... and the whole fresh DiT predicts eps = 0; once trained (random weights) it does not.
    kw = dict(text=torch.randn(2, 5, 16)) if cross else dict(y=torch.tensor([0, 1]))
    assert dit(torch.randn(2, 8, 8), torch.tensor([3, 7]), **kw).abs().max() == 0
    randomize(dit)
    assert not torch.allclose(dit.blocks[0](x, c, ctx if cross else None), x)


def test_guidance_scale_one_is_the_conditional_model_and_others_extrapolate():
    dit = randomize(DiT(DiTConfig(num_tokens=8, width=64, depth=2, heads=4, num_classes=3))).eval()
    x, t, y = torch.randn(4, 8, 8), torch.tensor([10, 200, 600, 990]), torch.tensor([0, 1, 2, 1])
    cond = dit(x, t, y=y)
    torch.testing.assert_close(guided(dit, 1.0, y=y)(x, t), cond)
    uncond = dit(x, t, y=torch.full_like(y, 3))  # the null class
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided(dit, 4.0, y=y)(x, t), uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


def gaussian_eps(mu, s):
    """The exact eps prediction for data x0 ~ N(mu, s^2) per coordinate:
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""
    abar_table = Diffusion().abar

    def eps(x, t):
        a = abar_table[t].float()[:, None, None]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
    return eps


def test_samplers_are_deterministic_given_a_seed():
    d, eps = Diffusion(), gaussian_eps(0.5, 0.3)
    for sampler, eta in (("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)):
        a = d.sample(eps, (4, 3, 2), steps=20, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(7))
        b = d.sample(eps, (4, 3, 2), steps=20, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(7))
        c = d.sample(eps, (4, 3, 2), steps=20, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(8))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c)


def test_ddim_eta_one_with_all_steps_matches_ddpm_and_the_data():
    # With the exact eps of a Gaussian, every sampler must land on N(mu, s^2); DDIM with eta = 1
    # and all 1000 steps is the DDPM chain, so the two agree to sampling error (8,000 numbers).
    mu, s, d = 0.7, 0.4, Diffusion()
    eps = gaussian_eps(mu, s)
    ddpm = d.sample(eps, (2000, 2, 2), steps=1000, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    ddim1 = d.sample(eps, (2000, 2, 2), steps=1000, sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(1))
    # Deterministic DDIM at 250 steps too (at 50 its discretisation error shrinks the spread ~6%).
    ddim0 = d.sample(eps, (2000, 2, 2), steps=250, sampler="ddim", eta=0.0, generator=torch.Generator().manual_seed(2))
    for x in (ddpm, ddim1, ddim0):
        assert x.mean().item() == pytest.approx(mu, abs=0.02)
        assert x.std().item() == pytest.approx(s, rel=0.04)
    assert ddpm.mean().item() == pytest.approx(ddim1.mean().item(), abs=0.02)
    assert ddpm.std().item() == pytest.approx(ddim1.std().item(), rel=0.04)


def test_sampling_steps_are_checked():
    with pytest.raises(ValueError, match="sampling steps"):
        Diffusion().sample(gaussian_eps(0, 1), (1, 1, 1), steps=0)


def test_a_tiny_dit_learns_a_toy_token_distribution():
    # Two classes of 4 tokens x 2 channels: class 0 ~ N(+1, 0.5^2), class 1 ~ N(-1, 0.5^2).
    # 400 CPU steps; the sampled means and spreads must match the data per class.
    torch.manual_seed(0)
    dit, diff = DiT(DiTConfig(num_tokens=4, token_dim=2, width=64, depth=2, heads=4, num_classes=2)), Diffusion()
    opt = torch.optim.AdamW(dit.parameters(), lr=2e-3, weight_decay=0)
    means, std, g = torch.tensor([1.0, -1.0]), 0.5, torch.Generator().manual_seed(0)
    for _ in range(400):
        y = torch.randint(0, 2, (256,), generator=g)
        x0 = means[y][:, None, None] + std * torch.randn(256, 4, 2, generator=g)
        loss = diff.loss(dit, x0, y=y, drop=torch.rand(256, generator=g) < 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dit.eval()
    for c in (0, 1):
        x = diff.sample(guided(dit, 1.0, y=torch.full((1000,), c)), (1000, 4, 2), steps=50,
                        generator=torch.Generator().manual_seed(1))
        assert x.mean().item() == pytest.approx(means[c].item(), abs=0.15)
        assert x.std().item() == pytest.approx(std, rel=0.2)


def test_a_damaged_or_edited_dit_folder_is_one_line_naming_the_file(tmp_path):
    import json
    from files import UserError
    folder = tmp_path / "dit"
    DiT(DiTConfig(num_tokens=16, width=64, depth=2, heads=4, num_classes=5)).save_pretrained(str(folder), {"x": 1})
    config = folder / "config.json"
    good = json.loads(config.read_text())
    assert DiT.from_pretrained(str(folder))[1] == {"x": 1}
    config.write_text("{")
    with pytest.raises(UserError, match=f"{config} is not valid JSON"):
        DiT.from_pretrained(str(folder))
    config.write_text(json.dumps({**good, "config": {**good["config"], "depth": 3}}))
    with pytest.raises(UserError, match=r"blocks\.2\..*the model of .*config\.json needs"):
        DiT.from_pretrained(str(folder))
    config.write_text(json.dumps({"config": good["config"]}))
    with pytest.raises(UserError, match="has no 'meta'"):
        DiT.from_pretrained(str(folder))
