"""Checkpoints on any fsspec store that count only when complete.

Layout: {storage.url}/{run_name}/checkpoints/step_000001000/ holds DeepSpeed's files (every
rank's ZeRO-3 partition of parameters and optimizer state, the LR scheduler, rank 0's
non-partitioned state), one `trainer_state_rank{r}.pt` per rank (step, loader position, RNG
states), and COMPLETE.json. Rank 0 writes COMPLETE.json only after every rank has hashed and
stored its files, so a checkpoint interrupted at any point (a crash during an upload included)
has no marker and is never resumed from. DeepSpeed's `latest` file is neither written nor read.
After each marker rank 0 keeps the newest `keep` complete checkpoints and removes the rest.

Integrity. DeepSpeed's loaders unpickle its files (`torch.load(weights_only=False)`), so a file
changed after the save could run code on every worker at the next resume. Each rank hashes
the files it wrote; the marker lists every file's sha256; every rank checks what it loads
against the marker before DeepSpeed reads it. Which checkpoint to resume from is rank 0's
decision alone (`choose`), broadcast with its marker: on a shared filesystem with attribute
caching, ranks listing for themselves could see different markers.

On a local (or shared) filesystem DeepSpeed writes in place and each rank fsyncs its files
before the marker; for object stores each rank writes to its own local staging folder and
uploads, and on load fetches only its own files.

Background upload (`async_upload`, the default for object stores; docs/checkpoints.md). `save`
blocks the loop only until DeepSpeed's files and the trainer state are on local disk (staging;
DeepSpeed's default engine writes synchronously and ends with a barrier). Hashing and the upload
(or the fsync, on local storage) then run in a thread of each rank, one save in flight: a new
save first waits for the previous one and commits it. The loop learns that every rank's upload
is done from the per-step all-reduce it already makes (engine/health.py carries each rank's
`upload_state()`), and then calls `commit`: one gather of the digests, rank 0 writes the marker.
`save(..., wait=True)` and `wait()` return only once the marker is written: the final save and
the preemption saves use them. `on_complete(save)` is called on every rank for each marker.

A failed upload (one rank's storage error) is a dropped save, never a hang: each rank reports
its upload as pending, stored or failed in that same all-reduce, and on "failed" every rank
calls `drop` at the same step: the files are removed, no marker is written, `on_failed(save,
errors)` is told (the loop logs each failing rank and its error, and counts it), and the next
save tries again. `failed_in_a_row` counts dropped saves since the last marker; the loop stops
the run at `checkpoint.max_failed_saves`. A save that waits (`wait`, `save(wait=True)`) learns
of every rank's error in the commit's gather, so it too is dropped on every rank at once.

Staging folders are named by the process that made them; `clean_stale_staging` removes those
whose process is gone (a crash mid-save), at the start of a run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem

from coatnet_scale.engine.watchdog import process_alive
from coatnet_scale.storage import file_sha256, url_to_fs, write_atomic

MARKER = "COMPLETE.json"
STAGING = "coatnet_scale_ckpt_"  # + rank{r}_pid{pid}_: a temporary folder of one process
DISCARD_WAIT_S = 30.0  # how long a rollback waits for the abandoned save's upload to stop
UNIVERSAL = "universal"  # {checkpoints}/universal/step_N: step_N in DeepSpeed's universal format


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


@dataclass
class Save:
    """One checkpoint save, from staging to its marker."""

    step: int
    tag: str
    note: dict  # recorded in the marker, e.g. {"preemption": {...}}
    blocked: float = 0.0  # seconds the loop waited for it: staging, and the commit
    upload_seconds: float = 0.0  # this rank's hashing and upload (its fsync, on local storage)
    complete: bool = False  # the marker is written
    digests: dict = field(default_factory=dict)  # this rank's files' sha256
    error: BaseException | None = None  # the upload's, reported to every rank by the loop's all-reduce
    thread: threading.Thread | None = None
    cancelled: bool = False  # dropped or discarded: the upload stores no further file


class Checkpoints:
    def __init__(self, url: str, storage_options: dict, keep: int, rank: int, world_size: int,
                 metadata: dict | None = None, local_rank: int = 0, convert_workers: int | None = None,
                 async_upload: bool | None = None, faults=None):
        self.url = url.rstrip("/")
        self.metadata = metadata or {}  # recorded in every marker, e.g. the model section for fine-tuning
        self.fs, self.root = url_to_fs(self.url, storage_options)
        self.root = self.root.rstrip("/")
        self.keep, self.rank, self.world_size, self.local_rank = keep, rank, world_size, local_rank
        self.local = isinstance(self.fs, LocalFileSystem)
        # ds_to_universal's processes. One: more measured no faster on 2 cores (0.95x with 2 for 2
        # and 4 ranks' files, benchmarks/reshard_cost.py) and each holds its own working set.
        self.convert_workers = convert_workers or 1
        # None: in the background for object stores, where the upload is what takes long.
        self.async_upload = not self.local if async_upload is None else async_upload
        self.faults = faults  # engine/faults.py's test-only hook (slowupload), or None
        self.pending: Save | None = None  # the save in flight: staged, not yet marked
        self.on_complete: Callable[[Save], None] | None = None  # told of each marker, on every rank
        self.blocked_seconds, self.saves = 0.0, 0  # totals over this process's saves
        self._pruning: threading.Thread | None = None
        self._last: Save | None = None  # the newest completed save
        self.on_failed: Callable[[Save, list[tuple[int, str]]], None] | None = None  # told of each dropped save
        self.failed_in_a_row, self.failed_saves = 0, 0  # dropped saves since the last marker, and in all
        self._abandoned: list[threading.Thread] = []  # uploads still running after a bounded discard

    def _staging(self):
        """Where this rank writes or reads before an upload or after a download: the store
        itself when local, else a temporary folder removed when the operation ends."""
        if self.local:
            return contextlib.nullcontext(self.root)
        return tempfile.TemporaryDirectory(prefix=self._staging_prefix())

    def _staging_prefix(self) -> str:
        return f"{STAGING}rank{self.rank}_pid{os.getpid()}_"

    # -- discovery -----------------------------------------------------------------------

    def complete(self) -> list[tuple[int, str]]:
        """(step, tag) of every complete checkpoint, oldest first."""
        if not self.fs.exists(self.root):
            return []
        found = []
        for path in self.fs.ls(self.root, detail=False):
            tag = path.rstrip("/").rsplit("/", 1)[-1]
            if tag.startswith("step_") and self._marker(tag) is not None:
                found.append((int(tag[len("step_"):]), tag))
        return sorted(found)

    def _marker(self, tag: str) -> dict | None:
        """The parsed marker, or None when absent or unreadable (a crash while writing it)."""
        try:
            marker = json.loads(self.fs.cat_file(f"{self.root}/{tag}/{MARKER}"))
            return marker if {"step", "world_size", "files"} <= set(marker) else None
        except (FileNotFoundError, ValueError):
            return None

    def latest(self) -> str | None:
        complete = self.complete()
        return complete[-1][1] if complete else None

    def choose(self) -> tuple[str | None, dict | None]:
        """Collective: (tag, marker) of the newest complete checkpoint, as rank 0 sees it."""
        choice = [None, None]
        if self.rank == 0:
            tag = self.latest()
            choice = [tag, self._marker(tag) if tag else None]
        if self.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        return choice[0], choice[1]

    # -- save ------------------------------------------------------------------------------

    def save(self, engine, step: int, trainer_state: dict, wait: bool = False, note: dict | None = None) -> Save:
        """Collective: every rank calls it. Stages DeepSpeed's files and `trainer_state` on local
        disk, after the previous save is committed (one in flight). With background upload the
        hashing and upload continue in a thread and the returned Save is not complete yet;
        without it, or with `wait`, this returns once the marker is written. `note` goes into
        the marker (a preemption save says so). A save of the step already in flight only
        waits for it when asked to."""
        start = time.monotonic()
        if self.pending is not None and self.pending.step == step:
            if wait:
                return self.wait() or Save(step, tag_for(step), note or {})  # dropped: not complete
            return self.pending
        self.wait()
        for thread in self._abandoned:  # a discarded upload still running must not write into this save
            thread.join()
        self._abandoned = []
        current = Save(step, tag_for(step), note or {})
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)
            save_dir = self.root
        else:  # kept until the upload ends
            save_dir = tempfile.mkdtemp(prefix=self._staging_prefix())
        written = os.path.join(save_dir, current.tag)
        try:
            engine.save_checkpoint(save_dir, tag=current.tag, save_latest=False)
            os.makedirs(written, exist_ok=True)
            torch.save(trainer_state, os.path.join(written, f"trainer_state_rank{self.rank}.pt"))
        except BaseException:
            if not self.local:
                shutil.rmtree(save_dir, ignore_errors=True)
            raise
        self.pending, self.saves = current, self.saves + 1
        if self.async_upload and not wait:
            current.thread = threading.Thread(target=self._upload, args=(current, save_dir, written), daemon=True,
                                              name=f"checkpoint-upload-{current.tag}")
            current.thread.start()
            current.blocked = time.monotonic() - start
            self.blocked_seconds += current.blocked
            return current
        self._upload(current, save_dir, written)
        self._settle(current, barrier=True)
        current.blocked = time.monotonic() - start
        self.blocked_seconds += current.blocked
        return current

    def _upload(self, current: Save, save_dir: str, written: str) -> None:
        """Hash this rank's files and store them: upload (object stores) or fsync (local), in
        the background thread or inline. Errors are kept for the loop's thread to raise."""
        started = time.monotonic()
        try:
            mine = sorted(name for name in os.listdir(written) if self._own(name))
            for name in mine:
                if current.cancelled:
                    return
                current.digests[name] = file_sha256(os.path.join(written, name))
                if self.faults is not None and name == mine[0] and self.faults.fail_upload(current.step):
                    # A real storage error: the store refuses a destination no one can write.
                    self.fs.put_file(os.path.join(written, name), f"/proc/coatnet_scale_failupload/{name}")
                if not self.local:
                    self.fs.put_file(os.path.join(written, name), f"{self.root}/{current.tag}/{name}")
                if self.faults is not None and name == mine[0]:
                    self.faults.slow_upload(current.step)
            if self.local:
                _fsync_files(written, mine)  # on disk before the marker can say so
        except BaseException as e:
            current.error = e
        finally:
            if not self.local:
                shutil.rmtree(save_dir, ignore_errors=True)
            current.upload_seconds = time.monotonic() - started

    def upload_state(self) -> str:
        """This rank's part of the save in flight: "none" (no save in flight), "pending",
        "stored" or "failed". Not collective (the loop carries it in its per-step all-reduce),
        and never raises: a rank that raised here would leave the others in that all-reduce."""
        current = self.pending
        if current is None:
            return "none"
        if current.thread is not None and current.thread.is_alive():
            return "pending"
        return "failed" if current.error is not None else "stored"

    def commit(self) -> Save | None:
        """Collective, once every rank's upload is stored (the loop learns it from its per-step
        all-reduce, so no rank waits here for another's upload): rank 0 writes the marker.
        Returns the completed save (None if a rank's files turned out missing: dropped)."""
        start = time.monotonic()
        current = self.pending
        complete = self._settle(current, barrier=False)
        blocked = time.monotonic() - start
        current.blocked += blocked
        self.blocked_seconds += blocked
        return current if complete else None

    def drop(self) -> None:
        """Collective, when the loop's all-reduce says a rank's upload failed: every rank stops
        its own upload (waiting at most DISCARD_WAIT_S), the save's files are removed and no
        marker is written; `on_failed` is told who failed and why."""
        current = self.pending
        if current is not None:
            self._stop_upload(current, DISCARD_WAIT_S)
            self._settle(current, barrier=True)

    def wait(self) -> Save | None:
        """Collective: wait for the save in flight, if any, and commit it; returns it, complete,
        or None when there was none or a rank failed to store its files (the save is dropped).
        What a caller that must know the checkpoint is complete calls (the end of a run, a
        preemption or signal save: or `save(..., wait=True)`). Its time is the caller's to count:
        it is not added to the save's `blocked` (the loop's stall while training goes on)."""
        if self._pruning is not None:
            self._pruning.join()
            self._pruning = None
        current = self.pending
        if current is None:
            return None
        if current.thread is not None:
            current.thread.join()
        return current if self._settle(current, barrier=True) else None

    def discard(self, timeout_s: float = DISCARD_WAIT_S) -> None:
        """Forget the save in flight without a marker (a rollback: the run goes back to the
        checkpoint its record names). Its upload stores no further file; it is waited for at
        most `timeout_s` here (a rollback must not stall on a slow store), and before the next
        save otherwise."""
        if self.pending is not None:
            self._stop_upload(self.pending, timeout_s)
        self.pending = None

    def _stop_upload(self, current: Save, timeout_s: float) -> None:
        current.cancelled = True
        if current.thread is not None:
            current.thread.join(timeout_s)
            if current.thread.is_alive():
                print(f"rank {self.rank}: the upload of {self.url}/{current.tag} still runs after {timeout_s:g} s; "
                      f"going on (it stores no further file, and no marker ever names it)", flush=True)
                self._abandoned.append(current.thread)

    def _settle(self, current: Save, barrier: bool) -> bool:
        """Collective: every rank's digests and upload error gathered; the marker written when
        no rank failed, else the save dropped on every rank. Returns whether it is complete."""
        error = None if current.error is None else f"{type(current.error).__name__}: {current.error}"
        if current.cancelled and error is None and current.thread is not None and current.thread.is_alive():
            error = "its upload was stopped (another rank failed)"
        everyone = [(current.digests, error)]
        if self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, (current.digests, error))
        errors = [(rank, e) for rank, (_, e) in enumerate(everyone) if e is not None]
        if errors or current.cancelled:
            self._drop(current, errors)
            return False
        self._commit(current, [digests for digests, _ in everyone], barrier)
        self._completed(current)
        return True

    def _drop(self, current: Save, errors: list[tuple[int, str]]) -> None:
        current.cancelled, self.pending = True, None
        self.failed_in_a_row, self.failed_saves = self.failed_in_a_row + 1, self.failed_saves + 1
        if self.rank == 0:
            try:
                if self.fs.exists(f"{self.root}/{current.tag}"):
                    self.fs.rm(f"{self.root}/{current.tag}", recursive=True)
            except Exception as e:  # unmarked: never resumed from; pruning removes it later
                print(f"cannot remove the dropped {self.url}/{current.tag} ({type(e).__name__}: {e}); pruning will",
                      flush=True)
        if self.world_size > 1:
            dist.barrier()  # removed before any rank stages the next save (perhaps of the same step)
        if self.on_failed is not None:
            self.on_failed(current, errors)

    def _commit(self, current: Save, everyone: list[dict], barrier: bool) -> None:
        # The files are the ones every rank reported storing, not a listing (which a shared
        # filesystem with attribute caching may show rank 0 incompletely).
        if self.rank == 0:
            sha256 = {name: digest for rank_digests in everyone for name, digest in rank_digests.items()}
            marker = {"step": current.step, "world_size": self.world_size, "files": sorted(sha256), "sha256": sha256,
                      **self.metadata, **current.note}
            write_atomic(self.fs, f"{self.root}/{current.tag}/{MARKER}", json.dumps(marker, indent=1).encode())
            if barrier:
                self._prune()
            else:  # off the loop's path; the next save or wait joins it
                self._pruning = threading.Thread(target=self._prune, daemon=True, name="checkpoint-prune")
                self._pruning.start()
        if barrier and self.world_size > 1:
            dist.barrier()  # every rank returns with the marker written
        current.complete, self.pending, self._last = True, None, current
        self.failed_in_a_row = 0

    def _completed(self, current: Save) -> None:
        if self.on_complete is not None:
            self.on_complete(current)

    def _files(self, tag: str) -> list[str]:
        return [p.rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.root}/{tag}", detail=False)]

    def _prune(self) -> None:
        complete = self.complete()
        newest = complete[-1][0] if complete else -1
        keep = {tag for _, tag in complete[-self.keep:]}
        for path in self.fs.ls(self.root, detail=False):
            tag = path.rstrip("/").rsplit("/", 1)[-1]
            if not tag.startswith("step_") or tag in keep:
                continue
            # Old complete checkpoints, and incomplete ones older than the newest complete one
            # (a newer incomplete one may be another writer's save in progress).
            if int(tag[len("step_"):]) < newest:
                self._remove(f"{self.root}/{tag}")
        if self.fs.exists(f"{self.root}/{UNIVERSAL}"):  # conversions of checkpoints no longer kept
            for path in self.fs.ls(f"{self.root}/{UNIVERSAL}", detail=False):
                tag = path.rstrip("/").rsplit("/", 1)[-1]
                if tag.startswith("step_") and tag not in keep:
                    self._remove(path)

    def _remove(self, folder: str) -> None:
        """The marker first: a removal interrupted half-way leaves an incomplete checkpoint,
        never a "complete" one missing files."""
        if self.fs.exists(f"{folder}/{MARKER}"):
            self.fs.rm(f"{folder}/{MARKER}")
        self.fs.rm(folder, recursive=True)

    # -- load ------------------------------------------------------------------------------

    def load(self, engine, tag: str, marker: dict) -> dict:
        """Collective: restore DeepSpeed's state and return this rank's trainer state. `marker`
        is the one `choose` returned. A checkpoint of another world size loads through its
        universal conversion (the engine must be built with `checkpoint.load_universal`); the
        trainer state then has the EMA resharded, and `rng` None for a rank the checkpoint had
        no state for."""
        if marker["world_size"] != self.world_size:
            return self._load_resharded(engine, tag, marker)
        needed = [name for name in marker["files"] if self._needed(name)]
        with self._staging() as load_dir:
            if not self.local:
                os.makedirs(os.path.join(load_dir, tag), exist_ok=True)
                for name in needed:
                    self.fs.get_file(f"{self.root}/{tag}/{name}", os.path.join(load_dir, tag, name))
            verify_files(f"{self.url}/{tag}", marker, os.path.join(load_dir, tag), needed)
            engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
            # On the CPU: a restarted group may put this rank on another GPU than the one that saved it.
            return torch.load(os.path.join(load_dir, tag, f"trainer_state_rank{self.rank}.pt"), map_location="cpu",
                              weights_only=True)

    # -- another world size: DeepSpeed's universal checkpoint -----------------------------------

    def _load_resharded(self, engine, tag: str, marker: dict) -> dict:
        from coatnet_scale.engine.reshard import reshard_partitions, source_ranks

        universal = self._universal(tag, marker)
        with self._node_copy(f"{UNIVERSAL}/{tag}", universal) as folder:
            engine.load_checkpoint(os.path.dirname(folder), tag=tag, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        old = marker["world_size"]
        # Old ranks' trainer states: rank 0's (step, loader position), this rank's own (RNG), and
        # under ZeRO-3 those whose EMA partitions overlap this rank's new one: about old / new.
        zero3 = all(hasattr(p, "ds_numel") for p in engine.module.parameters())
        numels = {n: p.ds_numel for n, p in engine.module.named_parameters()} if zero3 else {}
        sources = source_ranks(numels, old, self.rank, self.world_size) if zero3 else []
        ranks = sorted({0, *sources, *([self.rank] if self.rank < old else [])})
        names = [f"trainer_state_rank{r}.pt" for r in ranks]
        with self._staging() as load_dir:
            folder = os.path.join(load_dir, tag)
            if not self.local:
                os.makedirs(folder, exist_ok=True)
                for name in names:
                    self.fs.get_file(f"{self.root}/{tag}/{name}", os.path.join(folder, name))
            verify_files(f"{self.url}/{tag}", marker, folder, names)
            states = {r: torch.load(os.path.join(folder, n), map_location="cpu", weights_only=True, mmap=True)
                      for r, n in zip(ranks, names)}
            state = {k: v for k, v in states[0].items() if k not in ("rng", "ema")}
            state["rng"] = states[self.rank]["rng"] if self.rank < old else None
            if "ema" in states[0] and not zero3:  # stages 0-2: every rank holds it whole
                state["ema"] = states[0]["ema"]
            elif "ema" in states[0]:
                emas = {r: states[r]["ema"] for r in sources} or {0: states[0]["ema"]}  # none: all padding
                state["ema"] = {
                    "decay": states[0]["ema"]["decay"],
                    "params": reshard_partitions({r: e["params"] for r, e in emas.items()}, numels, old, self.rank,
                                                 self.world_size),
                    # Each rank's BatchNorm statistics are its own (evaluation averages them over
                    # the group); a new rank starts from the mean of those it takes partitions from.
                    "buffers": {n: torch.stack([e["buffers"][n] for e in emas.values()]).mean(0)
                                for n in states[0]["ema"]["buffers"]},
                }
            return state

    def _universal(self, tag: str, marker: dict, poll_s: float = 5.0) -> dict:
        """Collective: the marker of `tag`'s universal conversion, made by rank 0 alone if no
        complete one is there yet; every rank learns the marker or the error. The others wait
        for it in storage, not in a collective, whose timeout (30 min) a conversion of the
        largest models can outlast."""
        found = [self._universal_marker(tag) if self.rank == 0 else None, uuid.uuid4().hex]
        if self.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        universal, attempt = found
        if universal is not None:
            return universal
        failed = f"{self.root}/{UNIVERSAL}/{tag}.failed-{attempt}.json"  # this attempt's, pruned with the tag
        if self.rank == 0:
            try:
                return self.convert(tag, marker)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                if self.world_size > 1:
                    write_atomic(self.fs, failed, json.dumps({"error": error}).encode())
                raise RuntimeError(f"cannot convert {self.url}/{tag} for {self.world_size} workers: {error}") from e
        while (universal := self._universal_marker(tag)) is None:
            try:
                error = json.loads(self.fs.cat_file(failed))["error"]
            except FileNotFoundError:
                time.sleep(poll_s)
                continue
            raise RuntimeError(f"cannot convert {self.url}/{tag} for {self.world_size} workers: {error}")
        return universal

    def _universal_marker(self, tag: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.root}/{UNIVERSAL}/{tag}/{MARKER}"))
        except (FileNotFoundError, ValueError):
            return None

    def convert(self, tag: str, marker: dict) -> dict:
        """DeepSpeed's ds_to_universal on a verified local copy, into {checkpoints}/universal/TAG,
        which counts only once its marker is written (last)."""
        start = time.monotonic()
        print(f"converting {self.url}/{tag} ({marker['world_size']} workers) to DeepSpeed's universal "
              f"format for {self.world_size}", flush=True)
        inputs = [n for n in marker["files"] if n.endswith(("_optim_states.pt", "_model_states.pt"))]
        target = f"{self.root}/{UNIVERSAL}/{tag}"
        with tempfile.TemporaryDirectory(prefix="coatnet_scale_universal_") as work:
            if self.local:
                os.makedirs(f"{self.root}/{UNIVERSAL}", exist_ok=True)
                source, out = f"{self.root}/{tag}", f"{self.root}/{UNIVERSAL}/.{tag}-{os.getpid()}-partial"
            else:
                source, out = os.path.join(work, "in", tag), os.path.join(work, "out", tag)
                os.makedirs(source)
                for name in inputs:
                    self.fs.get_file(f"{self.root}/{tag}/{name}", os.path.join(source, name))
            verify_files(f"{self.url}/{tag}", marker, source, inputs)  # the converter unpickles them
            if self.fs.exists(target):  # an unmarked leftover of a conversion that died
                self.fs.rm(target, recursive=True)
            try:
                result = subprocess.run(
                    [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", source,
                     "--output_folder", out, "--num_extract_workers", str(self.convert_workers),
                     "--num_merge_workers", str(self.convert_workers)],
                    capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"ds_to_universal failed: {(result.stderr or result.stdout).strip()[-2000:]}")
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)  # a partial conversion is never kept
                raise
            files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
            sha256 = {name: file_sha256(os.path.join(out, name)) for name in files}
            size = sum(os.path.getsize(os.path.join(out, name)) for name in files)
            if self.local:
                _fsync_files(out, files)  # on disk before the marker can say so
                os.rename(out, target)
            else:
                for name in files:
                    self.fs.put_file(os.path.join(out, name), f"{target}/{name}")
        universal = {"step": marker["step"], "source_world_size": marker["world_size"], "files": files,
                     "sha256": sha256, "bytes": size, "seconds": round(time.monotonic() - start, 1)}
        write_atomic(self.fs, f"{target}/{MARKER}", json.dumps(universal, indent=1).encode())
        print(f"converted {self.url}/{tag}: {size / 2**30:.2f} GiB in {universal['seconds']}s", flush=True)
        return universal

    @contextlib.contextmanager
    def _node_copy(self, relative: str, universal: dict):
        """Collective: a local folder holding the universal checkpoint, verified. From an object
        store each node downloads it once (its local rank 0), not once per rank."""
        if self.local:
            folder = f"{self.root}/{relative}"
            if self.local_rank == 0:
                verify_files(f"{self.url}/{relative}", universal, folder, universal["files"])
            dist.barrier()
            yield folder
            return
        # Ranks are numbered node by node: the node's first rank names its copy (nodes that share
        # a /tmp, as in tests on one machine, keep apart).
        key = hashlib.sha256(f"{self.url}/{relative}/{self.rank - self.local_rank}".encode()).hexdigest()[:16]
        folder = os.path.join(tempfile.gettempdir(), f"coatnet_scale_universal_{key}", os.path.basename(relative))
        if self.local_rank == 0:
            shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
            for name in universal["files"]:
                os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
                self.fs.get_file(f"{self.root}/{relative}/{name}", os.path.join(folder, name))
            verify_files(f"{self.url}/{relative}", universal, folder, universal["files"])
        dist.barrier()
        try:
            yield folder
        finally:
            dist.barrier()
            if self.local_rank == 0:
                shutil.rmtree(os.path.dirname(folder), ignore_errors=True)

    def _needed(self, name: str) -> bool:
        """What this rank loads: its own files, plus rank 0's non-partitioned ones (mp_rank_*)."""
        return name.startswith("mp_rank_") or self._own(name)

    def _own(self, name: str) -> bool:
        """The files this rank wrote: its ZeRO partitions and trainer state, and on rank 0 the
        non-partitioned mp_rank_* file."""
        return (
            f"zero_pp_rank_{self.rank}_" in name
            or name == f"trainer_state_rank{self.rank}.pt"
            or (self.rank == 0 and name.startswith("mp_rank_"))
        )


