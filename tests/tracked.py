"""Reading back what the tracking sinks wrote, with each tool's own reader: TensorBoard's
EventAccumulator (which applies purge steps, as TensorBoard's UI does) and, for W&B's offline
runs, its `.wandb` transaction log (LevelDB's log format: 32 KiB blocks of records with a
7-byte header, after W&B's own 7-byte file header) decoded with W&B's protobuf Record, the
records `wandb sync` uploads."""
import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def tensorboard_texts(folder: Path, tag: str) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(f"{tag}/text_summary")]


def raw_tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """Every step written for `tag`, in file order, purges not applied."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, pending = 7, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zeroed: nothing more written
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_files(folder: Path, run_id: str) -> list[Path]:
    """The offline runs of one W&B run id, oldest first (a resumed run writes another)."""
    return sorted(folder.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def wandb_history(folder: Path, run_id: str) -> list[dict]:
    rows = []
    for path in wandb_files(folder, run_id):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def wandb_config(folder: Path, run_id: str) -> dict:
    config = {}
    for path in wandb_files(folder, run_id):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind in ("run", "config"):  # wandb.init's config rides on the run record
                items = record.run.config.update if kind == "run" else record.config.update
                config.update({item.key: json.loads(item.value_json) for item in items})
    return config
