"""Command line: `python -m dataprep SOURCE DEST [options]`, `python -m dataprep index SHARDS... DEST`,
`python -m dataprep verify DEST` and `python -m dataprep demo [DEST]` (the quick start's corpus).

S3 credentials come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)
or a profile; they are never taken on the command line, logged, or written to the manifest.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from dataprep.images import ImageOptions
from dataprep.index import IndexOptions, index_shards
from dataprep.parquet import parquet_files, prepare_parquet
from dataprep.prep import PrepError, PrepOptions, prepare
from dataprep.shards import verify_dataset
from dataprep.sources import SourceError

SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(text: str) -> int:
    """'256MiB', '1GB', '500k', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256MiB or 1GB)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2) or ""])


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("S3 options (credentials come from the AWS environment or profile)")
    group.add_argument("--s3-endpoint-url", help="e.g. a MinIO or R2 endpoint (default: AWS, or $AWS_ENDPOINT_URL)")
    group.add_argument("--s3-region")
    group.add_argument("--s3-profile", help="a profile from ~/.aws/config")


def storage_options_from(args: argparse.Namespace) -> dict:
    options: dict = {}
    endpoint = args.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    if args.s3_profile:
        options["profile"] = args.s3_profile
    if args.s3_region:
        options["client_kwargs"] = {"region_name": args.s3_region}
    return options


