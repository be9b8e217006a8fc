"""What the memory flags promise (docs/scale.md): --grad-accum K takes the step one batch of the same
global size takes, in one process and on two gloo ranks; --grad-checkpoint gives the same gradients
from fewer saved activations; --memory-check changes nothing it checks; the discriminator's minibatch
statistic never mixes real and fake images, whatever the batch size."""
import pytest
import torch

import train
from conftest import assert_same_gradients, first_gradients, train_losses
from dit import DiT, make_dit_config
from textok import Discriminator, TexTok, make_config

# 16 px shapes, a 2+2-layer TexTok, LPIPS and the GAN from step 0: the first step runs every loss and both
# optimizers. Global batch 16: 8 real and 8 fake images per rank on two ranks, 4 per micro-batch at K = 2,
# so the discriminator's minibatch-std groups of 4 are the same images in every layout compared.
TINY = ["--image-size", "16", "--patch-size", "4", "--num-tokens", "8", "--text-len", "32", "--num-images", "64",
        "--val-images", "8", "--batch-size", "16", "--num-workers", "0", "--lpips-weight", "0.1", "--disc-start", "0",
        "--disc-channel-base", "128", "--disc-channel-max", "16", "--warmup-steps", "2", "--log-every", "1",
        "--steps", "1"]

def test_k_micro_batches_take_the_step_of_one_batch_in_one_process(tmp_path):
    cache = tmp_path / "cache"
    one, losses_one = first_gradients(tmp_path / "one", cache, *TINY)
    four, losses_four = first_gradients(tmp_path / "four", cache, *TINY, "--grad-accum", "4")
    assert len(one) == 2  # TexTok's step and the discriminator's
    assert_same_gradients(one, four)
    for k in ("l2", "lpips", "kl", "g_adv", "d", "lecam"):  # the logged terms are the global batch's means too
        assert losses_one[0][k] == pytest.approx(losses_four[0][k], rel=1e-5, abs=1e-7), k


def test_two_ranks_accumulating_take_the_step_of_one_process(tmp_path):
    # With --grad-accum 2 each gloo rank adds its two micro-batches locally (no_sync) and all-reduces once;
    # tests/test_train.py checks two ranks without accumulation the same way.
    cache = tmp_path / "cache"
    one, losses_one = first_gradients(tmp_path / "one", cache, *TINY)
    accum, losses_accum = first_gradients(tmp_path / "accum", cache, *TINY, "--grad-accum", "2", ranks=2,
                                          port=29535)
    assert_same_gradients(one, accum)
    for k in ("l2", "d"):  # the logged losses, averaged across ranks, are the single process's
        assert losses_one[0][k] == pytest.approx(losses_accum[0][k], rel=1e-5, abs=1e-7), k


def test_the_dit_stage_accumulates_to_the_step_of_one_batch(tmp_path):
    cache = tmp_path / "cache"
    train.main([*TINY[:-2], "--steps", "1", "--out", str(tmp_path / "tok"), "--cache-dir", str(cache)])
    dit = ["--stage", "dit", "--tokenizer", str(tmp_path / "tok" / "tokenizer"), "--num-images", "64",
           "--val-images", "8", "--batch-size", "16", "--steps", "1", "--sample-steps", "2", "--warmup-steps", "2"]
    one, _ = first_gradients(tmp_path / "one", cache, *dit)
    two, _ = first_gradients(tmp_path / "two", cache, *dit, "--grad-accum", "2")
    assert_same_gradients(one, two)


