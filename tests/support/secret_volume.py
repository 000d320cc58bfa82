"""A directory laid out the way kubelet mounts a Secret, with kubelet's atomic update.

kubelet's AtomicWriter writes a new ``..<timestamp>`` directory, points a ``..data_tmp`` symlink at
it and renames that over ``..data``; the visible ``tls.crt`` and ``tls.key`` are symlinks through
``..data``. A reader therefore sees either the old or the new generation of each file, never a torn
file, but may read the old certificate and the new key when a swap lands between two reads.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

_generation = itertools.count()


class SecretVolume:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, files: dict[str, bytes]) -> None:
        """Publish a new generation of ``files`` atomically."""
        data_link = self.root / "..data"
        old = os.readlink(data_link) if data_link.is_symlink() else None
        gen = f"..2024_01_01_00_00_00.{os.getpid()}{next(_generation):06d}"
        (self.root / gen).mkdir()
        for name, content in files.items():
            (self.root / gen / name).write_bytes(content)
        tmp = self.root / "..data_tmp"
        os.symlink(gen, tmp)
        os.rename(tmp, data_link)  # the atomic switch
        for name in files:
            visible = self.root / name
            if not visible.is_symlink():
                os.symlink(f"..data/{name}", visible)
        if old is not None:
            shutil.rmtree(self.root / old)
