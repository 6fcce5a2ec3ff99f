"""Metrics: one JSON object per line in <run_dir>/metrics.jsonl, mirrored to accelerate's trackers.

On resume the lines a killed run wrote after its last checkpoint are dropped, so the file always reads as one
uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..fswrite import append_line, finite_json, write_text_atomic


class MetricsLog:
    def __init__(self, path: Path, accelerator=None, enabled: bool = True):
        self.path = Path(path)
        self.accelerator = accelerator
        self.enabled = enabled

    def rewind(self, phase: str, step: int, later_phases=()) -> None:
        """Drop records of `phase` after `step` and all records of `later_phases` (they will be written again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill (or damaged: an undecodable byte is replaced)
            if (record.get("phase") == phase and record.get("step", 0) > step) or record.get("phase") in later_phases:
                continue
            kept.append(line)
        write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_line(self.path, json.dumps(finite_json(record), sort_keys=True, allow_nan=False))  # NaN -> null
        if self.accelerator is not None and self.accelerator.trackers:
            flat = {**record, **{f"{k}/{name}": n for k, v in record.items() if isinstance(v, dict)
                                 for name, n in v.items()}}  # tokens_by_source -> tokens_by_source/code, …
            numbers = {f"{record['phase']}/{k}": v for k, v in flat.items()
                       if isinstance(v, (int, float)) and k not in ("step",)}
            self.accelerator.log(numbers, step=record.get("global_step", record.get("step")))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out
