"""The step watchdog: a rank that makes no progress dumps every thread's stack and exits.

A frozen rank (a hung GPU, a stalled read, a deadlock) leaves the others waiting inside a
collective, and neither Ray's health poll nor the process-group timeout ends that soon. So every
rank arms `faulthandler.dump_traceback_later(timeout, exit=True)` and re-arms it after each step
(re-arming resets the timer; faulthandler's own thread needs neither the GIL nor the main
thread, which Ray Train's training thread is not). A step that does not finish within
`train.hang_timeout_s` (`train.startup_timeout_s` for the first step after a start or resume,
for evaluation and for checkpoints) makes the rank write the stacks and `_exit(1)`: the group is
torn down and restarted from the newest complete checkpoint. A frozen rank cannot dump itself;
the ranks waiting on it can, and they are the ones that time out.

The stacks land in {storage.url}/{run_name}/diagnostics/{job}/ as {time}-rank{R}.txt, written
in place on a local or shared filesystem. With object storage they go to a node-local folder
first (a dying process cannot upload), and the next attempt on that node uploads them, each
once however many of its ranks start there (`Watchdog._upload_leftovers`). Files
of ranks that never timed out are empty and removed when the rank ends normally.

The collective timeout is set from the same key (`collective_timeout_s`), longer than the step
deadline so the stacks come first; on GPUs the NCCL flight recorder dumps beside them
(`gpu_worker_env`).
"""
from __future__ import annotations

import faulthandler
import hashlib
import os
import tempfile
import time

from fsspec.implementations.local import LocalFileSystem

from coatnet_scale.storage import url_to_fs

CLAIMED = ".uploading-"  # a dump a rank is uploading: .uploading-{pid}-{name}


def collective_timeout_s(hang_timeout_s: float) -> float:
    """The process-group timeout: the step deadline plus 5 minutes, so a rank stuck in a
    collective dumps its stacks before the collective gives up (torch's default is 30 min)."""
    return hang_timeout_s + 300


def local_folder(run_url: str) -> str:
    """Where this node's ranks write diagnostics when the run's storage is not a local path."""
    key = hashlib.sha256(run_url.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "coatnet_scale_diagnostics", key)


def diagnostics_url(run_url: str, job: str | None) -> str:
    return f"{run_url.rstrip('/')}/diagnostics/{job or 'standalone'}"


def gpu_worker_env(run_url: str) -> dict:
    """A GPU worker's environment, set before CUDA starts (a value the user set wins).
    NCCL's flight recorder: dumped on a collective timeout, into diagnostics/ (a node-local
    folder, uploaded by the next attempt, for object storage); it needs
    TORCH_NCCL_ASYNC_ERROR_HANDLING=3, not Ray's default 1. Expandable allocator segments: on
    an H200, CoAtNet-7 at the planner's largest micro-batch ran out of memory with 34 GiB of
    the device reserved by PyTorch's allocator but unallocated (fragments)."""
    fs, path = url_to_fs(f"{run_url.rstrip('/')}/diagnostics")
    folder = path if isinstance(fs, LocalFileSystem) else local_folder(run_url)
    return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": os.path.join(folder, "nccl_trace_rank_"),
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


class Watchdog:
    def __init__(self, run_url: str, storage_options: dict, job: str | None, rank: int):
        self.url = diagnostics_url(run_url, job)
        self.fs, self.root = url_to_fs(self.url, storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        folder = self.root if self.local else local_folder(run_url)
        os.makedirs(folder, exist_ok=True)
        if not self.local:
            self._upload_leftovers(folder)
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-rank{rank:05d}-pid{os.getpid()}.txt"
        self.path = os.path.join(folder, name)
        self.file = open(self.path, "w")

    def _upload_leftovers(self, folder: str) -> None:
        """What ranks of earlier attempts on this node dumped before they died. Every rank of
        the node runs this as it starts, so a rank first claims a dump by renaming it (atomic:
        another rank finds it gone and moves on) and each dump is uploaded once. A claim whose
        rank died before it finished is taken over; a failed upload is put back for the next."""
        for name in sorted(os.listdir(folder)):
            original = name
            if name.startswith(CLAIMED):
                pid, _, original = name[len(CLAIMED):].partition("-")
                if process_alive(int(pid)):
                    continue
            path, claim = os.path.join(folder, name), os.path.join(folder, f"{CLAIMED}{os.getpid()}-{original}")
            try:
                if not os.path.getsize(path):  # an empty one is a live rank's, on this node
                    continue
                os.rename(path, claim)
            except FileNotFoundError:  # another rank of this node took it
                continue
            try:
                self.fs.put_file(claim, f"{self.root}/{original}")
            except Exception as e:  # the stacks matter, but not more than starting
                os.rename(claim, os.path.join(folder, original))
                print(f"cannot upload the stacks {original} to {self.url} (kept for the next attempt): "
                      f"{type(e).__name__}: {e}", flush=True)
                continue
            os.remove(claim)

    def arm(self, seconds: float) -> None:
        """Dump and exit unless re-armed (or closed) within `seconds`."""
        faulthandler.dump_traceback_later(seconds, exit=True, file=self.file)

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self.file.close()
        if os.path.getsize(self.path) == 0:
            os.remove(self.path)
