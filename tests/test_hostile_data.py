"""Hostile and unlucky data: the same pixels on every path, reads bounded by what is on disk, one line
for every failure.

Every hostile file is made here by the test (no such file ships with the project). Cases whose broken
form would exhaust memory are scaled so that it fails fast (a claim of 100 MB, not 3 GB) or run in a
subprocess under a memory limit; a FIFO that the broken form would block on gets a writer that closes
it, so the broken form ends too (with the wrong message) instead of hanging the suite.
"""

import errno
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from conftest import ROOT, copy_shards
from pipeline import DataError, build_loader
from pipeline.attributes import ATTRIBUTES, AttributeFileError, shard_attributes
from common.files import FolderBusy, lock_folder
from pipeline.images import MAX_PIXELS, TooManyPixels, open_image
from pipeline.shards import MANIFEST, Shard, Span, load_manifest, split_shards
from pipeline.torch_loader import ShardStream, decode_crop, read_spans
from prep import shard


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def face(seed: int, size=(178, 218)) -> Image.Image:
    """A picture that no rotation or mirror leaves alike: gradients across and down, and a block off-centre."""
    w, h = size
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x * 220, y * 200, (1 - x) * y * 255], -1) + rng.uniform(0, 20, (h, w, 3))
    rgb[h // 5:h // 2, w // 6:w // 3] = (250, 240, 30)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92, **options)
    return out.getvalue()


# Each image a decoder could read differently, made from face(i): (file name, bytes, what the manifest says).
def odd_images() -> list[tuple[str, bytes, str | None]]:
    upright = face(1)
    cases = [
        # orientation 6: shown turned 90 degrees clockwise, so stored turned the other way
        ("exif6.jpg", jpeg_bytes(upright.transpose(Image.Transpose.ROTATE_90), exif=exif(6)), "EXIF orientation 6"),
        ("exif3.jpg", jpeg_bytes(upright.transpose(Image.Transpose.ROTATE_180), exif=exif(3)), "EXIF orientation 3"),
        ("exif2.jpg", jpeg_bytes(upright.transpose(Image.Transpose.FLIP_LEFT_RIGHT), exif=exif(2)),
         "EXIF orientation 2"),
        ("progressive.jpg", jpeg_bytes(upright, progressive=True), "progressive JPEG"),
        ("cmyk.jpg", jpeg_bytes(upright.convert("CMYK")), "mode CMYK"),
        ("gray.jpg", jpeg_bytes(upright.convert("L")), "mode L"),
        ("sub422.jpg", jpeg_bytes(upright, subsampling=1), "chroma subsampling 4:2:2"),
        ("png.jpg", (lambda b: (upright.save(b, "PNG"), b.getvalue())[1])(io.BytesIO()), "PNG data"),
        # kept as they are: every decoder reads these alike
        ("plain.jpg", jpeg_bytes(upright), None),
        ("sub444.jpg", jpeg_bytes(upright, subsampling=0), None),
        ("exif1.jpg", jpeg_bytes(upright, exif=exif(1)), None),
        ("icc.jpg", jpeg_bytes(upright, icc_profile=b"\0" * 128), None),  # no decoder applies a profile
    ]
    return cases


def test_every_cpu_path_decodes_each_odd_image_alike(tmp_path):
    """An EXIF orientation 6 was stored as is: DALI turned the face, the torch loader and generate.py did
    not. Now prep re-encodes each case a decoder could read differently, and the torch loader (both
    decodes), DALI, the cache fill and generate.py's photo decode agree on every image."""
    data = tmp_path / "img_align_celeba"
    data.mkdir()
    cases = odd_images()
    for name, blob, _ in cases:
        (data / name).write_bytes(blob)
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{name} 0\n" for name, _, _ in cases))
    out = tmp_path / "shards"
    assert shard.main(["--data-path", str(data), "--output-dir", str(out), "--workers", "1", "--quiet"]) == 0
    manifest = load_manifest(out)
    reasons = {e["file"]: e["reason"] for e in manifest["reencoded"]}
    assert sorted(reasons) == sorted(name for name, _, why in cases if why)
    for name, _, why in cases:
        assert why is None or why in reasons[name], (name, reasons.get(name))

    def by_key(loader):
        return {k: img for images, keys in loader for k, img in zip(keys, images.permute(0, 2, 3, 1).numpy())}

    n = len(cases)
    paths = {
        "torch": by_key(build_loader("torch", out, "train", n, "cpu", train=False, workers=0, with_keys=True)),
        "torch device decode": by_key(build_loader("torch", out, "train", n, "cpu", train=False, workers=0,
                                                   with_keys=True, gpu_decode=True)),
        "dali": by_key(build_loader("dali", out, "train", n, "cpu", train=False, workers=1, with_keys=True)),
        "cache fill": by_key(build_loader("cache", out, "train", n, "cpu", train=False, workers=0, with_keys=True)),
        "generate.py": {Path(name).stem: generate.read_image(data / name, "center").permute(1, 2, 0).numpy()
                        for name, _, _ in cases},
    }
    reference = paths["torch"]
    assert sorted(reference) == sorted(Path(name).stem for name, _, _ in cases)
    for path, images in paths.items():
        for key, image in images.items():
            diff = np.abs(image.astype(int) - reference[key].astype(int)).mean()
            assert diff < 1.5, f"{path} differs from the torch loader on {key} by {diff:.2f}/255"
    # exact where the decoder is the same library: what training reads is what generate.py reads
    for key in reference:
        assert (paths["generate.py"][key] == reference[key]).all(), key
        assert (paths["cache fill"][key] == reference[key]).all(), key
    # and every case shows the upright face (the re-encoding costs a little; a turn would cost ~50/255)
    for key, image in reference.items():
        if key not in ("gray", "cmyk"):  # a gray or converted face is another picture
            diff = np.abs(image.astype(int) - reference["plain"].astype(int)).mean()
            assert diff < 4, f"{key} is not the upright face ({diff:.1f}/255 from it)"
    # nothing stored carries an EXIF orientation any more
    for record in manifest["splits"]["train"]["shards"]:
        with tarfile.open(out / record["tar"]) as tar:
            for member in tar:
                with Image.open(tar.extractfile(member)) as im:
                    assert im.getexif().get(0x0112, 1) == 1, member.name


def pixel_bomb(width: int, height: int) -> bytes:
    """A small baseline JPEG whose frame header claims width x height pixels."""
    data = bytearray(jpeg_bytes(face(0, (16, 16))))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_generate_refuses_an_image_whose_header_claims_too_many_pixels(tmp_path, capsys):
    """A 10 KB JPEG whose header said 20000x20000 took 1.9 GB and ended in PIL's DecompressionBombError
    traceback. Scaled here to just over the bound (9500x9500, which the old code decoded, ~270 MB)."""
    photo = tmp_path / "bomb.jpg"
    photo.write_bytes(pixel_bomb(9500, 9500))
    assert len(photo.read_bytes()) < 10_000 and 9500 * 9500 > MAX_PIXELS
    with pytest.raises(generate.GenerateError, match="9500x9500 pixels"):
        generate.read_image(photo, "center")
    photo.write_bytes(pixel_bomb(20000, 20000))
    with pytest.raises(generate.GenerateError, match="20000x20000 pixels"):
        generate.read_image(photo, "none")
    with pytest.raises(TooManyPixels):  # a PNG goes through the same bound
        def chunk(kind: bytes, data: bytes) -> bytes:
            return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        open_image(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (30000).to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0")
                   + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_the_torch_loader_refuses_a_pixel_bomb_in_a_shard_before_decoding():
    """A shard made elsewhere holds what prep would skip: both of the torch loader's decodes check the header."""
    bomb = pixel_bomb(20000, 20000)
    with pytest.raises(TooManyPixels, match="20000x20000"):
        decode_crop(bomb, "center")
    sample = {"__key__": "bomb", "__url__": "/shards/train-000000.tar", "jpg": bomb}
    with pytest.raises(DataError, match="sample bomb is 20000x20000 pixels"):
        ShardStream.pack_bytes([sample], [False])


def test_prep_skips_an_image_whose_header_claims_too_many_pixels(faces_dir, tmp_path):
    data = tmp_path / "img_align_celeba"
    data.mkdir()
    for f in sorted(faces_dir.glob("*.jpg"))[:4]:
        shutil.copy2(f, data / f.name)
    (data / "bomb.jpg").write_bytes(pixel_bomb(20000, 20000))
    out = tmp_path / "shards"
    assert shard.main(["--data-path", str(data), "--output-dir", str(out), "--workers", "1", "--quiet"]) == 0
    skipped = {e["file"]: e["reason"] for e in load_manifest(out)["skipped"]}
    assert "20000x20000 pixels" in skipped["bomb.jpg"]


# ---------------------------------------------------------------------------- claims against the bytes on disk
def claim(folder: Path, count: int) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    first = manifest["splits"]["train"]["shards"][0]
    manifest["splits"]["train"]["num_samples"] += count - first["num_samples"]
    first["num_samples"] = count
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("count, said", [(30_000_000, "hold at most"), (17, "does not say the same")])
@pytest.mark.parametrize("loader", ["torch", "dali", "cache"])
def test_a_claimed_sample_count_is_checked_against_the_shard_and_its_index(tiny, tmp_path, loader, count, said):
    """A manifest claiming 3e7 samples on a 240-image shard ran the streaming loader for 56 s and 5.5 GB
    before its error: now every loader stops at once, naming the shard."""
    data = copy_shards(tiny, tmp_path / "shards")
    claim(data, count)
    started = time.perf_counter()
    with pytest.raises(DataError, match=said) as caught:
        build_loader(loader, data, "train", 8, "cpu", workers=0)
    assert "train-000000.tar" in str(caught.value) and f"{count:,}" in str(caught.value)
    assert time.perf_counter() - started < 5


def sparse_member(name: str, apparent: int) -> bytes:
    """The header of a GNU sparse member of `apparent` bytes that stores none: tarfile makes up its zeros."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[483:495] = f"{apparent:011o}\0".encode()  # realsize
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


@pytest.mark.parametrize("kind", ["sparse", "oversized"])
def test_a_tar_member_larger_than_its_file_is_refused_before_it_is_read(tmp_path, kind):
    """A sparse member of 3 GB apparent size in a 10 KB shard took the fill to 6.7 GB; scaled here to
    100 MB, which the old reader made up and returned."""
    jpeg = jpeg_bytes(face(0, (32, 32)))
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = len(jpeg)
        tar.addfile(info, io.BytesIO(jpeg))
    body = good.getvalue()[:512 + -(-len(jpeg) // 512) * 512]  # its member alone: no end-of-archive blocks
    if kind == "sparse":
        body += sparse_member("b.jpg", 100_000_000)
    else:
        header = bytearray(tarfile.TarInfo("b.jpg").tobuf(format=tarfile.GNU_FORMAT))
        header[124:136] = f"{100_000_000:011o}\0".encode()
        header[148:156] = b" " * 8
        header[148:156] = f"{sum(header):06o}\0 ".encode()
        body += bytes(header)
    path = tmp_path / "train-000000.tar"
    path.write_bytes(body + b"\0" * 4096)
    assert path.stat().st_size < 10_000
    with pytest.raises(DataError, match="sparse" if kind == "sparse" else "claims 100,000,000 bytes"):
        list(read_spans([Span(Shard(path, tmp_path / "unused.idx", 2), 0, 2)]))


@pytest.mark.parametrize("line, said", [("jpg -512 600 {member}", "negative offset"),
                                        ("jpg {offset} 600 {member}", "overlaps"),
                                        ("jpg {offset} -5 {member}", "negative size")])
def test_a_dali_index_line_with_a_negative_or_overlapping_member_is_refused(tiny, tmp_path, line, said):
    """A negative offset passed `offset + size <= tar size` and DALI failed with a 60-line traceback."""
    data = copy_shards(tiny, tmp_path / "shards")
    idx = data / "train-000000.idx"
    header, first, second, *rest = idx.read_text().splitlines()
    _, offset, _, member = second.split()
    bad = line.format(offset=first.split()[1], member=member)
    idx.write_text("\n".join([header, first, bad, *rest]) + "\n")
    with pytest.raises(DataError, match=f"line 3.*{said}"):
        build_loader("dali", data, "train", 8, "cpu", workers=1)


# ---------------------------------------------------------------------------- FIFOs, devices and links
@contextmanager
def fifo_at(path: Path):
    """A FIFO at `path`, and a writer that keeps opening and closing it for a few seconds: code that opens
    it as a file gets an end of file instead of blocking the test forever."""
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    stop = threading.Event()

    def unblock():
        deadline = time.monotonic() + 8
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader yet
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("name", ["train-000000.idx", "train-000000.tar", MANIFEST])
def test_a_fifo_in_the_shard_folder_is_refused_not_waited_on(tiny, tmp_path, name):
    """A FIFO at a split's .idx hung the cache fill forever."""
    data = copy_shards(tiny, tmp_path / "shards")
    with fifo_at(data / name), pytest.raises(DataError, match="is a FIFO, not a regular file"):
        build_loader("cache", data, "train", 8, "cpu", train=True, workers=0)


def test_a_fifo_at_the_attribute_file_is_refused(tiny, tmp_path):
    """A FIFO at attributes.txt hung train.py after its last epoch, before the weights were written."""
    data = copy_shards(tiny, tmp_path / "shards")
    manifest = json.loads((data / MANIFEST).read_text())
    manifest["attributes"] = {"file": ATTRIBUTES}
    with fifo_at(data / ATTRIBUTES), pytest.raises(AttributeFileError, match="is a FIFO"):
        shard_attributes(data, manifest)


def test_an_attribute_file_linked_to_dev_zero_is_refused(tiny, tmp_path):
    """attributes.txt linked to /dev/zero read until MemoryError: the read runs in a process whose address
    space may grow by 1 GB past what its imports took, so the old code fails in a second instead of taking
    the machine."""
    data = copy_shards(tiny, tmp_path / "shards")
    (data / ATTRIBUTES).unlink(missing_ok=True)
    (data / ATTRIBUTES).symlink_to("/dev/zero")
    code = ("import resource, sys; from pipeline.attributes import shard_attributes, AttributeFileError\n"
            "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
            "resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), used + (1 << 30)))\n"
            f"try: shard_attributes({str(data)!r}, {{'attributes': {{'file': {ATTRIBUTES!r}}}}})\n"
            "except AttributeFileError as exn: print('error:', exn, file=sys.stderr); sys.exit(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    assert "is a symbolic link" in error_line(proc.stderr)


# ---------------------------------------------------------------------------- prep: one line for every failure
def few_faces(faces_dir: Path, folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True)
    for f in sorted(faces_dir.glob("*.jpg"))[:n]:
        shutil.copy2(f, folder / f.name)
    return folder


def test_a_file_name_that_is_not_utf8_is_mapped_like_other_odd_names(faces_dir, tmp_path):
    """A name that is not UTF-8 raised UnicodeEncodeError in prep's fingerprint, and nothing was sharded."""
    data = few_faces(faces_dir, tmp_path / "img_align_celeba")
    odd = os.fsdecode(b"\xff\xfeface.jpg")
    (data / odd).write_bytes(jpeg_bytes(face(3)))
    out = tmp_path / "shards"
    assert shard.main(["--data-path", str(data), "--output-dir", str(out), "--workers", "1", "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())  # valid JSON: the name is escaped, not a lone surrogate
    assert {"file": "\\xff\\xfeface.jpg", "key": "__face"} in manifest["renamed"]
    assert manifest["num_samples"] == 7


def test_a_full_disk_ends_prep_in_one_line_naming_the_file(faces_dir, tmp_path, monkeypatch, capsys):
    """A full disk gave a 24-line OSError; now one line with the file, the cause and the space needed."""
    data = few_faces(faces_dir, tmp_path / "img_align_celeba")
    out = tmp_path / "shards"

    def no_space(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shard.wds.TarWriter, "write", no_space)
    with pytest.raises(SystemExit) as exited:
        shard.main(["--data-path", str(data), "--output-dir", str(out), "--workers", "1", "--quiet"])
    assert exited.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert "No space left on device" in line and ".tar." in line and ".tmp" in line and "need about" in line
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the unfinished tar is gone


def test_a_file_size_limit_ends_prep_in_one_line(faces_dir, tmp_path):
    """The same for real: prep under RLIMIT_FSIZE gets EFBIG from the kernel (Python ignores SIGXFSZ)."""
    data = few_faces(faces_dir, tmp_path / "img_align_celeba", 24)
    out = tmp_path / "shards"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    proc = subprocess.run([sys.executable, "prep/shard.py", "--data-path", str(data), "--output-dir", str(out),
                           "--workers", "1", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          preexec_fn=limit)
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert "File too large" in line and "ulimit -f" in line and "need about" in line and ".tar" in line


def test_a_second_prep_on_the_same_folder_stops_naming_the_first(faces_dir, tmp_path, capsys):
    """Two prep runs on one folder: the second deleted the first's temporary file. Now the folder is locked
    (the lock train.py takes on its own folder) and the second stops naming the first one's process."""
    data = few_faces(faces_dir, tmp_path / "img_align_celeba")
    out = tmp_path / "shards"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from common.files import lock_folder; "
                               f"lock_folder({str(out)!r}); print('locked', flush=True); sys.stdin.read()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit):
            shard.main(["--data-path", str(data), "--output-dir", str(out), "--workers", "1", "--quiet"])
        line = error_line(capsys.readouterr().err)
        assert f"process {holder.pid}" in line and "prep/shard.py" in line
        assert list(out.iterdir()) == []  # nothing of the second run
        with pytest.raises(FolderBusy):
            lock_folder(out)
    finally:
        holder.communicate("")
    assert shard.main(["--data-path", str(data), "--output-dir", str(out), "--workers", "1", "--quiet"]) == 0
