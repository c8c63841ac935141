"""Procedural CelebA-shaped faces.

CelebA cannot be downloaded in every environment (it sits behind Google Drive
quotas and a licence click-through), yet the demo, the benchmarks and the tests
all want a folder that looks like ``img_align_celeba/``: 178x218 RGB baseline
JPEGs named ``000001.jpg`` ... with a roughly centred, eye-aligned face. This
module draws such faces from simple shapes (head, hair, eyes, brows, nose,
mouth, clothing, background), then adds pose jitter, directional lighting,
softening and photographic grain so the files weigh and decode like photos
(~10 KB each) rather than like flat vector art.

Every face depends only on ``(seed, index)``, so any subset can be regenerated
byte-for-byte and an interrupted write can simply be resumed.
"""

from __future__ import annotations

import math
import os
import pathlib
import threading
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.attributes import CELEBA_ATTRIBUTES_FILE, format_attributes
from common.files import atomic_write

W, H = 178, 218
M = 26  # drawing margin, so shifted/rotated shoulders and hair still fill the frame
CX, EY = W // 2 + M, 110 + M  # face centre x and eye line, in canvas coordinates
JPEG_KW = dict(format="JPEG", quality=90, subsampling=2, progressive=False)

# Normalised coordinates of the (H+2)x(W+2) working frame (1px border for the blur).
_XN = np.linspace(-1, 1, W + 2, dtype=np.float32)
_YN = np.linspace(-1, 1, H + 2, dtype=np.float32)
# One fixed noise bank, cropped at random offsets: drawing 116k fresh normals
# per face would cost more than everything else put together. A component shared
# by all channels mimics luminance grain, the rest chroma noise.
_bank = np.random.default_rng(12345).standard_normal((H + 64, W + 64, 4), dtype=np.float32)
_NOISE = _bank[..., :3] * 0.8 + _bank[..., 3:] * 0.6
# Per-thread scratch frames: fresh ~0.5 MB float arrays per op made the numpy
# stage several times slower than the drawing (allocator churn, page faults).
_tls = threading.local()

SKIN_LIGHT, SKIN_DARK = np.array([245, 212, 190]), np.array([88, 56, 38])
HAIR = [(22, 18, 16), (50, 34, 24), (95, 62, 38), (150, 110, 65), (205, 170, 110),
        (130, 58, 30), (165, 160, 155), (225, 222, 215)]
HAIR_CDF = np.cumsum([0.28, 0.24, 0.16, 0.1, 0.1, 0.05, 0.05, 0.02])
# CelebA's names for what the faces draw, in CelebA's order; hair colours by HAIR index (5, auburn, as brown).
ATTRIBUTE_NAMES = ("Bald", "Black_Hair", "Blond_Hair", "Brown_Hair", "Eyeglasses", "Gray_Hair",
                   "Mouth_Slightly_Open", "No_Beard", "Smiling", "Wearing_Lipstick")
HAIR_NAME = ("Black_Hair", "Brown_Hair", "Brown_Hair", "Brown_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair",
             "Gray_Hair")
IRIS = [(70, 42, 24), (40, 26, 18), (70, 110, 160), (80, 110, 70), (110, 85, 45), (110, 120, 130)]


def _rgb(c):
    return tuple(int(min(255, max(0, v))) for v in c)


def _jitter(rng, colour, amount):
    # Mostly brightness: independent per-channel jitter turns grey hair mint.
    return _rgb(np.asarray(colour) * rng.normal(1, amount / 100) + rng.normal(0, 3, 3))


def _shade(colour, f):
    return _rgb(v * f for v in colour)


def _mix(c0, c1, t):
    return _rgb(a + t * (b - a) for a, b in zip(c0, c1))


def _muted(rng):
    # Real photo backdrops and clothes are rarely fully saturated: pull towards grey.
    c = rng.uniform(15, 240, 3).astype(np.float32)
    return c.mean() + rng.uniform(0.15, 0.8) * (c - c.mean())


def _scratch():
    if not hasattr(_tls, "bufs"):
        _tls.bufs = (np.empty((H + 2, (W + 2) * 3), np.float32),
                     np.empty((H, W + 2, 3), np.float32), np.empty((H, W, 3), np.float32))
    return _tls.bufs


