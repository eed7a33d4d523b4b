from _cpu_import_shim import unavailable
from torchvision.transforms import InterpolationMode  # noqa: F401 (SGLang imports it from here too)

pil_to_tensor = unavailable("torchvision.transforms.functional.pil_to_tensor")
