"""The adapter registry: which names the server knows, which are in memory, and LRU eviction.

* **Known** adapters: those already in the model when the app is created (kept resident, never evicted:
  there is no file to reload them from), the ``adapters`` of the settings (NAME -> PATH), and every
  valid ``<adapter_dir>/<name>`` directory. All are read and validated at start.
* **Resident** adapters are registered in the model. At most ``max_resident_adapters`` are resident,
  holding at most ``max_adapter_bytes`` together (`adapter_bytes`: parameters plus the prompt keys/values
  the engine keeps per adapter); a request naming a known adapter that is not resident loads it, evicting
  least recently used adapters that no queued or running request uses (requests *pin* their adapter from
  before they are queued until their last token) until both bounds hold. When every resident adapter is
  pinned, the request waits for one to be released (at most ``adapter_wait_s``, then 503).
* **Loading never stalls other adapters**: files are read and checked on a worker thread; only the
  final registration (a dictionary insert) runs on the model thread, between two decoding steps.
* **Admin names** are resolved strictly inside ``adapter_dir``: the name must be a valid adapter name
  (`softprompt.engine.adapter_name`) and its resolved path (symlinks followed) must stay inside.

All registry state is touched only from the event loop (and at start, before serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softprompt.adapters.peft_format import CONFIG_FILE, read_adapter
from softprompt.adapters.training_format import TrainingFormat
from softprompt.engine.adapter_name import TASK_SEPARATOR, check_adapter_name
from softprompt.engine.families import ModelShape
from softprompt.errors import ConfigError, SoftPromptError
from softprompt.server.schemas import APIError, ModelCard

log = logging.getLogger("softprompt.server")


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: str | None  # None: registered in code before the app was created; never evicted
    method: str | None = None
    num_virtual_tokens: int | None = None
    training_format: TrainingFormat | None = None  # what training recorded: template and label words
    nbytes: int = 0  # `adapter_bytes` of the adapter last read for it
    resident: bool = False
    users: int = 0  # queued or running requests that name it
    last_used: float = 0.0
    loading: asyncio.Future | None = None
    removed: bool = False  # unloaded by an admin while in use: dropped from the model once idle
    created: int = field(default_factory=lambda: int(time.time()))
    num_tasks: int = 0  # tasks a request picks from as ``model: NAME:TASK`` (multitask adapters)

    def describe(self, adapter) -> AdapterEntry:
        """Take what requests are checked against from ``adapter`` (read from its files, or in the model)."""
        self.method, self.num_virtual_tokens = adapter.config.method, adapter.num_virtual_tokens
        self.training_format, self.num_tasks = adapter.training_format, adapter.num_tasks
        return self


def check_task(entry: AdapterEntry, task: str) -> None:
    """400 unless ``task`` (what follows ':' in the request's ``model``) is one of ``entry``'s tasks."""
    name, count = entry.name, entry.num_tasks
    if not count:
        raise APIError(400, f"model: adapter {name!r} has no tasks; name it as {name!r}", param="model")
    if not task.isdigit() or not task.isascii() or int(task) >= count:
        what = f"task {task!r} is not one of its tasks" if task else "it has tasks"
        raise APIError(
            400,
            f"model: adapter {name!r} is multitask ({count} tasks) and {what}; name one as {name}:TASK with TASK "
            f"0 to {count - 1}",
            param="model",
            code="invalid_task",
        )


def adapter_bytes(adapter, shape: ModelShape, dtype: torch.dtype) -> int:
    """What serving ``adapter`` holds in memory: its parameters and buffers, plus the prompt keys/values the engine
    keeps for it in the model's dtype (layers x 2 x kv_heads x head_dim x virtual tokens)."""
    tensors = itertools.chain(adapter.parameters(), adapter.buffers())
    own = sum(t.numel() * t.element_size() for t in tensors)
    kv = shape.num_layers * 2 * shape.num_key_value_heads * shape.head_dim * adapter.num_virtual_tokens
    return own + kv * dtype.itemsize


def read_frozen(model, path: str):
    """Read and check an adapter directory for ``model`` (`read_adapter`: nothing touches the live model, so
    any thread may) and make it ready to serve: frozen, in eval mode, on the model's device, so that
    registering it on the model thread is only a dictionary insert."""
    adapter = read_adapter(path, model.shape)
    return adapter.to(model.device).requires_grad_(False).eval()


def install(model, name: str, adapter) -> None:
    """Register ``adapter`` under ``name`` (replacing one of that name). Model thread only."""
    if name in model.adapters:
        model.remove_adapter(name)
    model.register(name, adapter)


def uninstall(model, name: str) -> None:
    if name in model.adapters:
        model.remove_adapter(name)


class AdapterRegistry:
    def __init__(self, model, settings, base_name: str, metrics=None):
        self.model = model
        self.settings = settings
        self.base_name = base_name
        self.metrics = metrics
        self.entries: dict[str, AdapterEntry] = {}
        self.batcher = None
        self._waiters: list[asyncio.Future] = []
        self._detached: set[AdapterEntry] = set()  # unloaded by an admin but still in use: hold room until released
        self.adapter_dir = Path(settings.adapter_dir).expanduser().resolve() if settings.adapter_dir else None

    # -------------------------------------------------------------- start
    def bootstrap(self) -> None:
        """Register every known adapter and load up to the residency limit. Before serving only."""
        for name in self.model.adapter_names():
            self._check_not_base(name, ConfigError)
            adapter = self.model.adapters[name]
            self.entries[name] = AdapterEntry(name, None, resident=True).describe(adapter)
            self.entries[name].nbytes = self._bytes_of(adapter)
        candidates: list[tuple[str, str, bool]] = []
        for name, path in self.settings.adapters.items():
            if name in self.entries:
                raise ConfigError(f"--adapter {name}: the name is already registered in the model")
            candidates.append((name, str(path), True))
        if self.adapter_dir is not None:
            given = {n for n, _, _ in candidates} | set(self.entries)
            for child in sorted(self.adapter_dir.iterdir()):
                if child.name in given or check_adapter_name(child.name) or not (child / CONFIG_FILE).is_file():
                    continue
                if not self._inside(child, self.adapter_dir):
                    log.warning("adapter dir: %s resolves outside %s; skipped", child.name, self.adapter_dir)
                    continue
                candidates.append((child.name, str(child), False))
        if candidates and len(self.entries) >= self.settings.max_resident_adapters:
            raise ConfigError(
                f"--max-resident-adapters ({self.settings.max_resident_adapters}) leaves no room for "
                f"adapters loaded from files: {len(self.entries)} adapters are already in the model"
            )
        limit = self.settings.max_adapter_bytes
        if limit is not None and self._held_bytes() > limit:
            raise ConfigError(
                f"--max-adapter-bytes ({limit}) is below the {self._held_bytes()} bytes of the adapters already "
                "in the model"
            )
        for name, path, explicit in candidates:
            self._check_not_base(name, ConfigError)
            try:
                adapter = read_frozen(self.model, path)
            except SoftPromptError as exc:
                if explicit:
                    raise
                log.warning("adapter dir: %s skipped: %s", name, exc)
                continue
            entry = AdapterEntry(name, path).describe(adapter)
            entry.nbytes = self._bytes_of(adapter)
            too_big = self._too_big(entry.nbytes)
            if too_big:
                if explicit:
                    raise ConfigError(f"--adapter {name}: {too_big}")
                log.warning("adapter dir: %s skipped: %s", name, too_big)
                continue
            self.entries[name] = entry
            if self._has_room(entry):
                install(self.model, name, adapter)
                entry.resident = True
                self._count_load()
        self._update_gauge()

    def attach(self, batcher) -> None:
        self.batcher = batcher

    # -------------------------------------------------------------- lookup
    def _check_not_base(self, name: str, error=ConfigError) -> None:
        if name == self.base_name:
            raise error(f"adapter name {name!r} is the base model's served name; pick another name")

    def resolve(self, model_field: str) -> AdapterEntry | None:
        """The entry a request's ``model`` names (None = the base model); 404 when unknown. A multitask adapter's
        task is named as ``NAME:TASK`` (400 when it is missing or not one of its tasks)."""
        if model_field == self.base_name:
            return None
        name, task = model_field.partition(TASK_SEPARATOR)[::2]
        entry = self.entries.get(name)
        if entry is not None and (entry.num_tasks or task):
            check_task(entry, task)
        if entry is None:
            known = sorted(self.entries)
            shown = ", ".join([self.base_name] + known[:20]) + (", ..." if len(known) > 20 else "")
            raise APIError(
                404,
                f"The model {model_field!r} does not exist: name the base model or a loaded "
                f"adapter ({shown}); GET /v1/models lists them",
                param="model",
                code="model_not_found",
            )
        return entry

    def cards(self) -> list[ModelCard]:
        created = int(time.time())
        cards = [ModelCard(id=self.base_name, created=created, root=self.base_name, parent=None)]
        for entry in sorted(self.entries.values(), key=lambda e: e.name):
            cards.append(
                ModelCard(
                    id=entry.name,
                    created=entry.created,
                    root=self.base_name,
                    parent=self.base_name,
                    method=entry.method,
                    num_virtual_tokens=entry.num_virtual_tokens,
                    template=entry.training_format.template if entry.training_format else None,
                    resident=entry.resident,
                    num_tasks=entry.num_tasks or None,
                )
            )
        return cards

    def resident_count(self) -> int:
        return sum(e.resident for e in self.entries.values())

    # -------------------------------------------------------------- pinning
    async def acquire(self, entry: AdapterEntry | None) -> None:
        """Pin ``entry`` for a request and make sure it is in memory (loading it if needed)."""
        if entry is None:
            return
        if entry.removed or self.entries.get(entry.name) is not entry:
            raise APIError(404, f"The model {entry.name!r} was unloaded", param="model", code="model_not_found")
        entry.users += 1
        entry.last_used = time.monotonic()
        try:
            await self._make_resident(entry)
        except BaseException:
            self.release(entry)
            raise

    def release(self, entry: AdapterEntry | None) -> None:
        if entry is None:
            return
        entry.users -= 1
        entry.last_used = time.monotonic()
        if entry.users == 0 and entry.removed:
            self._drop_from_model(entry)
        self._notify()

    async def _make_resident(self, entry: AdapterEntry, adapter=None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.adapter_wait_s
        while not entry.resident:
            if entry.removed or self.entries.get(entry.name) is not entry:
                raise APIError(404, f"The model {entry.name!r} was unloaded", param="model", code="model_not_found")
            if entry.loading is not None:
                await asyncio.shield(entry.loading)
                continue
            if not self._has_room(entry):
                victim = self._victim()
                if victim is not None:
                    self._evict(victim)
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    if self.metrics:
                        self.metrics.rejected.labels(reason="adapter_slots_busy").inc()
                    raise APIError(
                        503,
                        f"no room for adapter {entry.name!r}: the resident adapters ({self._bounds()}) are all "
                        "in use by running requests; retry shortly",
                        code="adapter_slots_busy",
                        headers={"Retry-After": str(self.settings.retry_after_s)},
                    )
                await self._wait(left)
                continue
            entry.loading = loop.create_future()
            try:
                if adapter is None:
                    assert entry.path is not None  # only adapters read from files are ever evicted
                    adapter = await asyncio.to_thread(read_frozen, self.model, entry.path)
                await self._on_model_thread(install, self.model, entry.name, adapter)
            except BaseException as exc:
                error = (
                    exc
                    if isinstance(exc, APIError)
                    else APIError(500, f"adapter {entry.name!r} could not be loaded: {exc}", code="adapter_load_failed")
                )
                entry.loading.set_exception(error)
                entry.loading.exception()
                entry.loading = None
                self._notify()
                raise error from None
            entry.resident = True
            # The file may have changed since it was measured; a next load evicts down to the bound again.
            entry.nbytes = self._bytes_of(adapter)
            entry.describe(adapter)
            entry.loading.set_result(None)
            entry.loading = None
            self._count_load()
            self._update_gauge()
            self._notify()

    def _holding(self) -> list[AdapterEntry]:
        """Entries that take room: resident, loading, or unloaded by an admin while still in use."""
        return [e for e in self.entries.values() if e.resident or e.loading is not None] + list(self._detached)

    def _occupied(self) -> int:
        return len(self._holding())

    def _held_bytes(self) -> int:
        return sum(e.nbytes for e in self._holding())

    def _bytes_of(self, adapter) -> int:
        return adapter_bytes(adapter, self.model.shape, self.model.dtype)

    def _has_room(self, entry: AdapterEntry) -> bool:
        """Whether ``entry`` (not yet holding room) fits beside the holders under both bounds."""
        limit = self.settings.max_adapter_bytes
        if self._occupied() >= self.settings.max_resident_adapters:
            return False
        return limit is None or self._held_bytes() + entry.nbytes <= limit

    def _bounds(self) -> str:
        shown = f"--max-resident-adapters {self.settings.max_resident_adapters}"
        limit = self.settings.max_adapter_bytes
        return shown + (f", --max-adapter-bytes {limit}" if limit is not None else "")

    def _too_big(self, nbytes: int) -> str | None:
        """Why an adapter costing ``nbytes`` can never be resident (alone above the byte bound), or None."""
        limit = self.settings.max_adapter_bytes
        if limit is not None and nbytes > limit:
            return f"needs {nbytes} bytes resident, above --max-adapter-bytes ({limit})"
        return None

    def _victim(self) -> AdapterEntry | None:
        idle = [
            e for e in self.entries.values() if e.resident and e.users == 0 and e.path is not None and e.loading is None
        ]
        return min(idle, key=lambda e: e.last_used) if idle else None

    def _evict(self, entry: AdapterEntry) -> None:
        entry.resident = False
        self._post(uninstall, self.model, entry.name)
        if self.metrics:
            self.metrics.adapter_evictions.inc()
        log.info("adapter %s evicted (least recently used)", entry.name)
        self._update_gauge()

    def _drop_from_model(self, entry: AdapterEntry) -> None:
        entry.removed = False
        if entry.resident:
            entry.resident = False
            self._detached.discard(entry)
            # Only remove it from the model if no new adapter of that name has taken its place.
            if entry.name not in self.entries:
                self._post(uninstall, self.model, entry.name)
        self._update_gauge()

    async def _wait(self, timeout: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            if future in self._waiters:
                self._waiters.remove(future)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def _on_model_thread(self, fn, *args):
        if self.batcher is None:
            return fn(*args)
        return await self.batcher.call(lambda: fn(*args))

    def _post(self, fn, *args) -> None:
        if self.batcher is None:
            fn(*args)
        else:
            self.batcher.post(lambda: fn(*args))

    def _count_load(self) -> None:
        if self.metrics:
            self.metrics.adapter_loads.inc()

    def _update_gauge(self) -> None:
        if self.metrics:
            self.metrics.adapters_resident.set(self.resident_count() + len(self._detached))
            self.metrics.adapter_bytes.set(self._held_bytes())
            # per adapter; an admin-unloaded entry still in use counts under its name beside its successor
            per_adapter: dict[str, int] = {}
            for entry in self._holding():
                per_adapter[entry.name] = per_adapter.get(entry.name, 0) + entry.nbytes
            self.metrics.adapter_resident_bytes.clear()  # adapters no longer held drop their series
            for name, nbytes in per_adapter.items():
                self.metrics.adapter_resident_bytes.labels(adapter=name).set(nbytes)

    # -------------------------------------------------------------- admin
    @staticmethod
    def _inside(path: Path, directory: Path) -> bool:
        resolved = path.resolve()
        return resolved != directory and resolved.is_relative_to(directory)

    def admin_path(self, name: str) -> Path:
        """``<adapter_dir>/<name>``, refusing bad names and anything that resolves outside the directory."""
        problem = check_adapter_name(name)
        if problem:
            raise APIError(400, f"{problem} (names only, never paths)", param="name")
        if self.adapter_dir is None:
            raise APIError(400, "the server was started without --adapter-dir; nothing can be loaded by name")
        path = self.adapter_dir / name
        if not self._inside(path, self.adapter_dir):
            raise APIError(400, f"adapter name {name!r} resolves outside --adapter-dir; refused", param="name")
        if not path.is_dir():
            raise APIError(
                404, f"no adapter directory {name!r} in --adapter-dir", param="name", code="adapter_not_found"
            )
        return path

    async def admin_load(self, name: str) -> AdapterEntry:
        """Load (or reload) ``<adapter_dir>/<name>`` and make it resident."""
        path = self.admin_path(name)
        self._check_not_base(name, lambda msg: APIError(400, msg, param="name"))
        try:
            adapter = await asyncio.to_thread(read_frozen, self.model, str(path))
        except SoftPromptError as exc:
            raise APIError(400, f"adapter {name!r} could not be loaded: {exc}", code="adapter_invalid") from None
        nbytes = self._bytes_of(adapter)
        too_big = self._too_big(nbytes)
        if too_big:
            raise APIError(400, f"adapter {name!r} {too_big}", param="name", code="adapter_too_large")
        entry = self.entries.get(name)
        if entry is not None and entry.loading is not None:
            with contextlib.suppress(APIError):
                await asyncio.shield(entry.loading)
        entry = self.entries.get(name)
        if entry is not None and entry.resident:  # reload in place: running rows keep their cached prefix
            await self._on_model_thread(install, self.model, name, adapter)
            entry.path = str(path)
            entry.describe(adapter)
            entry.nbytes = nbytes  # a next load evicts down to the byte bound if this grew
            entry.last_used = time.monotonic()
            self._count_load()
            self._update_gauge()
            return entry
        if entry is None:
            entry = AdapterEntry(name, str(path))
            self.entries[name] = entry
        entry.path, entry.nbytes = str(path), nbytes
        entry.users += 1  # pinned while it loads, so it is not the victim of its own load
        entry.last_used = time.monotonic()
        try:
            await self._make_resident(entry, adapter)
        except BaseException:
            if not entry.resident and self.entries.get(name) is entry:
                del self.entries[name]
            raise
        finally:
            self.release(entry)
        return entry

    async def admin_unload(self, name: str) -> None:
        problem = check_adapter_name(name)
        if problem:
            raise APIError(400, problem, param="name")
        entry = self.entries.get(name)
        if entry is None:
            raise APIError(404, f"no adapter named {name!r} is registered", param="name", code="model_not_found")
        if entry.loading is not None:
            with contextlib.suppress(APIError):
                await asyncio.shield(entry.loading)
        if self.entries.get(name) is not entry:
            raise APIError(404, f"no adapter named {name!r} is registered", param="name", code="model_not_found")
        del self.entries[name]
        if entry.resident:
            if entry.users == 0:
                entry.resident = False
                self._post(uninstall, self.model, name)
            else:  # in use: requests already queued finish with it, then it leaves the model
                entry.removed = True
                self._detached.add(entry)
        self._update_gauge()
        self._notify()
