"""Import shim (see ../../README.md)."""

import enum


class InterpolationMode(enum.Enum):  # transformers' image utilities import it
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"
