"""Checkpoints on any fsspec store that count only when complete.

Layout: {storage.url}/{run_name}/checkpoints/step_000001000/ holds DeepSpeed's files (every
rank's ZeRO-3 partition of parameters and optimizer state, the LR scheduler, rank 0's
non-partitioned state), one `trainer_state_rank{r}.pt` per rank (step, loader position, RNG
states), and COMPLETE.json. Rank 0 writes COMPLETE.json only after every rank has written
its files and passed a barrier, so a checkpoint interrupted at any point has no marker and is
never resumed from. DeepSpeed's `latest` file is neither written nor read. After each save
rank 0 keeps the newest `keep` complete checkpoints and removes the rest.

On a local (or shared) filesystem DeepSpeed writes in place; for object stores each rank
writes to its own local staging folder and uploads, and on load fetches only its own files.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem

from coatnet_scale.storage import url_to_fs, write_atomic

MARKER = "COMPLETE.json"


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


class Checkpoints:
    def __init__(self, url: str, storage_options: dict, keep: int, rank: int, world_size: int,
                 metadata: dict | None = None):
        self.url = url.rstrip("/")
        self.metadata = metadata or {}  # recorded in every marker, e.g. the model section for fine-tuning
        self.fs, self.root = url_to_fs(self.url, storage_options)
        self.root = self.root.rstrip("/")
        self.keep, self.rank, self.world_size = keep, rank, world_size
        self.local = isinstance(self.fs, LocalFileSystem)

    def _staging(self):
        """Where this rank writes or reads before an upload or after a download: the store
        itself when local, else a temporary folder removed when the operation ends."""
        if self.local:
            return contextlib.nullcontext(self.root)
        return tempfile.TemporaryDirectory(prefix=f"coatnet_scale_ckpt_rank{self.rank}_")

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

    # -- save ------------------------------------------------------------------------------

    def save(self, engine, step: int, trainer_state: dict) -> float:
        """Collective: every rank calls it. Returns the seconds it took."""
        start = time.monotonic()
        tag = tag_for(step)
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)
        with self._staging() as save_dir:
            written = os.path.join(save_dir, tag)
            engine.save_checkpoint(save_dir, tag=tag, save_latest=False)
            os.makedirs(written, exist_ok=True)
            torch.save(trainer_state, os.path.join(written, f"trainer_state_rank{self.rank}.pt"))
            if self.local:
                _fsync_files(written)  # on disk before the marker can say so
            else:
                for name in sorted(os.listdir(written)):
                    self.fs.put_file(os.path.join(written, name), f"{self.root}/{tag}/{name}")
        dist.barrier()  # every rank's files are in storage before the marker exists
        if self.rank == 0:
            marker = {"step": step, "world_size": self.world_size, "files": sorted(self._files(tag)), **self.metadata}
            write_atomic(self.fs, f"{self.root}/{tag}/{MARKER}", json.dumps(marker, indent=1).encode())
            self._prune()
        dist.barrier()
        return time.monotonic() - start

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
                self.fs.rm(f"{self.root}/{tag}", recursive=True)

    # -- load ------------------------------------------------------------------------------

    def load(self, engine, tag: str) -> dict:
        """Collective: restore DeepSpeed's state and return this rank's trainer state."""
        marker = self._marker(tag)
        if marker["world_size"] != self.world_size:
            raise RuntimeError(
                f"{self.url}/{tag} was written by {marker['world_size']} workers; resuming needs the same "
                f"number (this run has {self.world_size}). Fine-tuning consolidates it instead."
            )
        with self._staging() as load_dir:
            if not self.local:
                os.makedirs(os.path.join(load_dir, tag), exist_ok=True)
                for name in marker["files"]:
                    if self._needed(name):
                        self.fs.get_file(f"{self.root}/{tag}/{name}", os.path.join(load_dir, tag, name))
            engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
            # On the CPU: a restarted group may put this rank on another GPU than the one that saved it.
            return torch.load(os.path.join(load_dir, tag, f"trainer_state_rank{self.rank}.pt"), map_location="cpu",
                              weights_only=True)

    def _needed(self, name: str) -> bool:
        """This rank's own files, plus rank 0's non-partitioned ones (mp_rank_*)."""
        return (
            name.startswith("mp_rank_")
            or f"zero_pp_rank_{self.rank}_" in name
            or name == f"trainer_state_rank{self.rank}.pt"
        )


def _fsync_files(folder: str) -> None:
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