def _background(rng, out: np.ndarray) -> Image.Image:
    """A solid, gradient or bokeh backdrop of the (W+2)x(H+2) working frame.

    Each kind is a sum of separable terms rows[:, j] * cols[j, x, c], i.e. one
    small matmul: broadcasting a 3-vector over the frame is far slower in numpy.
    """
    kind = rng.integers(3)
    c0 = _muted(rng)
    rows, cols = [np.ones_like(_YN)], [np.broadcast_to(c0, (W + 2, 3))]
    if kind == 1:  # linear gradient at a random angle, kept within [c0, c1]
        a = rng.uniform(0, 2 * math.pi)
        ca, sa = math.cos(a), math.sin(a)
        dc, k = _muted(rng) - c0, 0.5 / (abs(ca) + abs(sa))
        rows.append(0.5 + k * sa * _YN)
        cols.append(np.broadcast_to(dc, (W + 2, 3)))
        rows.append(np.ones_like(_YN))
        cols.append(k * ca * _XN[:, None] * dc[None, :])
    elif kind == 2:  # out-of-focus scene: gaussian blobs of other colours
        for _ in range(rng.integers(3, 8)):
            x, y, r = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.2, 0.6)
            rows.append(np.exp(-(((_YN - y) / r) ** 2)))
            cols.append(np.exp(-(((_XN - x) / r) ** 2))[:, None] * (_muted(rng) - c0)[None, :])
    np.matmul(np.stack(rows, 1), np.stack(cols).reshape(len(cols), -1), out=out)
    np.clip(out, 0, 255, out=out)
    return Image.fromarray(out.astype(np.uint8).reshape(H + 2, W + 2, 3), "RGB")


def _arc(cx, cy, rx, ry, t0, t1, n=14):
    t = np.linspace(t0, t1, n)
    return list(zip(cx + rx * np.cos(t), cy - ry * np.sin(t)))


def _eye(d, x, y, size, iris, lid, look):
    ew, eh, ir = size
    d.ellipse((x - ew, y - eh, x + ew, y + eh), fill=(235, 232, 228))
    for r, colour in ((ir, iris), (ir * 0.45, (12, 10, 10)), (0.8, (250, 250, 250))):
        d.ellipse((x + look - r, y - r, x + look + r, y + r), fill=colour)  # iris, pupil, glint
    d.arc((x - ew, y - eh - 1, x + ew, y + eh + 1), 190, 350, fill=lid, width=2)


