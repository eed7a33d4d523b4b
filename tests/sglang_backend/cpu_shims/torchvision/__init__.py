"""Import shim for ``torchvision`` (see ../README.md): SGLang's multimodal helpers import these
names at module level; a text-only engine never calls them."""

__version__ = "0.0.0+cpu-import-shim"
