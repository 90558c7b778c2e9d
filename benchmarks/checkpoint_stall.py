"""How long a checkpoint save stops the training loop, with the upload in the loop
(`checkpoint.async_upload=false`) and in the background (`true`), on an S3 endpoint whose upload
bandwidth is throttled.

    python benchmarks/checkpoint_stall.py [--upload-mib-s 4] [--steps 170] [--every 40]

The S3 server is moto's threaded server on 127.0.0.1 (the one the test suite uses), behind a
TCP proxy (tests/s3proxy.py) that passes at most --upload-mib-s MiB/s from the client to the
server (responses pass freely): a rank's share of a slow link to the object store, so that the
synchronous upload of the tiny run's checkpoint takes seconds, as CoAtNet-7's 1.2 GB per rank
does on a real one. Each mode is one run of `python -m coatnet_scale.pretrain --without-ray` (the
project's loop, one CPU worker) on configs/tiny.yaml, saving every --every steps and not at the
end (the final save waits for its upload in both modes by design), so every save it makes is a
periodic one. Per save it prints the seconds the loop blocked (the save call, and the commit at a
later step boundary: the digests' gather and the marker) and rank 0's hashing and upload seconds,
as the loop logs them; the last line ends with `ratio R`, the mean blocked seconds per save in
the background over the synchronous mode (goal: R <= 0.3).
"""
import argparse
import json
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from s3proxy import LoopbackProxy  # noqa: E402  (the tests' proxy, which plays a slow link here)

from coatnet_scale.storage import DEMO_DIR  # noqa: E402  (where `make demo` builds it)
from dataprep.demo import build_demo_corpus  # noqa: E402

SAVED = re.compile(r"checkpoint step (\d+) saved to \S+: the loop blocked ([\d.]+)s, rank 0 stored its files in ([\d.]+)s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, background: bool, endpoint: str, bucket: str, args: argparse.Namespace, proxy: LoopbackProxy,
        fs) -> dict:
    overrides = [f"storage.url=s3://{bucket}/runs", f"storage.endpoint_url={endpoint}", f"run_name={mode}",
                 f"data.train_manifest={DEMO_DIR}/train/manifest.json", "data.val_manifest=null",
                 "data.num_workers=0", "cluster.num_workers=1", "train.global_batch_size=32",
                 f"train.total_steps={args.steps}", "train.warmup_steps=5", "train.log_every=1000",
                 f"checkpoint.every_steps={args.every}", "checkpoint.at_end=false", "checkpoint.keep=2",
                 f"checkpoint.async_upload={str(background).lower()}", "monitoring.enabled=false"]
    command = [sys.executable, "-m", "coatnet_scale.pretrain", "--config", str(REPO / "configs" / "tiny.yaml"),
               "--without-ray", *(f"--set={o}" for o in overrides)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    saves = [(int(s), float(b), float(u)) for s, b, u in SAVED.findall(result.stdout)]
    files = sorted(fs.glob(f"{bucket}/runs/{mode}/metrics-step*.json"))
    final = json.loads(fs.cat_file(files[-1]))["final"]
    checkpoint = f"{bucket}/runs/{mode}/checkpoints/step_{saves[-1][0]:09d}"
    size = sum(fs.du(checkpoint, total=False).values())
    return {"saves": saves, "final": final, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upload-mib-s", type=float, default=4.0, help="the proxy's client-to-server bandwidth")
    parser.add_argument("--steps", type=int, default=170)
    parser.add_argument("--every", type=int, default=40, help="checkpoint.every_steps (saves further apart than an upload takes)")
    args = parser.parse_args()

    import s3fs
    from moto.server import ThreadedMotoServer

    build_demo_corpus()  # idempotent: the quick start's corpus

    os.environ.update(AWS_ACCESS_KEY_ID="benchmark-key-id", AWS_SECRET_ACCESS_KEY="benchmark-secret",
                      AWS_DEFAULT_REGION="us-east-1", DS_ACCELERATOR="cpu")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    moto_port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    server.start()
    try:
        direct = f"http://127.0.0.1:{moto_port}"
        fs = s3fs.S3FileSystem(endpoint_url=direct, skip_instance_cache=True)
        bucket = "checkpoint-stall"
        fs.mkdir(bucket)
        proxy = LoopbackProxy(moto_port, rate=args.upload_mib_s * 2**20)
        endpoint = proxy.endpoint
        print(f"S3: moto on {direct}, throttled to {args.upload_mib_s:g} MiB/s upload through {endpoint}; "
              f"tiny run, 1 CPU worker, {args.steps} steps, a checkpoint every {args.every}", flush=True)
        results = {}
        for mode, background in (("synchronous", False), ("background", True)):
            results[mode] = r = run(mode, background, endpoint, bucket, args, proxy, fs)
            print(f"{mode}: checkpoint {r['bytes'] / 2**20:.1f} MiB; per save (step: loop blocked s, rank 0 hash+upload s): "
                  + ", ".join(f"{s}: {b:.2f}, {u:.2f}" for s, b, u in r["saves"])
                  + f"; wait at the end of the run {r['final']['checkpoint_final_wait_seconds']:.2f} s", flush=True)
    finally:
        server.stop()
    mean = {mode: results[mode]["final"]["checkpoint_blocked_seconds"] / results[mode]["final"]["checkpoint_saves"]
            for mode in results}
    upload = statistics.mean(u for _, _, u in results["synchronous"]["saves"])
    print(f"loop blocked per save: synchronous {mean['synchronous']:.2f} s (of which upload {upload:.2f} s), "
          f"background {mean['background']:.2f} s; ratio {mean['background'] / mean['synchronous']:.3f}")


if __name__ == "__main__":
    main()