def _draw_person(rng, drawn: set) -> Image.Image:
    # Opaque fills on a transparent canvas: alpha doubles as the person mask.
    img = Image.new("RGBA", (W + 2 * M, H + 2 * M), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    skin = _jitter(rng, SKIN_LIGHT + rng.beta(1.6, 2.6) * (SKIN_DARK - SKIN_LIGHT), 6)
    dark = _shade(skin, 0.78)
    hair_index = int(np.searchsorted(HAIR_CDF, rng.random() * HAIR_CDF[-1]))
    hair = _jitter(rng, HAIR[hair_index], 8)
    ha, hb = rng.uniform(44, 52), rng.uniform(60, 68)
    hcy = EY + rng.uniform(4, 10)
    style = np.searchsorted([0.08, 0.4, 0.65], rng.random())  # bald, short, medium, long
    vol = rng.uniform(3, 9) + 4 * style
    drawn.add("Bald" if style == 0 else HAIR_NAME[hair_index])

    # Clothing and long hair sit behind the neck; the neck behind the head.
    sw = rng.uniform(80, 105)
    d.ellipse((CX - sw, hcy + hb + 10, CX + sw, hcy + hb + 160), fill=_rgb(_muted(rng)))
    if style == 3:
        d.rounded_rectangle((CX - ha - vol, hcy - hb - vol, CX + ha + vol, hcy + rng.uniform(60, 150)),
                            radius=40, fill=hair)
    d.rectangle((CX - ha * 0.5, hcy + hb * 0.5, CX + ha * 0.5, hcy + hb + 30), fill=dark)
    for s in (-1, 1):  # ears
        d.ellipse((CX + s * ha - 8, EY - 2, CX + s * ha + 8, EY + 28), fill=_shade(skin, 0.9))
    d.ellipse((CX - ha, hcy - hb, CX + ha, hcy + hb), fill=skin)
    # a darker jaw crescent gives the flat ellipse some roundness
    d.chord((CX - ha, hcy - hb, CX + ha, hcy + hb), 20, 160, fill=_shade(skin, 0.93))
    d.ellipse((CX - ha + 5, hcy - hb + 2, CX + ha - 5, hcy + hb - 14), fill=skin)
    beard = style < 2 and rng.random() < 0.3
    if beard:  # or stubble: a darker, hair-tinted jaw
        d.chord((CX - ha, hcy - hb, CX + ha, hcy + hb), 22, 158,
                fill=_mix(_shade(skin, 0.85), _shade(hair, 0.8), rng.uniform(0.2, 0.7)))
    else:
        drawn.add("No_Beard")

    if style > 0:  # hair cap: outer skull arc, then a curved hairline back across the forehead
        hl, temple, part = EY - rng.uniform(28, 45), EY - rng.uniform(4, 14), rng.uniform(-12, 12)
        side = hcy + (0 if style == 1 else 10)
        pts = [(CX - ha - vol * 0.6, side)] + _arc(CX, hcy, ha + vol, hb + vol, math.pi, 0)
        pts += [(CX + ha + vol * 0.6, side), (CX + ha - 2, side), (CX + ha - 2, temple)]
        pts += _arc(CX + part, temple, ha - 2 - part, temple - hl, 0, math.pi / 2, 7)
        pts += _arc(CX + part, temple, ha - 2 + part, temple - hl, math.pi / 2, math.pi, 7)
        pts += [(CX - ha + 2, side)]
        d.polygon(pts, fill=hair)

    ex, look = rng.uniform(18, 21), rng.uniform(-1.5, 1.5)
    eye_size = (rng.uniform(6.5, 8.5), rng.uniform(3, 4.2), rng.uniform(3.2, 4.2))
    iris = _jitter(rng, IRIS[rng.integers(len(IRIS))], 10)
    brow = _shade(hair, 0.8) if style else _shade(skin, 0.5)
    by, bt = EY - rng.uniform(9, 13), int(rng.integers(2, 5))
    for s in (-1, 1):
        _eye(d, CX + s * ex, EY, eye_size, iris, _shade(skin, 0.4), look)
        d.line([(CX + s * (ex - 9), by + 1), (CX + s * ex, by - 2), (CX + s * (ex + 10), by + 1)],
               fill=brow, width=bt, joint="curve")

    # nose: side shadow down the bridge, darker nostrils, lit tip
    ny, nw = EY + rng.uniform(20, 26), rng.uniform(6, 9)
    d.line([(CX - 4, EY + 4), (CX - 5, ny - 3)], fill=_shade(skin, 0.85), width=3)
    d.ellipse((CX - nw, ny - 4, CX + nw, ny + 4), fill=_shade(skin, 0.9))
    d.ellipse((CX - 3, ny - 5, CX + 3, ny + 1), fill=_shade(skin, 1.06))
    for s in (-1, 1):
        d.ellipse((CX + s * nw * 0.55 - 2, ny, CX + s * nw * 0.55 + 2, ny + 3), fill=_shade(skin, 0.5))

    my, mw, mo = EY + rng.uniform(38, 46), rng.uniform(12, 19), rng.uniform(0, 1)
    lip = _mix(skin, (175, 60, 70), 0.45)
    if rng.random() < 0.2 and not beard:  # lipstick
        lip = _jitter(rng, (170, 30, 50), 15)
        drawn.add("Wearing_Lipstick")
    if mo > 0.55:  # open smile with teeth
        drawn.update(("Smiling", "Mouth_Slightly_Open"))
        oh = 4 + 6 * (mo - 0.55)
        d.chord((CX - mw, my - oh, CX + mw, my + oh * 1.4), 0, 180, fill=lip)
        d.chord((CX - mw + 2, my - oh + 2, CX + mw - 2, my + oh * 1.2), 0, 180, fill=(60, 20, 25))
        d.rectangle((CX - mw + 4, my, CX + mw - 4, my + 2.5), fill=(230, 225, 215))
    else:
        d.ellipse((CX - mw, my - 3, CX + mw, my + 1), fill=_shade(lip, 0.9))
        d.ellipse((CX - mw * 0.8, my - 1, CX + mw * 0.8, my + 5), fill=lip)
        d.line([(CX - mw, my - 1), (CX, my), (CX + mw, my - 1)], fill=_shade(lip, 0.45), width=1)

    if rng.random() < 0.07:  # eyeglasses, as in CelebA's Eyeglasses attribute
        frame = _jitter(rng, (30, 30, 30), 20)
        drawn.add("Eyeglasses")
        for s in (-1, 1):
            d.rounded_rectangle((CX + s * ex - 12, EY - 8, CX + s * ex + 12, EY + 9), 5, None, frame, 2)
        d.line([(CX - ex + 12, EY - 2), (CX + ex - 12, EY - 2)], fill=frame, width=2)
    return img


def make_face(seed: int, index: int) -> Image.Image:
    """Return face ``index`` of the synthetic set ``seed`` (RGB, 178x218)."""
    return make_face_and_attributes(seed, index)[0]


def make_face_and_attributes(seed: int, index: int) -> tuple[Image.Image, list[int]]:
    """Face ``index`` of the synthetic set ``seed`` and its attributes: 1 or -1 for each of ATTRIBUTE_NAMES."""
    rng = np.random.default_rng([seed, index])
    flat, frame, out = _scratch()
    img = _background(rng, flat)
    drawn = set()
    person = _draw_person(rng, drawn)

    # Pose: CelebA crops are eye-aligned but not perfectly, so jitter a little.
    ang = math.radians(float(np.clip(rng.normal(0, 3.5), -8, 8)))
    s, tx, ty = rng.uniform(0.94, 1.06), rng.normal(0, 2.5), rng.normal(0, 2.5)
    ox, oy = W / 2 + 1, 119.0  # rotate about the face centre, in output coordinates
    a, b = math.cos(ang) / s, math.sin(ang) / s
    c = ox + M - 1 - a * (ox + tx) - b * (oy + ty)
    f = oy + M - 1 + b * (ox + tx) - a * (oy + ty)
    # NEAREST is ~20x faster than BILINEAR here; the blur below hides the jaggies.
    person = person.transform((W + 2, H + 2), Image.AFFINE, (a, b, c, -b, a, f), Image.NEAREST)
    img.paste(person, (0, 0), person)

    # Lens softness: separable [1 k 1] blur, vertical into `v`, horizontal into `out`.
    np.copyto(flat, np.asarray(img).reshape(H + 2, -1))
    base, v, k = flat.reshape(H + 2, W + 2, 3), frame[:H], rng.uniform(1.5, 4.0)
    np.multiply(base[1:-1], k, out=v)
    v += base[:-2]
    v += base[2:]
    np.multiply(v[:, 1:-1], k, out=out)
    out += v[:, :-2]
    out += v[:, 2:]
    # Directional light as a separable ramp (which also normalises the blur), then grain.
    la, lg = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.25)
    g = rng.uniform(0.85, 1.15) / (k + 2) ** 2
    out *= (g * (1 + lg * math.sin(la) * _YN[1:-1]))[:, None, None]
    out *= np.repeat((1 + lg * math.cos(la) * _XN[1:-1])[:, None], 3, 1)
    y0, x0 = rng.integers(0, 64, 2)
    out += _NOISE[y0:y0 + H, x0:x0 + W] * rng.uniform(3.0, 6.0)
    face = Image.fromarray(np.clip(out, 0, 255, out=out).astype(np.uint8), "RGB")
    return face, [1 if name in drawn else -1 for name in ATTRIBUTE_NAMES]


