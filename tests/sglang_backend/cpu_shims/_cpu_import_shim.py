"""The one helper of the shims: a function that names itself and refuses to run."""


def unavailable(qualname: str):
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"{qualname} is a CUDA kernel with no CPU build; this is the CPU test tier's "
                                  "import shim (tests/sglang_backend/cpu_shims), so the code path needs a GPU")

    refuse.__name__ = refuse.__qualname__ = qualname.rsplit(".", 1)[-1]
    return refuse
