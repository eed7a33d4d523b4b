"""Import shim (see ../../../README.md): SGLang imports this module; nothing of it is used."""
