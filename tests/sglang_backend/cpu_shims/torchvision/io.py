import enum

from _cpu_import_shim import unavailable


class ImageReadMode(enum.Enum):  # transformers.image_utils imports it
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


decode_jpeg = unavailable("torchvision.io.decode_jpeg")
decode_image = unavailable("torchvision.io.decode_image")
