"""Checks on where the worker group actually landed, which only the workers see.

Preflight judges the cluster before the group exists; Ray places the workers afterwards, and an
autoscaling cluster may spread them over nodes preflight never saw. So each worker, once the
process group is up, learns every rank's node (engine/worker.py: one all_gather of a few
bytes) and the group stops before it trains when:

- `storage.url` is a local path, the workers are on more than one node, and `storage.shared`
  does not say the path is one filesystem mounted everywhere: each node would write its own
  disk and the checkpoint marker would list only rank 0's files;
- ZeRO++ hpZ groups (`deepspeed.zero_hpz_partition_size` consecutive ranks) are not each on
  one node: the secondary copy would then be gathered over the network it exists to avoid.
"""
from __future__ import annotations


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def placement_problems(config, nodes: list[str]) -> list[str]:
    """What is wrong with ranks placed on `nodes` (node id by rank); [] when nothing is."""
    problems = []
    distinct = len(set(nodes))
    if distinct > 1 and is_local(config.storage.url) and not config.storage.shared:
        problems.append(
            f"storage.url: {config.storage.url} is a local path and the {len(nodes)} workers are on {distinct} nodes; "
            f"each node would write its own disk. Use object storage (s3://...), or a filesystem every node "
            f"mounts at that path and say so with storage.shared: true")
    hpz = config.deepspeed.zero_hpz_partition_size
    split = [start for start in range(0, len(nodes), hpz) if len(set(nodes[start:start + hpz])) > 1]
    if hpz > 1 and split:
        problems.append(
            f"deepspeed.zero_hpz_partition_size: {hpz} must divide the number of workers on every node; ranks "
            f"{split[0]}..{split[0] + hpz - 1} span nodes (workers per node: "
            f"{', '.join(str(nodes.count(n)) for n in dict.fromkeys(nodes))})")
    return problems
