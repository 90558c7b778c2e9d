"""`python -m coatnet_scale.data keys MANIFEST_URL --rank R --world-size W --num-workers K --epoch E`
prints, one per line, the sample keys rank R trains on in epoch E, in order (exact mode).
`python -m coatnet_scale.data demo [DEST]` builds the demo corpus (default data/demo)."""
import argparse
import sys

from coatnet_scale.data.demo import build_demo_corpus
from coatnet_scale.data.loader import LoaderSpec, epoch_keys
from coatnet_scale.data.transforms import TransformSpec


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m coatnet_scale.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", help="print the keys a rank reads in an epoch, in order")
    keys.add_argument("manifest")
    keys.add_argument("--rank", type=int, default=0)
    keys.add_argument("--world-size", type=int, default=1)
    keys.add_argument("--num-workers", type=int, default=0)
    keys.add_argument("--epoch", type=int, default=0)
    keys.add_argument("--batch-size", type=int, default=32)
    keys.add_argument("--seed", type=int, default=0)
    keys.add_argument("--shuffle-buffer", type=int, default=1000)
    demo = commands.add_parser("demo", help="build the demo corpus from scikit-learn's digits")
    demo.add_argument("dest", nargs="?", default="data/demo")
    args = parser.parse_args()
    if args.command == "demo":
        build_demo_corpus(args.dest)
        return
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank must be in [0, {args.world_size})")
    spec = LoaderSpec(args.manifest, args.batch_size, TransformSpec(image_size=32), num_workers=args.num_workers,
                      seed=args.seed, shuffle_buffer=args.shuffle_buffer)
    try:
        keys_in_order = epoch_keys(spec, args.rank, args.world_size, args.epoch)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.stdout.write("".join(k + "\n" for k in keys_in_order))


if __name__ == "__main__":
    main()
