"""Writing a report (the benchmark's, the drafter quality one): JSON for tools, PNG for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def save_report(report: dict, out_dir: Path | None, stem: str, plot: Callable[[dict, Path], None]) -> None:
    """``out_dir/stem.json`` and ``out_dir/stem.png`` (nothing when ``out_dir`` is None)."""
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(report, out_dir / f"{stem}.png")
