"""The model store on the board's disk: one folder per model version and an atomic `current` pointer.

    <root>/models/<name>/v<version>/   an extracted, verified bundle
    <root>/models/<name>/current       symlink to the serving version, switched by rename
    <root>/incoming/                   partial downloads

A crash at any moment leaves `current` pointing at the old version or the new one:
the new folder is complete before the pointer moves (see bundle.extract), and the
pointer moves by renaming a fresh symlink over the old one, which is atomic on POSIX.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .bundle import Manifest, OpenedBundle, extract, read_installed_manifest
from .errors import BundleError, VersionError

log = logging.getLogger(__name__)


class Store:
    def __init__(self, root: str | os.PathLike, keep_versions: int = 3):
        self.root = Path(root)
        self.keep_versions = keep_versions
        self.models_dir = self.root / "models"
        self.incoming = self.root / "incoming"
        for d in (self.models_dir, self.incoming):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._clean_leftovers()

    def _clean_leftovers(self) -> None:
        """Half-extracted folders and stale pointer temp files from a crash are removed at start."""
        for model_dir in self.models_dir.iterdir():
            for entry in model_dir.iterdir() if model_dir.is_dir() else ():
                if entry.name.startswith("."):
                    log.info("removing leftover %s from an interrupted install", entry)
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)

    def version_dir(self, name: str, version: int) -> Path:
        return self.models_dir / name / f"v{version}"

    def names(self) -> list[str]:
        return sorted(p.parent.name for p in self.models_dir.glob("*/current") if p.is_symlink())

    def current(self, name: str) -> tuple[int, Path] | None:
        link = self.models_dir / name / "current"
        if not link.is_symlink():
            return None
        target = self.models_dir / name / os.readlink(link)
        if not target.is_dir():
            log.warning("store: %s/current points at missing %s", name, target.name)
            return None
        return read_installed_manifest(target).version, target

    def versions(self, name: str) -> list[int]:
        out = []
        for p in (self.models_dir / name).glob("v*"):
            if p.is_dir() and p.name[1:].isdigit():
                out.append(int(p.name[1:]))
        return sorted(out)

    def install(self, bundle: OpenedBundle) -> Path:
        """Extract a verified bundle as a new version (not yet current). Anti-rollback: must be newer."""
        m: Manifest = bundle.manifest
        cur = self.current(m.name)
        if cur is not None and m.version <= cur[0]:
            raise VersionError(f"{m.name} version {m.version} is not newer than the installed version {cur[0]}",
                               "bump the version when you convert (edgeward convert --version N)")
        dest = self.version_dir(m.name, m.version)
        if dest.exists():
            # An earlier, never-activated attempt at the same version: replace it.
            shutil.rmtree(dest)
        return extract(bundle, dest)

    def set_current(self, name: str, version: int) -> None:
        target = self.version_dir(name, version)
        if not target.is_dir():
            raise BundleError(f"{name} v{version} is not in the store")
        link = self.models_dir / name / "current"
        tmp = link.with_name(f".current.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        os.replace(tmp, link)
        fd = os.open(link.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_version(self, name: str, version: int) -> None:
        cur = self.current(name)
        if cur is not None and cur[0] == version:
            raise BundleError(f"{name} v{version} is serving and cannot be removed")
        shutil.rmtree(self.version_dir(name, version), ignore_errors=True)

    def prune(self, name: str) -> list[int]:
        """Keep the newest `keep_versions` versions (the current one always); return those removed."""
        cur = self.current(name)
        versions = self.versions(name)
        keep = set(versions[-self.keep_versions:])
        if cur is not None:
            keep.add(cur[0])
        removed = [v for v in versions if v not in keep]
        for v in removed:
            shutil.rmtree(self.version_dir(name, v), ignore_errors=True)
        return removed
