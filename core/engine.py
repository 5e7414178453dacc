"""The engine: extract -> plan -> prompt -> generate -> filter -> annotate -> write.

Stages run in threads connected by bounded queues, so they overlap and memory stays
flat. The SQLite journal in the run folder is the source of truth: files are written
atomically before an item is marked final, and a restarted run rebuilds the JSONL
files from the journal and deletes files that no record owns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from . import journal as jr
from . import store
from .components import Component, Context, ItemFailed
from .errors import ChatroomError, InputError, ResumeError
from .executors import Executor, make_executor
from .manager import Plugins
from .models import (
    Annotation,
    AttributeBank,
    BankEntry,
    Candidate,
    Failure,
    PlanItem,
    PromptSpec,
    Record,
    Reference,
    Rejection,
    Verdict,
)
from .plan import plan_item
from .records import write_record
from .references import load_references
from .resolve import (
    ComponentSpec,
    Request,
    Resolved,
    changed_keys,
    check_libraries,
    resolve,
)
from .runinfo import run_info

log = logging.getLogger(__name__)

STOP = object()
RUN_FILES = store.RUN_FILES
STAGE_NAMES = ("prompt", "generate", "filter", "annotate", "write")
MAX_FAILURES_IN_A_ROW = 20
POLL = 0.1  # seconds a thread waits on a queue before it checks for a stop


@dataclass
class Work:
    """One item on its way through the stages."""

    plan: PlanItem
    spec: PromptSpec | None = None
    candidate: Candidate | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    annotations: list[Annotation] = field(default_factory=list)
    outcome: str = ""  # "", "rejected" or "failed"
    stage: str = ""
    component: str = ""
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def index(self) -> int:
        return self.plan.index

    def decide(
        self, outcome: str, stage: str, component: str, reason: str, scores=None
    ) -> Work:
        self.outcome, self.stage, self.component, self.reason = (
            outcome,
            stage,
            component,
            reason,
        )
        self.scores = dict(scores or {})
        return self


@dataclass
class Progress:
    """Counts the CLI shows while a run goes on."""

    target: int = 0
    budget: int = 0
    written: int = 0
    rejected: int = 0
    failed: int = 0
    done: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGE_NAMES, 0))
    started: float = field(default_factory=time.monotonic)
    resumed: int = 0
    phase: str = "starting"

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        fresh = self.written - self.resumed
        return fresh / elapsed if elapsed > 0 and fresh > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        return (self.target - self.written) / rate if rate else None


@dataclass
class RunSummary:
    output: str
    status: str
    target: int
    written: int
    rejected: int
    failed: int
    attempted: int
    budget: int
    rejections_by_reason: dict[str, int]
    seconds: float
    message: str = ""


class RunContext:
    """What lifecycle hooks receive: the resolved run and its folder."""

    def __init__(self, resolved: Resolved, out: Path, fingerprint: str):
        self.resolved = resolved
        self.settings = resolved.settings
        self.domain = resolved.domain
        self.output = out
        self.fingerprint = fingerprint


class Engine:
    """Runs one request to completion, or resumes it."""

    kind = "run"  # the command whose folder this is, as run.json records it

    def __init__(
        self,
        request: Request,
        plugins: Plugins | None = None,
        fresh: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
    ):
        self.plugins = plugins or Plugins()
        self.resolved = resolve(request, self.plugins)
        self.settings = self.resolved.settings
        self.domain = self.resolved.domain
        self.fresh = fresh
        self.on_progress = on_progress or (lambda p: None)
        self.progress = Progress()
        self._instances: dict[str, Component] = {}
        self._append_lock = threading.Lock()
        self._cond = threading.Condition()
        self._inflight = 0
        self._error: BaseException | None = None
        self._failures_in_a_row = 0
        self._stopping = False
        self.executor: Executor = make_executor(self)

    # --- public ----------------------------------------------------------------

    def run(self) -> RunSummary:
        started = time.monotonic()
        settings = self.settings
        refs_folder = settings.references
        if not refs_folder:
            raise InputError("no references folder: pass --references DIR")
        check_libraries(self.resolved)
        references, ref_failures = load_references(
            refs_folder, settings.reference_sample, settings.seed
        )
        self.references = {r.id: r for r in references}
        self.fingerprint = self.resolved.fingerprint([r.sha256 for r in references])
        self.out = self._prepare_output(Path(settings.output).expanduser())
        journal_files = [self.out / n for n in RUN_FILES if n.startswith("journal")]
        made = [p for p in journal_files if not p.exists()]
        undo = False
        try:
            self.journal = jr.Journal(self.out / "journal.sqlite")
            try:
                return self._run_in_folder(references, ref_failures, started)
            finally:
                for instance in self._instances.values():
                    try:
                        instance.close()
                    except Exception:  # closing must not hide the run's own error
                        log.exception("closing %s failed", instance.name)
                self.executor.close()
                self.journal.close()
        except BaseException:
            # Refused before the run began (no run.json): leave the folder as it was.
            undo = not (self.out / "run.json").exists()
            if undo:
                for path in made:
                    path.unlink(missing_ok=True)
            raise
        finally:
            self._lock.close(remove=undo and self._lock.created)
            if undo:
                self._remove_made_folders()

    def _run_in_folder(self, references, ref_failures, started) -> RunSummary:
        for failure in ref_failures:
            self.journal.add_failure(failure.model_dump())
        self.context = RunContext(self.resolved, self.out, self.fingerprint)
        for specs in self.resolved.components.values():
            for spec in specs:  # options errors surface now, models load later
                self.instance(spec)
        self._write_run_json("running")
        self._reconcile()
        self.plugins.hook.run_started(run=self.context)
        try:
            summary = self._run(references, started)
        except BaseException as exc:
            # Record why the run stopped; the same command picks it up again.
            self._rewrite_jsonl()
            reason = str(exc) or type(exc).__name__
            summary = self._summary("stopped", started)
            summary.message = f"stopped: {reason}; run the same command to resume"
            self._write_run_json("stopped", summary)
            self.plugins.hook.run_finished(run=self.context, summary=summary)
            raise
        self._write_run_json(summary.status, summary)
        self.plugins.hook.run_finished(run=self.context, summary=summary)
        return summary

    # --- output folder ---------------------------------------------------------

    def _prepare_output(self, out: Path) -> Path:
        refs = Path(self.settings.references).expanduser().resolve()
        if out.resolve() == refs or refs.is_relative_to(out.resolve()):
            raise InputError(
                f"output folder {out} holds the references: choose another -o"
            )
        # A folder that is refused is refused before anything is written in it.
        if out.is_dir():
            self._check_folder(out)
        self._made_folder = next(
            (p for p in reversed((out, *out.parents)) if not p.exists()), None
        )
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f"{store.TMP_PREFIX}probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            self._remove_made_folders(out)
            raise InputError(
                f"output folder cannot be written: {out} ({exc.strerror})"
            ) from None
        self._lock = store.lock_folder(out)
        try:
            self._check_folder(out)  # again: another run may have come in between
            if self.fresh and (out / "run.json").exists():
                self._wipe(out)  # the user asked to start afresh, same settings or not
        except BaseException:
            self._lock.close(remove=self._lock.created)
            self._remove_made_folders(out)
            raise
        return out

    def _remove_made_folders(self, out: Path | None = None) -> None:
        """Remove the output folder (and parents) this call made, if still empty."""
        out = out or self.out
        made = getattr(self, "_made_folder", None)
        if made is None:
            return
        for folder in (out, *out.parents):
            try:
                folder.rmdir()
            except OSError:  # not empty, or gone: stop there
                return
            if folder == made:
                return

    def _check_folder(self, out: Path) -> None:
        """Refuse a folder that holds another run or files of someone else's."""
        run_json = out / "run.json"
        if run_json.exists():
            import json

            try:
                old = json.loads(run_json.read_text(encoding="utf-8"))
            except ValueError:
                old = {}
            changed = changed_keys(
                old.get("settings", {}), self.resolved.settings_with_sources()
            )
            inputs = self.resolved.inputs_digest(
                [r.sha256 for r in self.references.values()]
            )
            if self.fresh:
                foreign = next(store.foreign_files(out), None)
                if foreign is not None:
                    raise ResumeError(
                        f"{out} holds files that no chatroom run wrote ({foreign}); "
                        "--fresh deletes only a run's own files: move yours out, or "
                        "choose another -o"
                    )
            elif old.get("kind", "run") != self.kind:
                held = old.get("kind", "run")
                raise ResumeError(
                    f"{out} holds the output of `chatroom {held}`, not of "
                    f"`chatroom {self.kind}`; choose another -o"
                )
            elif old.get("fingerprint") != self.fingerprint and (
                changed or old.get("inputs") != inputs
            ):
                what = ", ".join(changed[:8]) or "references or domain pack"
                if len(changed) > 8:
                    what += f" and {len(changed) - 8} more"
                raise ResumeError(
                    f"{out} holds a run with other settings (changed: {what}); "
                    "pass --fresh to start afresh there, or choose another -o"
                )
            elif old.get("fingerprint") != self.fingerprint:
                # Only options added or dropped at their defaults: same run.
                log.info("continuing run %s (options at defaults changed)", out)
                self.fingerprint = old["fingerprint"]
        else:
            # No run.json: only what a run killed in its first moments leaves.
            known = {
                store.LOCK_FILE,
                *(n for n in RUN_FILES if n.startswith("journal")),
            }
            stray = sorted(p.name for p in out.iterdir() if p.name not in known)
            if stray:
                more = "..." if len(stray) > 3 else ""
                raise ResumeError(
                    f"{out} holds files that no chatroom run wrote "
                    f"({', '.join(stray[:3])}{more}); choose an empty or new folder"
                )

    def _wipe(self, out: Path) -> None:
        """Remove what an earlier run wrote (and nothing else)."""
        store.wipe_run(out)

    def _reconcile(self) -> None:
        """Make the folder agree with the journal after a crash or a hand edit."""
        # A record whose files were deleted by hand is made again, same id and seed.
        for index, item_id, files in self.journal.written_files():
            missing = [f for f in files if not (self.out / f).is_file()]
            if missing:
                log.warning(
                    "record %s: %s is missing; making the item again (same seed)",
                    item_id,
                    missing[0],
                )
                self.journal.reopen(index)
        removed = store.remove_orphans(self.out, self.journal.files())
        if removed:
            log.info("removed %d files no record owns", len(removed))
        self._rewrite_jsonl()

    def _rewrite_jsonl(self) -> None:
        store.write_jsonl(self.out / "metadata.jsonl", self.journal.records(jr.WRITTEN))
        store.write_jsonl(
            self.out / "rejected.jsonl", self.journal.records(jr.REJECTED)
        )
        failures = self.journal.failures() + self.journal.records(jr.FAILED)
        store.write_jsonl(self.out / "failures.jsonl", failures)

    def _append(self, name: str, row: dict) -> None:
        import json

        with self._append_lock, open(self.out / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _write_run_json(self, status: str, summary: RunSummary | None = None) -> None:
        import json

        info = run_info(self, status, summary)
        store.atomic_write_text(
            self.out / "run.json", json.dumps(info, indent=2, default=str)
        )

    # --- components ------------------------------------------------------------

    def instance(self, spec: ComponentSpec) -> Component:
        key = f"{spec.stage}:{spec.key}"
        if key not in self._instances:
            context = Context(
                self.domain,
                cache=self.journal,
                workdir=self.out,
                seed=self.settings.seed,
            )
            self._instances[key] = spec.cls(spec.options, context)
        return self._instances[key]

    def _call(self, spec: ComponentSpec, method: str, *args):
        """A component's method on one batch, wherever the executor runs it."""
        return self.executor.call(spec, method, *args)

    # --- the run ---------------------------------------------------------------

    def _run(self, references: list[Reference], started: float) -> RunSummary:
        settings = self.settings
        progress = self.progress
        progress.target = settings.count
        progress.budget = settings.max_candidates or settings.count * 4
        progress.written = progress.resumed = self.journal.count(jr.WRITTEN)
        progress.rejected = self.journal.count(jr.REJECTED)
        progress.failed = self.journal.count(jr.FAILED)

        progress.phase = "extracting"
        self.on_progress(progress)
        self.bank = self._bank(references)
        if settings.stop_after == "attributes":
            self._rewrite_jsonl()  # references the extractor could not read
            return self._summary("stopped after attributes", started)

        progress.phase = "prompting"
        self.prompts = self._load_prompts()
        if settings.stop_after == "prompts":
            for index, result in enumerate(self._prompt_all(range(settings.count))):
                if isinstance(result, ItemFailed):
                    self._write(
                        Work(plan=self._plan(index)).decide(
                            "failed",
                            "prompt",
                            self.resolved.one("prompter").key,
                            result.reason,
                        )
                    )
            self._rewrite_jsonl()
            return self._summary("stopped after prompts", started)

        progress.phase = "generating"
        self.on_progress(progress)
        if progress.written < progress.target:
            self._pipeline()
        self._rewrite_jsonl()
        written = self.journal.count(jr.WRITTEN)
        status = "complete" if written >= settings.count else "budget exhausted"
        return self._summary(status, started)

    def _summary(self, status: str, started: float) -> RunSummary:
        rejected = self.journal.records(jr.REJECTED)
        by_reason: dict[str, int] = {}
        for row in rejected:
            key = f"{row['component']}: {row['reason']}"
            by_reason[key] = by_reason.get(key, 0) + 1
        written = self.journal.count(jr.WRITTEN)
        statuses = self.journal.statuses()
        attempted = sum(1 for s in statuses.values() if s in jr.DONE)
        budget = self.progress.budget
        message = ""
        if status == "budget exhausted":
            top = sorted(by_reason.items(), key=lambda kv: -kv[1])[:3]
            failed = self.journal.count(jr.FAILED)
            parts = [f"{n} x {r}" for r, n in top]
            if failed:
                parts.append(f"{failed} failed, see failures.jsonl")
            why = "; ".join(parts) or "the budget is smaller than the count"
            message = (
                f"budget of {budget} candidates used up: {written} of "
                f"{self.settings.count} records passed ({why}); raise max_candidates "
                "and run the same command again to continue"
            )
            if failed and failed == attempted:
                # Nothing passed or was rejected: more budget would fail the same way.
                reasons: dict[str, int] = {}
                for row in self.journal.records(jr.FAILED):
                    reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
                common = max(reasons, key=reasons.get)
                message = (
                    f"every one of the {failed} candidates failed, {reasons[common]} "
                    f"with: {common}; see failures.jsonl"
                )
        return RunSummary(
            output=str(self.out),
            status=status,
            target=self.settings.count,
            written=written,
            rejected=len(rejected),
            failed=self.journal.count(jr.FAILED),
            attempted=attempted,
            budget=budget,
            rejections_by_reason=by_reason,
            seconds=round(time.monotonic() - started, 3),
            message=message,
        )

    # --- extract ---------------------------------------------------------------

    def _bank(self, references: list[Reference]) -> AttributeBank:
        if not self.settings.extraction:  # the ablation: prompts from the word alone
            log.info("attribute extraction is off: prompts name no attributes")
            return AttributeBank(domain=self.domain.name, attributes=[])
        path = self.out / "attributes.jsonl"
        if path.exists():
            try:
                rows = store.read_jsonl(path)
                entries = [BankEntry.model_validate(r) for r in rows]
            except ValueError as exc:
                raise InputError(f"{path}: {str(exc).splitlines()[0]}") from None
            attributes = list(dict.fromkeys(e.attribute for e in entries))
            spec = self.resolved.one("extractor")
            return AttributeBank(
                domain=self.domain.name,
                attributes=attributes,
                entries=entries,
                extractor=spec.cls.name,
            )
        spec = self.resolved.one("extractor")
        extractor = self.instance(spec)
        bank = extractor.extract(references, self.domain)
        bank.extractor = spec.cls.name
        for entry in bank.entries:
            entry.extractor = entry.extractor or spec.cls.name
        store.write_jsonl(path, [e.model_dump() for e in bank.entries])
        log.info(
            "attribute bank: %d attributes, %d entries from %d references",
            len(bank.attributes),
            len(bank.entries),
            len(references),
        )
        return bank

    # --- prompts ---------------------------------------------------------------

    def _load_prompts(self) -> dict[int, PromptSpec]:
        path = self.out / "prompts.jsonl"
        if not path.exists():
            return {}
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines = lines[:-1]  # a line cut short by a crash is written again
            store.atomic_write_text(path, "".join(line + "\n" for line in lines))
        import json

        prompts: dict[int, PromptSpec] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                spec = PromptSpec.model_validate(json.loads(line))
            except ValidationError as exc:
                err = exc.errors()[0]
                field = ".".join(str(p) for p in err["loc"]) or "row"
                raise InputError(
                    f"{path}:{number}: not a prompt row: {field}: {err['msg']}"
                ) from None
            except ValueError as exc:
                first = str(exc).splitlines()[0]
                raise InputError(
                    f"{path}:{number}: not a prompt row: {first}"
                ) from None
            if not spec.prompt.strip():
                raise InputError(
                    f"{path}:{number}: the prompt of index {spec.index} is empty; "
                    "write one, or delete the row to have it written again"
                )
            if spec.index in prompts:
                raise InputError(
                    f"{path}:{number}: index {spec.index} appears twice; keep one row "
                    "per index"
                )
            expected = self._plan(spec.index).item_id
            if spec.item_id != expected:
                raise InputError(
                    f"{path}:{number}: item_id {spec.item_id} does not belong to index "
                    f"{spec.index} (expected {expected}); edit the prompt, not the ids"
                )
            original = self.journal.get(f"prompt:{spec.index}")
            spec.edited = original is not None and original != spec.prompt
            prompts[spec.index] = spec
        return prompts

    def _prompt_all(self, indices) -> list[PromptSpec | ItemFailed]:
        """Prompts for these indices: from prompts.jsonl, else written now."""
        items = [self._plan(i) for i in indices]
        missing = [it for it in items if it.index not in self.prompts]
        failed: dict[int, ItemFailed] = {}
        if missing:
            spec = self.resolved.one("prompter")
            written = self._call(spec, "write", missing, self.domain)
            for item, prompt in zip(missing, written, strict=True):
                if isinstance(prompt, ItemFailed):
                    failed[item.index] = prompt
                    continue
                prompt.index, prompt.item_id = item.index, item.item_id
                prompt.entries = prompt.entries or item.entries
                prompt.writer = prompt.writer or spec.cls.name
                self.journal.put(f"prompt:{item.index}", prompt.prompt)
                self._append("prompts.jsonl", prompt.model_dump())
                self.prompts[item.index] = prompt
        return [failed.get(it.index) or self.prompts[it.index] for it in items]

    def _plan(self, index: int) -> PlanItem:
        return plan_item(
            self.bank, index, self.fingerprint, self.settings.seed, self.settings.plan
        )

    # --- pipeline --------------------------------------------------------------

    def _pipeline(self) -> None:
        size = self.settings.queue_size
        queues = [queue.Queue(maxsize=size) for _ in range(5)]
        stages = [
            ("prompt", self._stage_prompt, self._batch("prompter")),
            ("generate", self._stage_generate, self._batch("generator")),
            ("filter", self._stage_filter, self._batch("filter")),
            ("annotate", self._stage_annotate, self._batch("annotator")),
        ]
        threads = [
            threading.Thread(
                target=self._feed, args=(queues[0],), daemon=True, name="chatroom-feed"
            )
        ]
        self.executor.start()
        for number, (name, fn, batch) in enumerate(stages):
            # One thread a batch the executor can run at once (one a Ray actor).
            workers = self.executor.parallel(name)
            left = [workers]
            for n in range(workers):
                threads.append(
                    threading.Thread(
                        target=self._worker,
                        args=(name, fn, batch, queues[number], queues[number + 1]),
                        kwargs={"left": left},
                        daemon=True,
                        name=f"chatroom-{name}-{n}",
                    )
                )
        for thread in threads:
            thread.start()
        try:
            self._write_loop(queues[-1])
        finally:
            self._halt()
            for thread in threads:
                thread.join(timeout=30)
        if self._error is not None:
            raise self._error

    def _halt(self) -> None:
        """Tell every thread to stop; they notice within a queue poll."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _put(self, q: queue.Queue, item) -> bool:
        """Put unless the run is stopping; False when it is."""
        while not self._stopping:
            try:
                q.put(item, timeout=POLL)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue, timeout: float | None = None):
        """The next item, STOP when the run is stopping, None after ``timeout``."""
        waited = 0.0
        while not self._stopping:
            try:
                return q.get(timeout=POLL)
            except queue.Empty:
                waited += POLL
                if timeout is not None and waited >= timeout:
                    return None
        return STOP

    def _batch(self, stage: str) -> int:
        specs = self.resolved.components.get(stage, [])
        sizes = [getattr(s.options, "batch_size", 1) or 1 for s in specs]
        return max(sizes or [1])

    def _feed(self, out: queue.Queue) -> None:
        """Issue item indices while more records are needed and budget is left."""
        done = {i for i, s in self.journal.statuses().items() if s in jr.DONE}
        budget = self.progress.budget
        index = 0
        try:
            while index < budget:
                if index in done:
                    index += 1
                    continue
                with self._cond:
                    # Wait while the items in flight could still fill the target.
                    while (
                        not self._stopping
                        and self._inflight + self.progress.written
                        >= self.progress.target
                    ):
                        if self.progress.written >= self.progress.target:
                            self._stopping = True
                            break
                        self._cond.wait(0.5)
                    if self._stopping:
                        break
                    self._inflight += 1
                if not self._put(out, Work(plan=self._plan(index))):
                    return
                index += 1
        except BaseException as exc:  # surfaced by the writer
            self._error = self._error or exc
            self._halt()
        self._put(out, STOP)

    def _worker(
        self,
        name: str,
        fn,
        batch_size: int,
        inq: queue.Queue,
        outq: queue.Queue,
        left: list[int] | None = None,
    ) -> None:
        """Run one stage on batches from ``inq``; ``left`` counts its threads."""
        finished = False
        while not finished:
            first = self._get(inq)
            if first is STOP:
                break
            batch = [first]
            while len(batch) < batch_size:
                nxt = self._get(inq, timeout=0.05)
                if nxt is None:
                    break
                if nxt is STOP:
                    finished = True
                    break
                batch.append(nxt)
            live = [w for w in batch if not w.outcome]
            if live:
                try:
                    fn(live)
                except ChatroomError as exc:  # fatal: config, quota, missing library
                    self._error = self._error or exc
                    self._halt()
                    for work in live:  # not journaled: a later run does them again
                        work.decide("aborted", name, "", str(exc))
                except Exception as exc:
                    log.exception(
                        "%s stage failed on items %s", name, [w.index for w in live]
                    )
                    for work in live:
                        work.decide("failed", name, "", f"{type(exc).__name__}: {exc}")
            with self._cond:
                self.progress.done[name] += len(batch)
            for work in batch:
                if not self._put(outq, work):
                    return
        # The stage's last thread passes STOP on; the others hand it to a sibling.
        with self._cond:
            left = left or [1]
            left[0] -= 1
            last = left[0] == 0
        self._put(outq if last else inq, STOP)

    def _stage_prompt(self, batch: list[Work]) -> None:
        specs = self._prompt_all([w.index for w in batch])
        for work, spec in zip(batch, specs, strict=True):
            if isinstance(spec, ItemFailed):
                work.decide(
                    "failed", "prompt", self.resolved.one("prompter").key, spec.reason
                )
                continue
            work.spec = spec
            del self.prompts[work.index]  # each index is issued once: keep memory flat

    def _stage_generate(self, batch: list[Work]) -> None:
        candidates = self._call(
            self.resolved.one("generator"),
            "generate",
            [w.spec for w in batch],
            [w.plan.seed for w in batch],
        )
        for work, candidate in zip(batch, candidates, strict=True):
            if isinstance(candidate, ItemFailed):
                work.decide("failed", "generate", "generator", candidate.reason)
                continue
            work.candidate = candidate
            if candidate.rejected:
                work.decide("rejected", "generate", "generator", candidate.rejected)

    def _stage_filter(self, batch: list[Work]) -> None:
        for spec in self.resolved.components.get("filter", []):
            live = [w for w in batch if not w.outcome]
            if not live:
                return
            verdicts = self._call(spec, "check", [w.candidate for w in live])
            for work, verdict in zip(live, verdicts, strict=True):
                verdict.filter = spec.key
                verdict.observed = spec.observe
                work.verdicts.append(verdict)
                if not verdict.passed and not spec.observe:
                    work.decide(
                        "rejected", "filter", spec.key, verdict.reason, verdict.scores
                    )

    def _stage_annotate(self, batch: list[Work]) -> None:
        for spec in self.resolved.components.get("annotator", []):
            live = [w for w in batch if not w.outcome]
            if not live:
                return
            notes = self._call(
                spec,
                "annotate",
                [w.candidate for w in live],
                [w.verdicts for w in live],
            )
            for work, note in zip(live, notes, strict=True):
                note.annotator = spec.key
                note.observed = spec.observe
                work.annotations.append(note)
                if note.rejected and not spec.observe:
                    work.decide("rejected", "annotator", spec.key, note.rejected)

    # --- writing ---------------------------------------------------------------

    def _write_loop(self, inq: queue.Queue) -> None:
        progress = self.progress
        while True:
            work = self._get(inq)
            if work is STOP:
                return
            try:
                self._write(work)
            finally:
                with self._cond:
                    self._inflight -= 1
                    self._cond.notify_all()
            progress.done["write"] += 1
            self.on_progress(progress)
            if self._error is not None:
                return
            if work.outcome == "failed":
                self._failures_in_a_row += 1
                if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    raise ChatroomError(
                        f"{self._failures_in_a_row} items failed in a row; last: "
                        f"{work.stage}: {work.reason}"
                    )
            else:
                self._failures_in_a_row = 0

    def _write(self, work: Work) -> None:
        journal = self.journal
        spec = work.spec
        if work.outcome == "aborted":
            return
        if work.outcome == "failed":
            failure = Failure(
                kind="item",
                subject=work.plan.item_id,
                reason=work.reason,
                stage=work.stage,
                index=work.index,
            )
            journal.finish(
                work.index,
                work.plan.item_id,
                jr.FAILED,
                failure.model_dump(),
                work.reason,
            )
            self._append("failures.jsonl", failure.model_dump())
            self.progress.failed += 1
            return
        if work.outcome == "rejected":
            rejection = Rejection(
                item_id=work.plan.item_id,
                index=work.index,
                stage=work.stage,
                component=work.component,
                reason=work.reason,
                scores=work.scores,
                prompt=spec.prompt if spec else "",
                seed=work.plan.seed,
                warnings=work.candidate.warnings if work.candidate else [],
            )
            journal.finish(
                work.index,
                work.plan.item_id,
                jr.REJECTED,
                rejection.model_dump(),
                work.reason,
            )
            self._append("rejected.jsonl", rejection.model_dump())
            self.progress.rejected += 1
            return
        if self.progress.written >= self.progress.target:
            journal.finish(
                work.index, work.plan.item_id, jr.SURPLUS, None, "target reached"
            )
            return

        record, files = write_record(self.out, work, self.references)
        journal.finish(work.index, work.plan.item_id, jr.WRITTEN, record, files=files)
        self._append("metadata.jsonl", record)
        self.progress.written += 1
        self.plugins.hook.record_written(
            run=self.context,
            record=Record.model_validate(
                {k: v for k, v in record.items() if k in Record.model_fields}
            ),
        )


def run(request: Request, **kwargs) -> RunSummary:
    """Resolve and run a request; the SDK's one-call entry point."""
    return Engine(request, **kwargs).run()
