"""The sample-quality targets of a finished train.py run, measured: the figures benchmarks/RESULTS.md reports.

    python benchmarks/sample_quality.py --run output/demo --data-path dataset/synthetic/shards

Prints one JSON object: the end-of-training SWD (and FID and KID, when the run had --fid) of N(0, I)
samples, GMM samples and reconstructions (from the last metrics.jsonl row), the end-of-training work against the training time, and for each
attribute vector a logistic probe on 16x16 pixels, trained on the training split's real images and
labels, rating the -S and +S ends of --rows faces moved along the vector (z from N(0, I), --seed).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import VariationalAutoEncoder, quality  # noqa: E402
from pipeline import build_loader  # noqa: E402
from pipeline.attributes import shard_attributes  # noqa: E402
from pipeline.shards import load_manifest  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="train.py's --output-dir")
    p.add_argument("--data-path", required=True, help="the shards it trained on")
    p.add_argument("--strength", type=float, default=quality.ATTRIBUTE_STRENGTH)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rows = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "kind" not in r]
    last = epochs[-1]
    out = {k: last[k] for k in ("swd_prior", "swd_gmm", "swd_reconstructions", "swd_images", "swd_seed", "swd_patches",
                                "fid_prior", "fid_gmm", "fid_reconstructions", "kid_prior", "kid_gmm",
                                "kid_reconstructions", "fid_images", "fid_seconds",
                                "val_active_units_cov", "val_active_dims_kl", "quality_seconds") if k in last}
    out["training_seconds"] = sum(r["seconds"] for r in epochs)
    out["quality_share_of_training"] = last.get("quality_seconds", float("nan")) / out["training_seconds"]

    state = torch.load(args.run / "vae_celeba.pth", map_location="cpu", weights_only=True)
    model = VariationalAutoEncoder(z_dim=state["hid_2mu.weight"].shape[0])
    model.load_state_dict(state)
    model.eval()
    vectors = quality.load_attribute_vectors(args.run / "vae_celeba.attributes.pt")
    names, table = shard_attributes(args.data_path, load_manifest(args.data_path))
    images, keys = [], []
    for batch, batch_keys in build_loader("torch", args.data_path, "train", 256, "cpu", train=False, workers=1,
                                          with_keys=True):
        images.append(batch.contiguous())
        keys += batch_keys
    images = torch.cat(images)
    labels = torch.tensor([table[k] for k in keys])
    z = quality.draw_latents(args.rows, model.z_dim, torch.Generator().manual_seed(args.seed))
    probes = {}
    with torch.no_grad():
        for name, vector in zip(vectors["names"], vectors["vectors"]):
            walk = quality.attribute_walk(model, z, vector, args.strength, steps=2)  # the -S and +S ends
            minus, plus = quality.probe_ends(images, labels[:, names.index(name)], walk, seed=args.seed)
            probes[name] = {"minus": round(minus, 3), "plus": round(plus, 3)}
    out["probe"] = probes
    out["probe_plus_higher"] = sum(v["plus"] > v["minus"] for v in probes.values())
    out["probe_attributes"] = len(probes)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
