"""Face attributes in CelebA's list_attr_celeba.txt format, read and written without torch.

    202599
    5_o_Clock_Shadow Arched_Eyebrows ... Young
    000001.jpg -1  1  1 -1 ...

A count line, a line of attribute names, then a name and one value of 1 or -1 per attribute for
each image. prep/synthetic.py writes this file for the attributes its faces draw; prep/shard.py reads
it when it lies beside the image folder (CelebA's layout) and writes the rows of the images it shards
into ATTRIBUTES in the shard folder, keyed by sample key, listed in manifest.json under "attributes".
"""

import hashlib
from pathlib import Path

from common.files import plain_name, read_regular

CELEBA_ATTRIBUTES_FILE = "list_attr_celeba.txt"  # beside img_align_celeba/, as CelebA ships it
ATTRIBUTES = "attributes.txt"  # in the shard folder: the same format, one row per sample key
MAX_ATTRIBUTE_BYTES = 1 << 28  # CelebA's 202,599 rows take 26 MB


class AttributeFileError(ValueError):
    """An attribute file that is not in CelebA's format, as one line naming the file and the line."""


def parse_attributes(text: str, source) -> tuple[list[str], dict[str, list[int]]]:
    """(names, {first column: values}) from CelebA's format; AttributeFileError naming `source` otherwise."""
    lines = text.splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise AttributeFileError(f"{source}: expected CelebA's attribute format (a count line, a line of names, "
                              f"then '<file> <1|-1> ...' per image)")
    names = lines[1].split()
    if not names or len(set(names)) != len(names) or not all(n.replace("_", "").isalnum() for n in names):
        raise AttributeFileError(f"{source}, line 2: expected distinct attribute names such as Smiling")
    table = {}
    for n, line in enumerate(lines[2:], 3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise AttributeFileError(f"{source}, line {n}: expected a name and {len(names)} values of 1 or -1")
        table[parts[0]] = [int(v) for v in parts[1:]]
    if len(table) != int(lines[0]):
        raise AttributeFileError(f"{source}: its first line counts {int(lines[0])} images, it lists {len(table)}")
    return names, table


def format_attributes(names: list[str], rows) -> str:
    """CelebA's format from (name, values) rows: what parse_attributes reads back."""
    rows = list(rows)
    body = "".join(f"{name} " + " ".join(f"{v:2d}" for v in values) + "\n" for name, values in rows)
    return f"{len(rows)}\n{' '.join(names)}\n{body}"


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shard_attributes(data_path, manifest: dict) -> tuple[list[str], dict[str, list[int]]] | None:
    """The shard folder's attributes, {sample key: values}, when its manifest lists a side file; None
    when it lists none. AttributeFileError when the entry is not a plain file name or the file is bad."""
    entry = manifest.get("attributes")
    if entry is None:
        return None
    name = entry.get("file") if isinstance(entry, dict) else None
    if not plain_name(name):
        raise AttributeFileError(f"{Path(data_path) / 'manifest.json'}: its attributes entry {name!r} is not a plain "
                              f"file name inside the shard folder; run prep/shard.py again")
    path = Path(data_path) / name
    try:  # a regular file in the folder: not a link (to /dev/zero, say), not a FIFO that never ends
        text = read_regular(path, MAX_ATTRIBUTE_BYTES).decode()
    except (OSError, UnicodeDecodeError) as exn:
        raise AttributeFileError(f"{path}: cannot read it ({getattr(exn, 'strerror', None) or exn}); "
                              f"run prep/shard.py again") from None
    return parse_attributes(text, path)
