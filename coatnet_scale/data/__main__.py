"""`python -m coatnet_scale.data keys MANIFEST_URL --rank R --world-size W --num-workers K --epoch E`
prints, one per line, the sample keys rank R trains on in epoch E, in order (exact mode).

With `--resize-at B --new-world-size M` it prints every key read in epoch E by a group of W
ranks that each consumed B batches and then resized to M ranks, each line prefixed by the
group's size and the rank that read it (`W:r key`, then `M:r key`): each key once.

`python -m coatnet_scale.data keys --skipped RUN_URL` prints the keys that rollbacks skipped
(engine/health.py records them in RUN_URL/health/), each line `S:r key`: skipped after the trouble
at step S, from rank r's batches.

(The demo corpus is built by the sharder: `python -m dataprep demo [DEST]`.)"""
import argparse
import sys

from coatnet_scale.data.loader import LoaderSpec, epoch_keys
from coatnet_scale.data.plan import Phase
from coatnet_scale.data.transforms import TransformSpec


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m coatnet_scale.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", help="print the keys a rank reads in an epoch, in order")
    keys.add_argument("manifest", nargs="?")
    keys.add_argument("--skipped", metavar="RUN_URL", help="the keys the run's rollbacks skipped (RUN_URL/health/)")
    keys.add_argument("--rank", type=int, default=0)
    keys.add_argument("--world-size", type=int, default=1)
    keys.add_argument("--num-workers", type=int, default=0)
    keys.add_argument("--epoch", type=int, default=0)
    keys.add_argument("--batch-size", type=int, default=32)
    keys.add_argument("--seed", type=int, default=0)
    keys.add_argument("--shuffle-buffer", type=int, default=1000)
    keys.add_argument("--resize-at", type=int, metavar="B", help="each rank consumed B batches, then the group resized")
    keys.add_argument("--new-world-size", type=int, metavar="M", help="the group's size after --resize-at")
    keys.add_argument("--new-num-workers", type=int, help="DataLoader workers per rank after the resize (default: the same)")
    keys.add_argument("--new-batch-size", type=int, help="batch size after the resize (default: the same)")
    args = parser.parse_args()
    if args.skipped:
        sys.stdout.write("".join(line + "\n" for line in skipped_keys(args.skipped)))
        return
    if args.manifest is None:
        parser.error("keys needs MANIFEST (or --skipped RUN_URL)")
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank must be in [0, {args.world_size})")
    if (args.resize_at is None) != (args.new_world_size is None):
        parser.error("--resize-at and --new-world-size go together")

    def loader_spec(batch_size: int, workers: int) -> LoaderSpec:
        return LoaderSpec(args.manifest, batch_size, TransformSpec(image_size=32), num_workers=workers,
                          seed=args.seed, shuffle_buffer=args.shuffle_buffer)

    try:
        if args.resize_at is None:
            lines = epoch_keys(loader_spec(args.batch_size, args.num_workers), args.rank, args.world_size, args.epoch)
        else:
            before = loader_spec(args.batch_size, args.num_workers)
            after = loader_spec(args.new_batch_size or args.batch_size,
                                args.num_workers if args.new_num_workers is None else args.new_num_workers)
            phases = (Phase(args.world_size, args.num_workers, args.batch_size, args.resize_at),)
            lines = [f"{args.world_size}:{r} {k}" for r in range(args.world_size)
                     for k in epoch_keys(before, r, args.world_size, args.epoch, batches=args.resize_at)]
            lines += [f"{args.new_world_size}:{r} {k}" for r in range(args.new_world_size)
                      for k in epoch_keys(after, r, args.new_world_size, args.epoch, phases)]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.stdout.write("".join(line + "\n" for line in lines))


def skipped_keys(run_url: str) -> list[str]:
    """`S:r key` for every sample the run's rollbacks passed over, from their records."""
    import json

    from coatnet_scale.storage import url_to_fs

    fs, root = url_to_fs(f"{run_url.rstrip('/')}/health")
    lines = []
    for path in sorted(fs.glob(f"{root}/rollback-*.json")):
        record = json.loads(fs.cat_file(path))
        for span in record.get("skipped", []):
            spec = LoaderSpec(span["manifest"], span["batch_size"], TransformSpec(image_size=32),
                              num_workers=span["num_workers"], seed=span["seed"], shuffle_buffer=span["shuffle_buffer"])
            phases = tuple(Phase(*p) for p in span["phases"])
            for rank in range(span["world_size"]):
                keys = epoch_keys(spec, rank, span["world_size"], span["epoch"], phases, span["to_batch"],
                                  span["from_batch"])
                lines += [f"{record['step']}:{rank} {key}" for key in keys]
    return lines


if __name__ == "__main__":
    main()
