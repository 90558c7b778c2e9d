"""Submit pretraining or fine-tuning to a Ray cluster and follow it to the end.

    python launch/submit.py [--address URL] -- pretrain --config configs/coatnet6.yaml [--set k=v ...]
    python launch/submit.py -- finetune --config configs/coatnet6_ft384.yaml --init s3://.../step_000312000

The command after `--` is checked here first (config, keys, batch arithmetic), so a typo fails
on your laptop, not after the cluster has scheduled it. Then it is submitted with `ray job
submit` semantics: this checkout as the working directory (without .venv, data, runs, .git),
a runtime environment that carries no secrets (workers take credentials from their own
environment or instance role; `--env NAME` forwards a variable, never one that looks like a
secret), the job id printed, the logs followed, and the job's outcome as the exit status
(0 succeeded, 1 failed or stopped). Ctrl-C stops following, not the job.

The job runs in a temporary copy of this checkout, so a config inside it is named relative to
it, and relative local paths (storage.url, data manifests, --init) are made absolute: they must
exist on the cluster's nodes (one machine, or a shared filesystem). A config that holds a
secret is refused: it would be uploaded with the working directory.
The address defaults to $RAY_ADDRESS, else http://127.0.0.1:8265 (a dashboard bound to
loopback, reached through `ray dashboard cluster.yaml` or `kubectl port-forward`).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # these scripts run from a checkout: its coatnet_scale
EXCLUDES = [".venv", ".git", "data", "runs", "**/__pycache__", "*.safetensors", "*.egg-info", ".env*", "*.pem", "*.key"]
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
COMMANDS = ("pretrain", "finetune")


def checked_command(command: str, arguments: list[str], working_dir: bool = True) -> tuple[list[str], object]:
    """The entrypoint's argument list, and its config; exits 2 when the config does not validate
    or holds a secret. A config inside this checkout is named relative to it (the job runs in a
    copy of it); relative local data, storage and --init paths are made absolute."""
    from coatnet_scale.config import ConfigError, load_config
    from coatnet_scale.models import unknown_model
    from coatnet_scale.pretrain import absolute

    parser = argparse.ArgumentParser(prog=f"submit.py -- {command}", add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--init")
    known, rest = parser.parse_known_args(arguments)
    if rest:
        raise SystemExit(f"submit: unexpected arguments for {command}: {' '.join(rest)}")
    try:
        config = load_config(known.config, known.overrides)
        if known.init:
            config.finetune.init_checkpoint = known.init
    except (ConfigError, ValueError) as e:
        print(f"submit: config error:\n{e}", file=sys.stderr)
        raise SystemExit(2) from None
    if unknown_model(config.model.name):
        print(f"submit: config error:\nmodel.name: {unknown_model(config.model.name)}", file=sys.stderr)
        raise SystemExit(2)
    secrets = [k for k in ("access_key_id", "secret_access_key", "session_token") if getattr(config.storage, k)]
    if secrets:
        raise SystemExit(f"submit: {known.config}: storage.{secrets[0]} is set; a submitted config is uploaded to the "
                         f"cluster. Give workers credentials through their environment or instance role.")

    def rewrite(flag: str, old: str, new: str) -> None:
        for i, a in enumerate(arguments):
            if a == old and i and arguments[i - 1] == flag:
                arguments[i] = new
            elif a == f"{flag}={old}":
                arguments[i] = f"{flag}={new}"

    arguments = list(arguments)
    if known.config and working_dir:
        resolved = Path(known.config).resolve()
        if resolved.is_relative_to(REPO):
            rewrite("--config", known.config, str(resolved.relative_to(REPO)))
    if known.init and absolute(known.init) != known.init:
        rewrite("--init", known.init, absolute(known.init))
    for key, value in (("storage.url", config.storage.url), ("data.train_manifest", config.data.train_manifest),
                       ("data.val_manifest", config.data.val_manifest)):
        if value is not None and absolute(value) != value:
            arguments.append(f"--set={key}={absolute(value)}")
    return arguments, config


def runtime_env(forward: list[str], working_dir: bool) -> dict:
    env = {}
    for name in forward:
        if SECRET_NAME.search(name):
            raise SystemExit(f"submit: --env {name}: looks like a secret; the runtime environment is visible on "
                             f"the dashboard. Give workers credentials through their environment or instance role.")
        if name in os.environ:
            env[name] = os.environ[name]
    runtime = {"env_vars": env}
    if working_dir:
        runtime.update(working_dir=str(REPO), excludes=EXCLUDES)
    return runtime


async def _print_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def follow(client, job_id: str, show_logs: bool = True, poll_seconds: float = 5.0) -> str:
    """Stream the job's logs (or wait quietly) until it ends; returns its final status."""
    try:
        if show_logs:
            asyncio.run(_print_logs(client, job_id))
        while not client.get_job_status(job_id).is_terminal():
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        print(f"\nsubmit: stopped following; the job goes on. Stop it with: ray job stop {job_id}", file=sys.stderr)
        raise SystemExit(130) from None
    return str(client.get_job_status(job_id))


def submit(client, command: str, arguments: list[str], submission_id: str | None = None,
           forward_env: list[str] = (), working_dir: bool = True) -> str:
    """Check and submit `python -m coatnet_scale.<command> <arguments>`; returns the job id."""
    if command not in COMMANDS:
        raise SystemExit(f"submit: command must be one of {', '.join(COMMANDS)}, got {command!r}")
    arguments, config = checked_command(command, arguments, working_dir)
    entrypoint = shlex.join(["python", "-m", f"coatnet_scale.{command}", *arguments])
    ours = submission_id is None
    submission_id = submission_id or f"{command}-{config.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                 runtime_env=runtime_env(list(forward_env), working_dir), entrypoint_num_cpus=0)
    except RuntimeError as e:
        # A busy dashboard may time out handing the job to its agent and hand it again, then
        # report that the job it did submit "already exists": with an id made here, it is ours.
        if ours and "already exists" in str(e):
            return submission_id
        raise


def use_token_if_present() -> None:
    """Ray's clients send a token only with RAY_AUTH_MODE=token, while a `ray start` finding
    ~/.ray/auth_token (left by `make demo`, `ray get-auth-token --generate`, or a token-auth
    head on this machine) turns token authentication on by itself. So when a token is at hand,
    turn the mode on for this process, before Ray reads it; a cluster without authentication
    ignores the token."""
    at_hand = (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
               or (Path.home() / ".ray" / "auth_token").is_file())
    if at_hand and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"


def client_for(address: str | None):
    use_token_if_present()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="python launch/submit.py [options] -- {pretrain,finetune} ARGS")
    parser.add_argument("--address", help="Ray dashboard URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    parser.add_argument("--submission-id", help="job id (default: COMMAND-RUN_NAME-TIMESTAMP)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME", help="forward this environment variable")
    parser.add_argument("--no-working-dir", action="store_true", help="use the package installed on the cluster")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument("job", nargs=argparse.REMAINDER, help="-- pretrain|finetune ARGS")
    args = parser.parse_args(argv)
    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not job:
        parser.error("give the job after --, e.g. -- pretrain --config configs/tiny.yaml")
    client = client_for(args.address)
    job_id = submit(client, job[0], job[1:], args.submission_id, args.env, not args.no_working_dir)
    print(f"submit: job {job_id} submitted to {client.get_address()}", flush=True)
    if args.no_wait:
        return 0
    status = follow(client, job_id)
    print(f"submit: job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
