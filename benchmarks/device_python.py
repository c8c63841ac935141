"""A stand-in here for the GPU machine's interpreter: a virtual environment whose site-packages holds links
to this interpreter's installed torch, torchvision and triton with their requirements, and the other
distributions that machine's image holds (benchmarks/device_packages.txt), and nothing else: not this
project (its editable install points at a developer's checkout), not the packages benchmarks/wheels.txt
carries (webdataset, simplejpeg, TorchCodec), not DALI. benchmarks/rehearse.sh runs the GPU check with it.

    python benchmarks/device_python.py DIR      # run with the interpreter that has torch; makes DIR/bin/python3

Prints the distributions linked, and those of this interpreter left out.
"""

import argparse
import importlib.metadata as metadata
import os
import re
import sys
import sysconfig
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOTS = ("torch", "torchvision", "triton")  # torch "installed the way the device has it": with its requirements


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_names(path: Path = HERE / "device_packages.txt") -> set[str]:
    return {normal(word) for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
            for word in line.split()}


def requirements(dist) -> list[str]:
    """The names a distribution requires outside its extras."""
    names = []
    for line in dist.requires or ():
        if "extra ==" in line or "extra==" in line:
            continue
        found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if found:
            names.append(normal(found.group(1)))
    return names


def allowed(dists: dict) -> set[str]:
    """The device's names and the closure of torch's, torchvision's and triton's requirements, among `dists`."""
    keep = device_names() & set(dists)
    todo = [name for name in ROOTS if name in dists]
    while todo:
        name = todo.pop()
        if name in keep and name not in ROOTS:
            continue
        keep.add(name)
        todo += [r for r in requirements(dists[name]) if r in dists and r not in keep]
    return keep


def top_entries(dist) -> set[str]:
    """Paths relative to site-packages, one or two components deep, that hold the distribution's files."""
    entries = set()
    for file in dist.files or ():
        parts = Path(file).parts
        if not parts or parts[0] == "..":
            continue  # scripts in bin/ and the like
        entries.add(parts[0] if len(parts) == 1 else f"{parts[0]}/{parts[1]}")
    return entries


def link(dest: Path, dists: dict, keep: set[str]) -> None:
    """Links each kept distribution's top-level entries into `dest`; a folder shared with a distribution left
    out (a namespace such as nvidia/, which holds DALI too) is made here and its members linked one by one."""
    source = {}
    owners: dict[str, set[str]] = {}
    for name, dist in dists.items():
        root = Path(dist.locate_file(""))
        for entry in top_entries(dist):
            owners.setdefault(entry.split("/")[0], set()).add(name)
            source[entry] = root
    for name in sorted(keep):
        for entry in sorted(top_entries(dists[name])):
            top = entry.split("/")[0]
            root = source[entry]
            shared = (root / top).is_dir() and not (owners[top] <= keep)
            target = entry if shared else top
            here = dest / target
            if here.exists() or here.is_symlink() or not (root / target).exists():
                continue
            here.parent.mkdir(parents=True, exist_ok=True)
            here.symlink_to(root / target)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="the virtual environment to make (a new folder)")
    args = p.parse_args(argv)
    if args.dir.exists() and any(args.dir.iterdir()):
        sys.exit(f"error: {args.dir} is not empty; name a new folder")
    dists = {}
    for dist in metadata.distributions():
        name = normal(dist.metadata["Name"] or "")
        if name and name not in dists:
            dists[name] = dist
    if "torch" not in dists:
        sys.exit(f"error: {sys.executable} has no torch; run this with the interpreter that has it")
    keep = allowed(dists)
    venv.create(args.dir, with_pip=False, symlinks=True, clear=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(args.dir), "platbase": str(args.dir)}))
    site.mkdir(parents=True, exist_ok=True)
    link(site, dists, keep)
    left_out = sorted(set(dists) - keep)
    print(f"{args.dir}/bin/python3: Python {sys.version.split()[0]} with {len(keep)} distributions linked from "
          f"{os.path.dirname(os.path.dirname(metadata.distribution('torch').locate_file('torch')))}; left out: "
          + ", ".join(left_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