def test_a_batch_the_micro_batches_do_not_divide_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        train.get_args(["--batch-size", "32", "--grad-accum", "3"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--batch-size 32 is not a multiple of --grad-accum 3" in err


def test_the_memory_check_changes_nothing_a_run_computes(tmp_path):
    # The throwaway step allocates the discriminator's AdamW moments and runs both steps on zeros before
    # step 0: the weights, the moments and the logged losses must be those of a run without it.
    cache = tmp_path / "cache"
    flags = [*TINY[:-6], "--disc-start", "1", "--steps", "2", "--eval-every", "1000", "--cache-dir", str(cache)]
    train.main([*flags, "--out", str(tmp_path / "plain")])
    train.main([*flags, "--out", str(tmp_path / "checked"), "--memory-check"])
    a, b = (torch.load(tmp_path / name / "ckpt-latest.pt", weights_only=True) for name in ("plain", "checked"))
    for part in ("model", "ema", "disc", "lecam"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    for part in ("opt", "opt_d"):
        for i, state in a[part]["state"].items():
            for k, v in state.items():
                assert torch.equal(v, b[part]["state"][i][k]), f"{part}.{i}.{k}"
    speedless = lambda name: [{k: v for k, v in r.items() if k != "img_per_s"} for r in train_losses(tmp_path / name)]
    assert speedless("plain") == speedless("checked")


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while fn() runs its forward (-> fn's output)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.parametrize("net", ["textok", "dit"])
def test_checkpointed_blocks_give_the_same_gradients_from_fewer_saved_activations(net):
    torch.manual_seed(0)
    if net == "textok":
        model = TexTok(make_config("TexTok-T", image_size=16, patch_size=4, num_tokens=8, text_dim=12, text_len=6))
        x, text, mask = torch.randn(3, 3, 16, 16), torch.randn(3, 6, 12), torch.rand(3, 6) > 0.3
        mask[:, 0] = True
        noise = torch.randn(3, 8, model.cfg.token_dim)
        run = lambda: (model(x, text, mask, noise=noise)[0] - x).pow(2).mean()
        vits = [model.encoder, model.decoder]
    else:
        model = DiT(make_dit_config("DiT-T", num_tokens=8, token_dim=4, cond="text", text_dim=12, text_len=6))
        for p in model.parameters():  # past adaLN-Zero's zeros, so every block's gradient is non-zero
            torch.nn.init.normal_(p, std=0.05)
        x, t, text = torch.randn(3, 8, 4), torch.tensor([3, 500, 999]), torch.randn(3, 6, 12)
        run = lambda: model(x, t, text=text, text_mask=torch.ones(3, 6, dtype=torch.bool)).pow(2).mean()
        vits = [model]
    grads, saved = [], []
    for on in (False, True):
        for vit in vits:
            vit.grad_checkpoint = on
        model.zero_grad(set_to_none=True)
        loss, nbytes = saved_bytes(run)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])  # None for the null caption: no drop here
        saved.append(nbytes)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert saved[1] < 0.5 * saved[0], saved  # the blocks' inner activations are no longer kept


@pytest.mark.parametrize("b", [1, 2, 5, 6, 10, 16])
def test_minibatch_std_groups_never_mix_real_and_fake_images(b):
    # train.py shows D cat([real, fake]) (parts=2): changing the fakes must not move a real image's logit,
    # and the fakes get the logits the critic gives them alone (the tokenizer's adversarial term).
    torch.manual_seed(0)
    disc = Discriminator(16, channel_base=128, channel_max=16)
    real, fake = torch.randn(b, 3, 16, 16), torch.randn(b, 3, 16, 16)
    logits = disc(torch.cat([real, fake]), parts=2)  # (2b,)
    other = disc(torch.cat([real, 3 * fake + 1]), parts=2)
    torch.testing.assert_close(logits[:b], other[:b], rtol=0, atol=0)
    torch.testing.assert_close(logits[b:], disc(fake), rtol=1e-5, atol=1e-6)
    assert not torch.equal(logits[b:], other[b:])  # the fakes' own logits do change


def test_the_memory_benchmark_counts_what_backward_keeps():
    # Linear(D, H) -> GELU -> Linear(H, D) under bf16 autocast keeps, per image, the bf16 copy of the input
    # (D values), the GELU's input (H) and the second Linear's input (H), 2 bytes each; not the weights.
    import bench
    D, H = 24, 40
    with bench.fake_tensors():
        net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.GELU(), torch.nn.Linear(H, D))
        assert bench.per_image(lambda b: net(torch.randn(b, D)), net.parameters(), B=3) == 2 * (D + 2 * H)
        # ... and --grad-checkpoint's saving is seen: a checkpointed TexTok keeps a fraction of the plain one's.
        tok = TexTok(make_config("TexTok-T", image_size=16, patch_size=4, num_tokens=8, text_dim=12, text_len=6))

        def forward(b, checkpointed):
            tok.encoder.grad_checkpoint = tok.decoder.grad_checkpoint = checkpointed
            tok(torch.randn(b, 3, 16, 16), torch.randn(b, 6, 12))
        plain, checkpointed = (bench.per_image(lambda b: forward(b, c), tok.parameters()) for c in (False, True))
    assert 0 < checkpointed < plain / 3
