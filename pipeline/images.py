"""The image files every decoder reads alike, and the bound on what any of them is asked to decode.

prep/shard.py stores an image as it is only when it is a JPEG that every decoder of this project
turns into the same pixels: simplejpeg (libjpeg-turbo, the torch loader on the CPU), TorchCodec and
torchvision (nvJPEG on CUDA, libjpeg-turbo on the CPU), DALI (libjpeg-turbo on the CPU, nvJPEG and
the hardware decoder on CUDA) and PIL. Anything else is re-encoded (`stored_form`) as a baseline
8-bit YCbCr JPEG with 4:2:0 chroma, and the manifest says which file and why. What they read
differently:

- EXIF orientation (2 to 8): DALI and TorchCodec turn the picture, simplejpeg and PIL do not. It is
  applied (`PIL.ImageOps.exif_transpose`) and the re-encoded file carries no EXIF at all.
- Frames other than baseline Huffman, 8 bits (SOF0): progressive, extended sequential, lossless and
  arithmetic-coded JPEGs; nvJPEG's hardware decoder takes baseline only, libjpeg builds differ on
  arithmetic coding. 12-bit JPEGs do not decode in PIL and are skipped.
- Colour layouts other than YCbCr: grayscale, CMYK and YCCK (Adobe's inverted CMYK), and 3-component
  JPEGs whose Adobe marker says RGB without a colour transform.
- Chroma subsampling other than 4:2:0 and 4:4:4 (4:2:2, 4:4:0, 4:1:1): chroma upsampling is where
  nvJPEG and libjpeg-turbo differ (DALI's jpeg_fancy_upsampling covers 4:2:0).
- Other formats (PNG, WebP, a PNG named .jpg, ...): only PIL reads them.

ICC profiles are applied by none of these decoders, so they do not make them differ; a re-encoded
image keeps its profile. generate.py puts the user's photos through `stored_form` too, so a photo
reaches the model as the same photo sharded and loaded would.

MAX_PIXELS bounds every decode: a header is read before any pixel, and an image of more pixels is
refused in one line (`TooManyPixels`) instead of allocating what its header claims.
"""

import io
import warnings

from PIL import Image, ImageOps, JpegImagePlugin

# PIL's own warning threshold (1024**3 / 4 / 3 pixels, 256 MiB of RGB): over any phone's photo of today but
# its largest; prep/shard.py, generate.py and the torch loader refuse more before decoding.
MAX_PIXELS = 89_478_485
DEFAULT_QUALITY = 95  # prep/shard.py's --quality: of re-encoded images, and of photos generate.py reads
ORIENTATION = 0x0112  # the EXIF tag
SOF_NAMES = {0xC1: "extended sequential", 0xC2: "progressive", 0xC3: "lossless", 0xC5: "differential",
             0xC6: "differential progressive", 0xC7: "differential lossless", 0xC9: "arithmetic-coded",
             0xCA: "arithmetic-coded progressive", 0xCB: "arithmetic-coded lossless", 0xCD: "arithmetic-coded",
             0xCE: "arithmetic-coded progressive", 0xCF: "arithmetic-coded lossless"}
SAMPLING_NAMES = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}


class TooManyPixels(ValueError):
    """An image whose header claims more than MAX_PIXELS pixels, refused before it is decoded."""


def check_pixels(width: int, height: int, what: str = "the image") -> None:
    if width * height > MAX_PIXELS:
        raise TooManyPixels(f"{what} is {width}x{height} pixels by its header, more than the {MAX_PIXELS:,} "
                            "this project decodes; shrink it first")


def open_image(data: bytes, what: str = "the image") -> Image.Image:
    """PIL's lazy open of `data`, its header checked against MAX_PIXELS before anything is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is the bound here
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            image = None
    if image is None:  # over twice PIL's bound, where PIL stops without saying the size
        frame = jpeg_frame(data)
        if frame is not None:
            check_pixels(frame[3], frame[2], what)
        raise TooManyPixels(f"{what} is more than {2 * MAX_PIXELS:,} pixels by its header, more than the "
                            f"{MAX_PIXELS:,} this project decodes; shrink it first")
    check_pixels(*image.size, what)
    return image


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(SOF marker, sample precision, height, width) of a JPEG's frame header, or None when the markers do
    not lead to one."""
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                return None
            return (marker, data[pos + 4], int.from_bytes(data[pos + 5:pos + 7], "big"),
                    int.from_bytes(data[pos + 7:pos + 9], "big"))
        if marker == 0xDA:  # scan data before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def differences(image: Image.Image, data: bytes) -> list[str]:
    """Why decoders could read the decoded `image` (from the bytes `data`) differently, in words; [] when
    every decoder reads it alike."""
    problems = []
    if image.format != "JPEG":
        problems.append(f"{image.format} data, not JPEG")
    else:
        frame = jpeg_frame(data)
        if frame is None:
            problems.append("no JPEG frame header found before the image data")
        else:
            marker, precision, _, _ = frame
            if marker != 0xC0:
                problems.append(f"{SOF_NAMES[marker]} JPEG")
            if precision != 8:
                problems.append(f"{precision}-bit samples")
        if image.mode != "RGB":
            problems.append(f"mode {image.mode}, not RGB")
        elif image.info.get("adobe_transform", 1) != 1:
            problems.append("RGB stored without the YCbCr transform (Adobe marker)")
        elif (sampling := JpegImagePlugin.get_sampling(image)) not in (0, 2):
            problems.append(f"chroma subsampling {SAMPLING_NAMES.get(sampling, 'unusual')}, not 4:2:0 or 4:4:4")
    orientation = image.getexif().get(ORIENTATION, 1)
    if orientation != 1:
        problems.append(f"EXIF orientation {orientation}")
    return problems


def stored_form(data: bytes, quality: int, what: str = "the image") -> tuple[bytes, list[str]]:
    """(JPEG bytes every decoder reads alike, what was changed and why): `data` itself and [] when it is such
    a JPEG already, else the fully decoded image, EXIF orientation applied, as a baseline RGB JPEG of
    `quality` (4:2:0, PIL's default) without EXIF. Raises TooManyPixels before decoding an image over
    MAX_PIXELS, and PIL's errors (OSError, ValueError, SyntaxError, ...) for data that does not decode."""
    image = open_image(data, what)
    image.load()  # a full decode: truncation only shows here
    problems = differences(image, data)
    if not problems:
        return data, []
    upright = ImageOps.exif_transpose(image)  # a copy, turned as its EXIF orientation says
    out = io.BytesIO()
    upright.convert("RGB").save(out, "JPEG", quality=quality, icc_profile=image.info.get("icc_profile"))
    return out.getvalue(), problems