def clean_stale_staging(folder: str | None = None) -> list[str]:
    """Remove the staging folders of processes that are gone (a crash mid-save or mid-load
    leaves them, each as large as a rank's checkpoint); returns what was removed. Folders of
    live processes (another run on this host) are left alone."""
    folder = folder or tempfile.gettempdir()
    removed = []
    for name in os.listdir(folder):
        pid = name[len(STAGING):].split("_pid", 1)[-1].split("_", 1)[0] if name.startswith(STAGING) else ""
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            removed.append(name)
    return removed


class CheckpointTampered(RuntimeError):
    """A checkpoint file does not match the checksum its marker recorded."""


def verify_files(url: str, marker: dict, folder: str, names: list[str]) -> None:
    """Each of `names` in the local `folder` (a copy of checkpoint `url`) matches the marker's
    sha256, checked before anything unpickles it."""
    expected = marker.get("sha256")
    if expected is None:
        print(f"{url} was written without checksums; its files are not verified", flush=True)
        return
    for name in sorted(names):
        if name not in expected:
            raise CheckpointTampered(f"{url}/{name}: not in the marker's checksums; refusing to load it")
        digest = file_sha256(os.path.join(folder, name))
        if digest != expected[name]:
            raise CheckpointTampered(
                f"{url}/{name}: sha256 {digest[:16]}… differs from the marker's {expected[name][:16]}…; "
                f"the file changed after the checkpoint was written: refusing to load it"
            )


def _fsync_files(folder: str, names: list[str]) -> None:
    """fsync `names` (paths relative to `folder`: only what this rank wrote; on a shared
    filesystem the others are other ranks' to sync, possibly still being written), and the
    folder, so their names are durable too."""
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
