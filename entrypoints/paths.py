"""Container paths, all derived from one base directory (SageMaker's `/opt/ml` by default).

Nothing here touches the file system or the environment at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE_DIR = "/opt/ml"


@dataclass(frozen=True)
class ContainerPaths:
    base: Path

    @property
    def hyperparameters_file(self) -> Path:
        return self.base / "input" / "config" / "hyperparameters.json"

    @property
    def input_data_dir(self) -> Path:
        return self.base / "input" / "data"

    def channel_dir(self, channel: str) -> Path:
        return self.input_data_dir / channel

    @property
    def model_dir(self) -> Path:
        """SageMaker uploads this folder to the job's output location when the job ends."""
        return self.base / "model"

    @property
    def checkpoint_dir(self) -> Path:
        """SageMaker syncs this folder with `checkpoint_s3_uri` (and restores it after a spot restart)."""
        return self.base / "checkpoints"

    @property
    def work_dir(self) -> Path:
        """Scratch space for downloads and the merge; on SageMaker it sits on the ML storage volume."""
        return self.base / "work"

    @property
    def failure_file(self) -> Path:
        return self.base / "output" / "failure"


def container_paths(base_dir: str | Path = DEFAULT_BASE_DIR) -> ContainerPaths:
    return ContainerPaths(Path(base_dir))
