"""Typed hand-offs between stages: a stage writes its result as a JSON report (reports/*.json, a DVC
output), and the next stage, the flow and the summary read it back as the same type, never as a bare dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict

from pipeline.core.files import read_report, write_json


class Report(BaseModel):
    # Reports written by an older tollgate may carry keys this one dropped: they are ignored, not refused.
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    def write(self, path: str | Path) -> None:
        write_json(path, self.model_dump(mode="json", by_alias=True))

    @classmethod
    def read(cls, path: str | Path) -> Self | None:
        """The report at `path`, or None when its stage has not written one (yet)."""
        data = read_report(path)
        return cls.model_validate(data) if data else None

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """The report at `path`, which its stage must have written (a stage's own input)."""
        found = cls.read(path)
        if found is None:
            raise FileNotFoundError(f"{path} is missing or empty: run the stage that writes it first")
        return found
