"""Checkpoint bookkeeping that needs no training run: what counts as complete, what is kept."""
import json

from coatnet_scale.engine.checkpoint import MARKER, Checkpoints, tag_for


def make_checkpoint(root, step, complete=True):
    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if complete:
        (folder / MARKER).write_text(json.dumps({"step": step, "world_size": 2, "files": []}))


def test_interrupted_checkpoint_is_never_chosen(tmp_path):
    make_checkpoint(tmp_path, 100)
    make_checkpoint(tmp_path, 200)
    make_checkpoint(tmp_path, 300, complete=False)  # killed before its marker
    checkpoints = Checkpoints(str(tmp_path), {}, keep=3, rank=0, world_size=2)
    assert checkpoints.complete() == [(100, tag_for(100)), (200, tag_for(200))]
    assert checkpoints.latest() == tag_for(200)


def test_nothing_to_resume_from(tmp_path):
    assert Checkpoints(str(tmp_path / "new-run"), {}, keep=1, rank=0, world_size=1).latest() is None


def test_prune_keeps_newest_complete(tmp_path):
    for step in (100, 200, 300):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 150, complete=False)  # stale leftover of a crash
    make_checkpoint(tmp_path, 400, complete=False)  # a save that may still be in progress
    Checkpoints(str(tmp_path), {}, keep=2, rank=0, world_size=2)._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(200), tag_for(300), tag_for(400)]
