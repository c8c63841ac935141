"""Where each loader crops and what size it produces: one definition so every loader agrees.

The usual CelebA-64 protocol takes the central 148x148 of the 178x218 aligned face and resizes it
to 64x64 with antialiasing. `crop="none"` squashes the whole frame to 64x64 as the original seed
code did (faces come out slightly stretched vertically).
"""

IMAGE_SIZE = 64
CROP_SIDE, CROP_OF = 148, 178  # the crop's side over the frame's shorter side: 148 px of CelebA's 178x218 frames
CROP_FRACTION = CROP_SIDE / CROP_OF
CROPS = ("center", "none")


def crop_box(width: int, height: int, crop: str = "center") -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the region that becomes the 64x64 image."""
    if crop == "none":
        return 0, 0, width, height
    if crop != "center":
        raise ValueError(f"crop must be one of {CROPS}, not {crop!r}")
    side = round(min(width, height) * CROP_FRACTION)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side

# The version of the pixels the loaders make. Raise it with any change that alters them (the crop,
# a decode or a resize): decoded files beside the shards (pipeline/cache_file.py) from before then
# no longer match and are decoded again.
PIXELS_VERSION = 1