def _write_one(job) -> tuple[int, list[int]]:
    """Writes one face if its file is missing (else only draws it again for its attributes)."""
    path, seed, index = job
    face, attributes = make_face_and_attributes(seed, index)
    if path.exists():
        return index, attributes
    # Hidden, non-.jpg temp name in the same folder, so os.replace is atomic and
    # an interrupted run leaves no half-written image that globbing *.jpg would find.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        face.save(tmp, **JPEG_KW)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return index, attributes


def write_synthetic(out_dir, n: int, seed: int = 0, workers: int | None = None,
                    progress: bool = True) -> list[pathlib.Path]:
    """Write faces 1..n as ``000001.jpg`` .. into ``out_dir`` and return their paths,
    and their attributes as ``list_attr_celeba.txt`` beside ``out_dir``, as CelebA lays them out.

    ``{i:06d}.jpg`` is ``make_face(seed, i)``. Files that already exist are kept,
    so an interrupted run resumes where it stopped and any subset can be
    deleted and regenerated identically; their attributes are drawn again.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:06d}.jpg" for i in range(1, n + 1)]
    jobs = [(p, seed, i) for i, p in enumerate(paths, 1)]
    attributes = {}
    workers = workers or os.cpu_count() or 1
    with tqdm(total=n, desc="synthetic faces", unit="img", disable=not progress) as bar:
        if workers == 1 or n < 64:  # a pool costs more than it saves here
            results = map(_write_one, jobs)
        else:
            pool = Pool(workers)
            results = pool.imap_unordered(_write_one, jobs, chunksize=32)
        try:
            for index, values in results:
                attributes[index] = values
                bar.update()
        finally:
            if workers != 1 and n >= 64:
                pool.close()
                pool.join()
    rows = ((paths[i - 1].name, attributes[i]) for i in range(1, n + 1))
    atomic_write(out.parent / CELEBA_ATTRIBUTES_FILE, format_attributes(list(ATTRIBUTE_NAMES), rows).encode())
    return paths
