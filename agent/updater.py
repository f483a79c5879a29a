"""Installing a bundle on the board: verify, stage, shadow-load, self-test, switch.

Every step can fail, and every failure leaves the previously serving model serving
and nothing half-written in the store: a version folder that never became current
is removed, a shadow model that failed its self-test is closed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .bundle import open_bundle
from .engine import Engine, LoadedModel
from .errors import EdgewardError, ModelNotFound, VersionError
from .store import Store

log = logging.getLogger(__name__)

# emit(kind, message, level="info", model=None, version=None, data=None)
Emit = Callable[..., None]


@dataclass
class Trust:
    keys: list        # signing.PublicKey objects
    allow_unsigned: bool = False


class Updater:
    def __init__(self, store: Store, engine: Engine, trust: Trust, max_bundle_bytes: int, emit: Emit):
        self.store = store
        self.engine = engine
        self.trust = trust
        self.max_bundle_bytes = max_bundle_bytes
        self.emit = emit

    def install(self, path: str | Path) -> dict:
        """Run the whole pipeline on a bundle file; return what is now serving, or raise why not."""
        opened = open_bundle(path, self.trust.keys, self.trust.allow_unsigned, self.max_bundle_bytes)
        m = opened.manifest
        self.emit("deploy_verified", f"{m.name} v{m.version}: signature and hashes verified",
                  model=m.name, version=m.version, data={"signer": opened.signer})
        folder = self.store.install(opened)
        self.emit("deploy_staged", f"{m.name} v{m.version} unpacked to the store", model=m.name, version=m.version)
        try:
            model, selftest = self._load_tested(folder)
        except BaseException:
            self.store.remove_version(m.name, m.version)
            raise
        self.emit("deploy_self_test_passed", f"{m.name} v{m.version} reproduced its reference outputs",
                  model=m.name, version=m.version, data=selftest)
        return self._serve(model, selftest)

    def _load_tested(self, folder: Path) -> tuple[LoadedModel, dict]:
        """Shadow-load a model under the budget and self-test it; nothing stays loaded if either fails."""
        model = self.engine.load(folder)
        try:
            return model, model.self_test()
        except BaseException:
            model.close()
            raise

    def _serve(self, model: LoadedModel, selftest: dict) -> dict:
        """Switch to a tested model; what the deploy or rollback reply reports."""
        previous = self.activate(model)
        return {"name": model.name, "version": model.version, "previous_version": previous,
                "cost_mb": round(model.cost_mb, 1), "self_test": selftest}

    def activate(self, model: LoadedModel) -> int | None:
        """Point the store at the model's version, let it serve, release the one it replaces."""
        self.store.set_current(model.name, model.version)
        old = self.engine.activate(model)
        if old is not None:
            old.close()
        removed = self.store.prune(model.name)
        self.emit("model_switched", f"{model.name} v{model.version} is serving"
                  + (f" (was v{old.version})" if old else ""),
                  model=model.name, version=model.version,
                  data={"previous_version": old.version if old else None, "pruned_versions": removed})
        return old.version if old else None

    def rollback(self, name: str, version: int | None = None) -> dict:
        """Serve an older installed version again: shadow-load, self-test, switch (anti-rollback is bypassed
        on purpose: this is the explicit way back). The newer version stays in the store."""
        cur = self.store.current(name)
        if cur is None:
            raise ModelNotFound(f"no model named {name!r} is installed")
        older = [v for v in self.store.versions(name) if v < cur[0]]
        if version is None:
            if not older:
                raise VersionError(f"{name} v{cur[0]} has no older version in the store to go back to",
                                   "deploy the version you want (the store keeps store.keep_versions versions)")
            version = older[-1]
        elif version not in older:
            raise VersionError(f"{name} v{version} is not an older installed version (installed: "
                               f"{', '.join(map(str, self.store.versions(name)))}; serving v{cur[0]})")
        self.emit("rollback_started", f"{name}: going back from v{cur[0]} to v{version}", model=name, version=version)
        return self._serve(*self._load_tested(self.store.version_dir(name, version)))

    def load_current(self) -> list[LoadedModel]:
        """At start: load and self-test what the store says is current; report what fails, go on."""
        loaded = []
        for name in self.store.names():
            cur = self.store.current(name)
            if cur is None:
                continue
            version, folder = cur
            try:
                model, _ = self._load_tested(folder)
            except EdgewardError as exc:
                kind = "load_refused" if exc.code == "over_budget" else "load_failed"
                self.emit(kind, str(exc), level="error", model=name, version=version, data={"code": exc.code})
                continue
            self.engine.activate(model)
            self.emit("model_loaded", f"{name} v{version} is serving ({model.cost_mb:.1f} MB)",
                      model=name, version=version, data={"cost_mb": round(model.cost_mb, 1)})
            loaded.append(model)
        return loaded
