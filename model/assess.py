"""The quality work after training, one function for train.py's end of training and generate.py's
--fit-gmm and --evaluate (the mechanisms are model/quality.py's).

    figures, written = assess(model, weights, seed=0, batch_size=128, to_input=step.to_input,
                              train=train_batches, attributes=(names, table), real=val_images,
                              fid_reals=reals, pictures=out_dir, start=preview[:1])

With `train`, batches of (images, keys) of the training split: the ex-post GMM of their posterior means
beside the weights, and with `attributes` the attribute vectors beside it too. With `real`, uint8
validation images on the CPU: the SWD of prior samples, GMM samples (the GMM just fitted, or the one
beside the weights when there is one) and reconstructions against them, active units by covariance and
by KL. With `fid_reals` (model/fid.py's Reals: the network, the first N validation images and their
features), FID and KID of N prior samples, N GMM samples and the reconstructions of those N images
against them. With `pictures`, a folder: the GMM's 64 faces (generated_samples_gmm.png) and, from the
face `start`, attributes.png.
"""

import contextlib
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid

from model import fid, figures, quality


def first_images(batches, n: int, keys: bool = False):
    """The first `n` images of `batches` (or all, when fewer), uint8 on the CPU; with `keys`, batches are
    (images, keys) and (images, keys) comes back."""
    real, names = [], []
    for batch in batches:
        images, batch_keys = batch if keys else (batch, ())
        real.append(images.cpu().contiguous())
        names += batch_keys
        if sum(map(len, real)) >= n:
            break
    return (torch.cat(real)[:n], names[:n]) if keys else torch.cat(real)[:n]


@torch.no_grad()
def assess(model, weights: Path, *, seed: int, batch_size: int, to_input, autocast=contextlib.nullcontext,
           train=None, attributes=None, real=None, fid_reals: fid.Reals | None = None,
           pictures: Path | None = None, start=None) -> tuple[dict, list[Path]]:
    """The figures (metrics.jsonl fields) and the files written, as the module docstring says."""
    device = next(model.parameters()).device
    record, written, gmm = {}, [], None
    gmm_path = quality.weights_sibling(weights, quality.GMM_SUFFIX)

    def decode(z):
        with autocast():
            return torch.cat([model.decode(c.to(device)).float().cpu() for c in z.split(batch_size)])

    if train is not None:
        train_mu, _, train_keys = quality.encode_batches(model, train, to_input, autocast, keys=True)
        written.append(quality.save_tensors(gmm_path, quality.fit_gmm(train_mu, seed=seed)))
    if gmm_path.is_file() and (train is not None or real is not None):
        gmm = quality.load_gmm(gmm_path)
    if train is not None:
        record.update(gmm_components=len(gmm["weights"]), gmm_codes=gmm["codes"], gmm_converged=gmm["converged"])
        if pictures is not None:
            grid_z = quality.draw_latents(64, model.z_dim, torch.Generator().manual_seed(seed), gmm=gmm)
            written.append(pictures / quality.GMM_SAMPLES)
            figures.save_png(make_grid(decode(grid_z), nrow=8), written[-1])

    def generated(images, mu=None) -> dict:
        """uint8 prior samples, GMM samples (with a GMM) and reconstructions, as many as `images`: the same
        latents for the same seed and count."""
        n = len(images)
        if mu is None:
            mu = quality.encode_batches(model, images.split(batch_size), to_input, autocast)[0]
        z = {"prior": quality.draw_latents(n, model.z_dim, torch.Generator().manual_seed(seed))}
        if gmm is not None:
            z["gmm"] = quality.draw_latents(n, model.z_dim, torch.Generator().manual_seed(seed), gmm=gmm)
        z["reconstructions"] = mu
        return {k: quality.to_uint8(decode(v)) for k, v in z.items()}

    if real is not None:
        n = len(real)
        mu, logvar = quality.encode_batches(model, real.split(batch_size), to_input, autocast)
        fakes = generated(real, mu)
        distances = quality.swd(real, fakes, seed=seed)
        record.update({**{f"swd_{k}": sum(v) / len(v) for k, v in distances.items()},
                       "swd_levels": distances, "swd_images": n, "swd_real": "val", "swd_seed": seed,
                       "swd_patches": quality.SWD_PATCHES_PER_IMAGE,
                       "val_active_units_cov": quality.active_units(mu),
                       "val_active_dims_kl": quality.active_dims_kl(mu, logvar), "active_images": n})
        if fid_reals is not None:
            clock = time.perf_counter()
            # The SWD's sets when FID takes the same images; else as many of each as FID's real images.
            same = len(fid_reals.images) == n and torch.equal(fid_reals.images, real)
            record.update(fid_kid(fid_reals, fakes if same else generated(fid_reals.images), seed))
            record["fid_seconds"] = time.perf_counter() - clock
    if train is not None and attributes is not None:
        names, table = attributes
        rows = [i for i, key in enumerate(train_keys) if key in table]
        values = torch.tensor([table[train_keys[i]] for i in rows], dtype=torch.int8).view(len(rows), len(names))
        vectors = quality.attribute_vectors(train_mu[rows], values, names)
        vectors_path = quality.save_tensors(quality.weights_sibling(weights, quality.ATTRIBUTES_SUFFIX), vectors)
        if pictures is not None and len(vectors["names"]):
            z = quality.encode_batches(model, [start], to_input, autocast)[0].to(device)
            with autocast():
                walks = [quality.attribute_walk(model, z, v.to(device)) for v in vectors["vectors"]]
            written.append(pictures / quality.ATTRIBUTE_GRID)
            figures.save_png(make_grid(torch.cat(walks).flatten(0, 1).float(), nrow=quality.ATTRIBUTE_STEPS),
                             written[-1])
        written.append(vectors_path)
        record["attribute_names"] = vectors["names"]
    model.train()
    return record, written


def fid_kid(reals: fid.Reals, fakes: dict[str, torch.Tensor], seed: int) -> dict:
    """fid_{set}, kid_{set} and kid_std_{set} of each uint8 set in `fakes` against `reals` (model/fid.py's
    scores), with fid_images, the images of each set, and fid_real_images, the real ones."""
    device = next(reals.network.parameters()).device
    real = reals.features.to(device)  # KID runs on the features' device (model/fid.py)
    out = {}
    for name, images in fakes.items():
        scores = fid.scores(real, fid.features(reals.network, images, progress=True), reals.stats, seed=seed)
        out.update({f"fid_{name}": scores["fid"], f"kid_{name}": scores["kid"], f"kid_std_{name}": scores["kid_std"]})
        out["fid_images"], out["fid_real_images"] = scores["images"], scores["real_images"]
    return out
