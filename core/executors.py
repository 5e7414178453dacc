"""Executors: where the stages' model calls run.

The engine keeps the plan, the queues, the journal and the single writer in the
driver process and hands each batch to an executor:

- ``LocalExecutor`` calls the component in this process, as a run always did.
- ``RayExecutor`` keeps, for each component that holds a local model, a pool of Ray
  actors that each build the component once and run one batch at a time; the
  engine runs one stage thread per actor, so a stage works on several batches at
  once. Everything else (HTTP backends with their own concurrency limits, cheap
  checks) still runs in the driver.

Ids, seeds and images do not depend on the executor; only the order of writes does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .components import Component, Context
from .errors import MissingDependency

if TYPE_CHECKING:
    from .engine import Engine
    from .resolve import ComponentSpec

log = logging.getLogger(__name__)

SECTIONS = {"filter": "filters", "annotator": "annotators"}
# Stages whose components may run on actors; the extractor runs once, in the driver.
ACTOR_STAGES = ("prompter", "generator", "filter", "annotator")
ENGINE_STAGES = {
    "prompt": "prompter",
    "generate": "generator",
    "filter": "filter",
    "annotate": "annotator",
}
DESCRIBE_TIMEOUT = 10.0  # seconds to wait for an actor's describe() or usage()


def settings_key(spec: ComponentSpec) -> str:
    """The component's key in the settings: ``generator``, ``filters.nudenet``..."""
    section = SECTIONS.get(spec.stage)
    return f"{section}.{spec.key}" if section else spec.stage


def ray_temp_dir(out: Path) -> str:
    """A local Ray's session folder for the run in ``out``: short (it holds Unix
    sockets), and the same for every start, so a resumed run clears what a killed
    one left there. The run folder's lock keeps two runs from sharing it."""
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"chatroom-ray-{digest}")


def make_executor(engine: Engine) -> Executor:
    if engine.settings.executor == "ray":
        return RayExecutor(engine)
    return LocalExecutor(engine)


