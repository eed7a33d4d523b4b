"""Import shim (see ../../../README.md)."""