def prep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dataprep",
        description="Shard an image corpus into webdataset tar shards with a manifest. "
        "Run `python -m dataprep verify DEST` to check a finished dataset, and `python -m dataprep index --help` "
        "to index webdataset shards you already have instead.",
    )
    p.add_argument("source", metavar="SOURCE", help="ImageFolder tree, tar of per-class tars, folder/tar of images with "
                   "--labels, or parquet files (a file, a glob such as 'data/train-*.parquet', or a folder of them)")
    p.add_argument("dest", metavar="DEST", help="output folder or fsspec URL (s3://bucket/prefix, gs://...)")
    p.add_argument("--labels", help="CSV (path,label) or JSONL labels file for a folder or tar of images")
    p.add_argument("--classes", help="class order from a manifest.json (e.g. the train split's) or a text file")
    p.add_argument("--split", default="train", help="shard name prefix (default: train)")
    p.add_argument("--samples-per-shard", type=int, help="close a shard after this many samples")
    p.add_argument("--shard-bytes", type=parse_size, help="close a shard before it passes this size (default 256MiB)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    p.add_argument("--max-side", type=int, help=f"resize so the shorter side is at most this; 0 keeps sizes (default: "
                   f"{ImageOptions.max_side}; 0 for parquet, whose images are stored as they are)")
    p.add_argument("--min-side", type=int, default=ImageOptions.min_side, help="reject images whose shorter side is below this (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=ImageOptions.max_pixels, help="reject larger images unread, as decompression bombs (default: %(default)s)")
    p.add_argument("--quality", type=int, default=ImageOptions.quality, help="JPEG quality of re-encoded images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    p.add_argument("--label-column", default="label", help="parquet: the label column (default: %(default)s)")
    p.add_argument("--image-column", default="image", help="parquet: the image column, a struct {bytes, path} or "
                   "binary (default: %(default)s)")
    p.add_argument(
        "--ray", nargs="?", const="", metavar="ADDRESS",
        help="spread shards over a Ray cluster's CPUs: ADDRESS, else $RAY_ADDRESS, else a local Ray; "
        "SOURCE and DEST must then be reachable from every node (S3, a shared filesystem)",
    )
    group = p.add_argument_group("metrics (Prometheus; see docs/monitoring.md)")
    group.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve /metrics on this port while sharding (0: a free port, printed)")
    group.add_argument("--metrics-address", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    group.add_argument("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
                       help="keep serving this long after finishing, so the final counts are scraped; Ctrl-C ends it")
    add_storage_arguments(p)
    return p


def index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dataprep index", fromfile_prefix_chars="@",
        description="Write DEST/manifest.json (sample counts, sizes, sha256, per-sample offsets, classes) for "
        "webdataset shards that already exist, without rewriting them; then train with data.train_manifest "
        "pointing at it. @FILE reads shard URLs from FILE, one per line.",
    )
    p.add_argument("shards", metavar="SHARDS", nargs="+",
                   help="shard URLs or brace patterns, e.g. 's3://bucket/in21k/train-{000000..002047}.tar'")
    p.add_argument("dest", metavar="DEST", help="folder or fsspec URL for manifest.json, rejected.jsonl, offsets/")
    p.add_argument("--label-key", metavar="FIELD", help="take labels from this field of each sample's .json "
                   "(a class name or an integer) instead of .cls")
    p.add_argument("--classes", help="class order from a manifest.json or a text file (default: the labels found)")
    p.add_argument("--verify", action="store_true", help="decode every image now and reject those that fail "
                   "(default: they are skipped and counted while training)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="read shards on a Ray cluster's CPUs: ADDRESS, else $RAY_ADDRESS, else a local Ray")
    add_storage_arguments(p)
    return p


def index_main(argv: list[str]) -> int:
    args = index_parser().parse_args(argv)
    options = IndexOptions(label_key=args.label_key, classes=args.classes, verify=args.verify)
    try:
        index_shards(args.shards, args.dest, options, args.workers, args.ray, storage_options_from(args),
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    except PrepError as e:
        print(f"dataprep: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dataprep: error: {e}\ndataprep: rerun the same command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dataprep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        p = argparse.ArgumentParser(prog="python -m dataprep verify", description="Re-read every shard and check it against the manifest.")
        p.add_argument("dest", metavar="DEST")
        add_storage_arguments(p)
        args = p.parse_args(argv[1:])
        problems = verify_dataset(args.dest, storage_options_from(args), progress=lambda line: print(line, file=sys.stderr))
        for problem in problems:
            print(f"verify: {problem}")
        print(f"verify: {args.dest}: " + (f"{len(problems)} problem(s)" if problems else "every shard matches the manifest"))
        return 1 if problems else 0

    if argv[:1] == ["index"]:
        return index_main(argv[1:])

    if argv[:1] == ["demo"]:
        p = argparse.ArgumentParser(prog="python -m dataprep demo",
                                    description="Build the demo corpus: scikit-learn's digits, sharded (idempotent).")
        from coatnet_scale.storage import DEMO_DIR
        from dataprep.demo import build_demo_corpus

        p.add_argument("dest", metavar="DEST", nargs="?", default=DEMO_DIR,
                       help="default: %(default)s, where every process on this host finds it")

        build_demo_corpus(p.parse_args(argv[1:]).dest)
        return 0

    args = prep_parser().parse_args(argv)
    if not 1 <= args.quality <= 100:
        prep_parser().error(f"--quality must be 1..100, got {args.quality}")
    shard_bytes = args.shard_bytes
    if shard_bytes is None and args.samples_per_shard is None:
        shard_bytes = PrepOptions.shard_bytes
    storage_options = storage_options_from(args)
    try:
        parquet = parquet_files(args.source, storage_options)
    except SourceError as e:
        print(f"dataprep: error: {e}", file=sys.stderr)
        return 2
    if parquet and args.labels:
        print("dataprep: error: --labels is for folders and tars of images; parquet labels come from a column "
              "(--label-column)", file=sys.stderr)
        return 2
    max_side = args.max_side if args.max_side is not None else 0 if parquet else ImageOptions.max_side
    options = PrepOptions(
        split=args.split, samples_per_shard=args.samples_per_shard, shard_bytes=shard_bytes, seed=args.seed,
        labels=args.labels, classes=args.classes,
        image=ImageOptions(max_side=max_side, min_side=args.min_side, quality=args.quality, max_pixels=args.max_pixels),
    )
    metrics = None
    if args.metrics_port is not None:
        from monitoring.dataprep import DataprepMetrics

        metrics = DataprepMetrics(args.split, args.metrics_address, args.metrics_port)
    try:
        if parquet:
            prepare_parquet(args.source, parquet, args.dest, options, args.workers, args.ray, storage_options,
                            args.image_column, args.label_column, observe=metrics.observe if metrics else None)
        else:
            prepare(args.source, args.dest, options, args.workers, args.ray, storage_options,
                    observe=metrics.observe if metrics else None)
    except (PrepError, SourceError) as e:
        print(f"dataprep: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # storage trouble that retries did not cure: nothing finished is lost
        print(f"dataprep: error: {e}\ndataprep: rerun the same command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dataprep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if metrics is not None:
        metrics.close(args.metrics_linger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
