"""The quality work after training, one function for train.py's end of training and generate.py's
--fit-gmm and --evaluate (the mechanisms are model/quality.py's).

    figures, written = assess(model, weights, seed=0, batch_size=128, to_input=step.to_input,
                              train=train_batches, attributes=(names, table), real=val_images,
                              pictures=out_dir, start=preview[:1])

With `train`, batches of (images, keys) of the training split: the ex-post GMM of their posterior means
beside the weights, and with `attributes` the attribute vectors beside it too. With `real`, uint8
validation images on the CPU: the SWD of prior samples, GMM samples (the GMM just fitted, or the one
beside the weights when there is one) and reconstructions against them, active units by covariance and
by KL, and FID and KID with `feature` (quality.inception_extractor's network). With `pictures`, a folder:
the GMM's 64 faces (generated_samples_gmm.png) and, from the face `start`, attributes.png.
"""

import contextlib
from pathlib import Path

import torch
from torchvision.utils import make_grid

from model import figures, quality


def first_images(batches, n: int) -> torch.Tensor:
    """The first `n` images of `batches` (or all, when fewer), uint8 on the CPU."""
    real = []
    for images in batches:
        real.append(images.cpu().contiguous())
        if sum(map(len, real)) >= n:
            break
    return torch.cat(real)[:n]


@torch.no_grad()
def assess(model, weights: Path, *, seed: int, batch_size: int, to_input, autocast=contextlib.nullcontext,
           train=None, attributes=None, real=None, feature=None, pictures: Path | None = None,
           start=None) -> tuple[dict, list[Path]]:
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
    if real is not None:
        n = len(real)
        mu, logvar = quality.encode_batches(model, real.split(batch_size), to_input, autocast)
        z = {"prior": quality.draw_latents(n, model.z_dim, torch.Generator().manual_seed(seed))}
        if gmm is not None:
            z["gmm"] = quality.draw_latents(n, model.z_dim, torch.Generator().manual_seed(seed), gmm=gmm)
        z["reconstructions"] = mu
        fakes = {k: quality.to_uint8(decode(v)) for k, v in z.items()}
        distances = quality.swd(real, fakes, seed=seed)
        record.update({**{f"swd_{k}": sum(v) / len(v) for k, v in distances.items()},
                       "swd_levels": distances, "swd_images": n, "swd_real": "val", "swd_seed": seed,
                       "val_active_units_cov": quality.active_units(mu),
                       "val_active_dims_kl": quality.active_dims_kl(mu, logvar), "active_images": n})
        if feature is not None:
            for k, v in quality.fid_kid(real, fakes, feature).items():
                record.update({f"{m}_{k}": x for m, x in v.items()})
            record["fid_images"] = n
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