class Executor:
    """Runs one method of a component on one batch; safe to call from many threads."""

    def call(self, spec: ComponentSpec, method: str, *args: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - interface

    def parallel(self, stage: str) -> int:
        """How many batches of an engine stage (``generate``...) may run at once."""
        return 1

    def start(self) -> None:
        """Get ready for calls; the engine calls it before the stages start."""

    def close(self) -> None:
        """Release what the executor started."""


class LocalExecutor(Executor):
    """Calls the engine's own instance of the component, one batch at a time."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def call(self, spec: ComponentSpec, method: str, *args: Any) -> Any:
        # Components need not be thread-safe: one call at a time for each.
        with self._guard:
            lock = self._locks.setdefault(settings_key(spec), threading.Lock())
        with lock:
            return getattr(self.engine.instance(spec), method)(*args)


# --- Ray ---------------------------------------------------------------------------


class ComponentActor:
    """The body of a Ray actor: one component, built once, called batch by batch."""

    def __init__(self, cls: type[Component], options, context: Context, threads: int):
        if threads:
            # Ray starts workers with one intra-op thread; CPU results depend on the
            # count, so apply the component's own setting before anything runs.
            import torch

            torch.set_num_threads(threads)
        self.component = cls(options, context)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.component, method)(*args)

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict[str, Any]:
        return self.component.describe()

    def usage(self) -> dict[str, float]:
        return self.component.usage()

    def close(self) -> None:
        self.component.close()


class ActorPool:
    """The actors of one component; a call takes an idle actor and gives it back."""

    def __init__(self, key: str, actors: list):
        self.key = key
        self.actors = actors
        self._idle: queue.Queue = queue.Queue()
        for actor in actors:
            self._idle.put(actor)

    def call(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import RayTaskError

        actor = self._idle.get()
        try:
            return ray.get(actor.call.remote(method, *args))
        except RayTaskError as exc:
            # The component's own error, not Ray's wrapper: ChatroomError stops the
            # run, anything else fails the batch's items.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        finally:
            self._idle.put(actor)

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors])


class RemoteComponent:
    """Stands in for a component that runs on actors, for run.json and closing."""

    def __init__(self, name: str, pool: ActorPool):
        self.name = name
        self.pool = pool

    def describe(self) -> dict[str, Any]:
        import ray

        actor = self.pool.actors[0]
        info = ray.get(actor.describe.remote(), timeout=DESCRIBE_TIMEOUT)
        return {**info, "ray_actors": len(self.pool.actors)}

    def usage(self) -> dict[str, float]:
        import ray

        each = ray.get(
            [a.usage.remote() for a in self.pool.actors], timeout=DESCRIBE_TIMEOUT
        )
        total: dict[str, float] = {}
        for counts in each:
            for name, value in counts.items():
                if isinstance(value, int | float):
                    total[name] = total.get(name, 0) + value
        return total

    def close(self) -> None:
        import ray

        try:
            ray.get(
                [a.close.remote() for a in self.pool.actors], timeout=DESCRIBE_TIMEOUT
            )
        finally:
            for actor in self.pool.actors:
                ray.kill(actor, no_restart=True)


class RayExecutor(Executor):
    """Runs components that hold a model on pools of Ray actors.

    Ray starts with the stages, and only when some component runs on actors: a
    finished run, or one stopped after its prompts, never starts it.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.settings = engine.settings.ray
        self.local = LocalExecutor(engine)
        self.pools: dict[str, ActorPool] = {}
        self._started = False
        self._start_lock = threading.Lock()
        self._temp_dir: str | None = None

    # --- placement -----------------------------------------------------------------

    def pool_size(self, spec: ComponentSpec) -> int:
        """Actors for this component; 0 runs it in the driver."""
        if spec.stage not in ACTOR_STAGES:
            return 0
        chosen = self.settings.actors.get(SECTIONS.get(spec.stage, spec.stage))
        if isinstance(chosen, dict):  # filters and annotators, by key
            chosen = chosen.get(spec.key)
        if chosen is not None:
            return max(0, chosen)
        return self.settings.pool if "device" in type(spec.options).model_fields else 0

    def parallel(self, stage: str) -> int:
        specs = self.engine.resolved.components.get(ENGINE_STAGES.get(stage, ""), [])
        return max([1, *(self.pool_size(s) for s in specs)])

    def call(self, spec: ComponentSpec, method: str, *args: Any) -> Any:
        if not self.pool_size(spec):
            return self.local.call(spec, method, *args)
        self.start()
        return self.pools[settings_key(spec)].call(method, *args)

    def pids(self, key: str) -> list[int]:
        """Process ids of a component's actors (``generator``, ``filters.x``...)."""
        return self.pools[key].pids()

    # --- start and stop ------------------------------------------------------------

    def start(self) -> None:
        """Start Ray and the actors, when any component runs on actors."""
        with self._start_lock:
            if self._started:
                return
            specs = [
                s
                for stage in ACTOR_STAGES
                for s in self.engine.resolved.components.get(stage, [])
                if self.pool_size(s)
            ]
            if not specs:
                return
            try:
                import ray
            except ImportError:
                raise MissingDependency("ray", "ray", "executor 'ray'") from None
            self._init(ray, specs)
            self._started = True
            for spec in specs:
                self._make_pool(ray, spec)

    def _init(self, ray, specs: list[ComponentSpec]) -> None:
        common = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "configure_logging": False,
        }
        address = self.engine.settings.address
        if address:
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, **common)
            return
        # A local Ray for this run: enough logical CPUs for every actor (they are
        # a scheduling count, not a limit), a small object store, its own folder.
        wanted = sum(self.pool_size(s) * self._resources(s, 0)[0] for s in specs)
        self._temp_dir = ray_temp_dir(self.engine.out)
        shutil.rmtree(self._temp_dir, ignore_errors=True)  # left by a killed run
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(wanted + 0.999)),
            object_store_memory=self.settings.object_store_mb * 2**20,
            _temp_dir=self._temp_dir,
            **common,
        )

    def _resources(self, spec: ComponentSpec, cluster_gpus: float):
        """(CPUs, GPUs) one actor of this component asks for."""
        threads = int(getattr(spec.options, "threads", 0) or 0)
        cpus = max(self.settings.cpus, threads)
        device = getattr(spec.options, "device", "cpu")
        cuda = str(device).startswith("cuda") or (device == "auto" and cluster_gpus > 0)
        return cpus, self.settings.gpus if cuda else 0

    def _make_pool(self, ray, spec: ComponentSpec) -> None:
        key = settings_key(spec)
        engine = self.engine
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        cpus, gpus = self._resources(spec, cluster_gpus)
        threads = int(getattr(spec.options, "threads", 0) or 0)
        if not threads and not gpus and spec.stage == "generator":
            log.warning(
                "%s: threads is 0, so actors use Ray's one thread and images may "
                "differ from a local run's; set %s.threads to pin it",
                key,
                key,
            )
        remote = ray.remote(ComponentActor).options(
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=-1,  # a dead actor is always brought back...
            max_task_retries=self.settings.retries,  # ...and its batch redone
            # One batch at a time (the pool sees to it), while pid(), describe()
            # and usage() answer even when a batch is running.
            max_concurrency=2,
        )
        context = Context(
            engine.domain, cache=None, workdir=engine.out, seed=engine.settings.seed
        )
        size = self.pool_size(spec)
        actors = [
            remote.remote(spec.cls, spec.options, context, threads) for _ in range(size)
        ]
        self.pools[key] = ActorPool(key, actors)
        # run.json and closing reach the actors through a stand-in.
        instance_key = f"{spec.stage}:{spec.key}"
        driver_copy = engine._instances.get(instance_key)
        if driver_copy is not None:
            driver_copy.close()
        engine._instances[instance_key] = RemoteComponent(
            spec.cls.name, self.pools[key]
        )
        log.info("%s: %d Ray actors (%s CPUs, %s GPUs each)", key, size, cpus, gpus)

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
