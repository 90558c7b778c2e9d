"""Hand a pretraining run off to ImageNet-1K fine-tuning at 384 and 512, in one command.

    python launch/handoff.py s3://my-bucket/runs/coatnet6-in21k-224
    python launch/handoff.py RUN_URL --configs configs/coatnet6_ft384.yaml [--set storage.url=...]

Finds the newest complete checkpoint of the run (COMPLETE.json; an unfinished save is never
chosen), checks that each fine-tune config is for the same model, then submits one
`python -m coatnet_scale.finetune --init <that checkpoint>` job per config through
launch/submit.py, one after the other: each job starts when the one before it succeeded (each
shipped fine-tune config is sized for half the cluster's maximum; two at once would ask the
autoscaler for all of it), printing their job ids and outcomes. `--together` submits them all
at once and waits for all. The init URL names the exact step folder, so a restarted fine-tune
job starts from the same weights (or resumes from its own checkpoints). Default configs:
configs/coatnet{N}_ft384.yaml and _ft512.yaml for the run's model. Exit status 0 only when
every job succeeded.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from submit import REPO, client_for, follow, submit


def default_configs(model_name: str) -> list[str]:
    stem = model_name.replace("coatnet_", "coatnet")
    found = [REPO / "configs" / f"{stem}_ft{size}.yaml" for size in (384, 512)]
    missing = [str(p) for p in found if not p.exists()]
    if missing:
        raise SystemExit(f"handoff: no fine-tune configs for {model_name} ({', '.join(missing)}); pass --configs")
    return [str(p) for p in found]


def main(argv: list[str] | None = None) -> int:
    from coatnet_scale.config import ConfigError, load_config
    from coatnet_scale.engine.consolidate import CheckpointError, find_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the pretraining run: its folder, checkpoints folder or one step folder")
    parser.add_argument("--configs", nargs="+", help="fine-tune configs (default: the model's _ft384 and _ft512)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every fine-tune job (repeatable)")
    parser.add_argument("--weights", choices=["raw", "ema"], help="which weights of the checkpoint (default: as configured)")
    parser.add_argument("--address", help="Ray dashboard URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME", help="forward this environment variable")
    parser.add_argument("--no-working-dir", action="store_true", help="use the package installed on the cluster")
    parser.add_argument("--together", action="store_true", help="submit every job at once (default: one after another)")
    parser.add_argument("--no-wait", action="store_true", help="submit and return (with --together)")
    args = parser.parse_args(argv)
    if args.no_wait and not args.together:
        parser.error("--no-wait needs --together: one job after another waits for each")

    try:
        checkpoint, marker = find_checkpoint(args.run)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"handoff: {e}", file=sys.stderr)
        return 2
    model = marker["model"]
    print(f"handoff: {checkpoint}: {model['name']} at {model['image_size']} px, {model['num_classes']} classes, "
          f"step {marker['step']}, written by {marker['world_size']} workers", flush=True)
    configs = args.configs or default_configs(model["name"])
    for path in configs:  # every config checked before the first job is submitted
        try:
            name = load_config(path, args.overrides).model.name
        except ConfigError as e:
            print(f"handoff: config error:\n{e}", file=sys.stderr)
            return 2
        if name != model["name"]:
            print(f"handoff: {path} fine-tunes {name}, the checkpoint holds {model['name']}", file=sys.stderr)
            return 2

    client = client_for(args.address)

    def start(path: str) -> str:
        job_args = ["--config", path, "--init", checkpoint, *(f"--set={o}" for o in args.overrides)]
        if args.weights:
            job_args.append(f"--set=finetune.init_weights={args.weights}")
        job_id = submit(client, "finetune", job_args, forward_env=args.env, working_dir=not args.no_working_dir,
                        submission_id=f"finetune-{Path(path).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"handoff: submitted {job_id} ({path})", flush=True)
        return job_id

    def outcome(job_id: str) -> bool:
        status = follow(client, job_id, show_logs=False)
        print(f"handoff: {job_id} {status}", flush=True)
        if status != "SUCCEEDED":
            print(client.get_job_logs(job_id)[-3000:], file=sys.stderr)
        return status == "SUCCEEDED"

    if args.together:
        jobs = [start(path) for path in configs]
        return 0 if args.no_wait or all([outcome(job_id) for job_id in jobs]) else 1
    for i, path in enumerate(configs):
        if not outcome(start(path)):
            if configs[i + 1:]:
                print(f"handoff: not submitted: {', '.join(configs[i + 1:])}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
