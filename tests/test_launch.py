"""The launch files start: launch/cluster-aws.yaml passes Ray's own loader and schema check,
puts every node in one subnet and security group, syncs nothing git ignores, and hands its
nodes the roles of the IAM policies shipped beside it; the KubeRay RayJob runs the same image
(launch/Dockerfile); every shipped GPU config states the AWS YAML's maximum and, when its
workers span nodes, publishes each exporter on its node's address."""
import json
import subprocess

import pytest
import yaml
from conftest import REPO

AWS = REPO / "launch" / "cluster-aws.yaml"
P5 = {"GPU": 8, "CPU": 192}  # p5.48xlarge: what Ray detects on the gpu node type (resources: {})
GPU_CONFIGS = sorted(p for p in (REPO / "configs").glob("coatnet*.yaml"))


def aws_config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(AWS.read_text()))
    validate_config(config)
    return config


def aws_maximum() -> dict:
    """The resources the AWS YAML's GPU nodes can grow to."""
    gpu = aws_config()["available_node_types"]["gpu"]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    return {kind: gpu["max_workers"] * amount for kind, amount in P5.items()}


def test_aws_cluster_loads_and_its_nodes_share_one_network():
    """Ray's loader and schema accept the file; after Ray's own AWS bootstrap step lifts the
    EFA interfaces' subnet and groups to the node, every node type has the same ones."""
    from ray.autoscaler._private.aws.config import _configure_node_type_from_network_interface

    config = aws_config()
    networks = {}
    for name, node_type in config["available_node_types"].items():
        node = _configure_node_type_from_network_interface(node_type)["node_config"]
        networks[name] = (sorted(set(node["SubnetIds"])), sorted(set(node["SecurityGroupIds"])))
    assert set(networks) == {"head", "gpu", "cpu"}
    assert len(set(map(str, networks.values()))) == 1, networks
    assert networks["head"] == (["subnet-0123456789abcdef0"], ["sg-0123456789abcdef0"])
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for n, t in config["available_node_types"].items()
                                        if n != config["head_node_type"])
    # The head runs no training; the CPU nodes exist for dataprep and never host a GPU worker.
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_aws_cluster_syncs_nothing_git_ignores_and_runs_in_the_image():
    config = aws_config()
    assert ".gitignore" in config["rsync_filter"]
    local = [source for source in config["file_mounts"].values() if not source.startswith("~")]
    assert local == ["."]
    for source in local:  # a mount of an ignored path would sync it whatever the filter says
        ignored = subprocess.run(["git", "check-ignore", "-q", source], cwd=REPO).returncode
        assert ignored == 1, f"{source} is ignored by git"
    # What the filter leaves behind: the virtualenv, data and runs.
    left = subprocess.run(["git", "check-ignore", ".venv", "data/x", "runs/x"], cwd=REPO, capture_output=True, text=True)
    assert left.stdout.split() == [".venv", "data/x", "runs/x"]
    assert config["docker"]["image"] and config["setup_commands"] == []  # nothing pip-installed into the AMI


def test_iam_policies_match_the_instance_profiles():
    config = aws_config()
    head = json.loads((REPO / "launch" / "iam" / "head-policy.json").read_text())
    node = json.loads((REPO / "launch" / "iam" / "node-policy.json").read_text())

    def actions(policy):
        return {a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}

    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "iam:PassRole", "s3:GetObject",
            "s3:PutObject"} <= actions(head)
    assert not any(a.startswith(("ec2:", "iam:")) for a in actions(node))  # workers launch nothing
    node_profile = config["metadata"]["node_profile"]
    passed = [s["Resource"] for s in head["Statement"] if s["Action"] == "iam:PassRole"]
    assert passed and passed[0].endswith(f":role/{node_profile}")
    types = config["available_node_types"]
    assert types["head"]["node_config"]["IamInstanceProfile"] == {"Name": config["metadata"]["head_profile"]}
    assert types["gpu"]["node_config"]["IamInstanceProfile"] == {"Name": node_profile}


def test_kuberay_runs_the_image_of_the_aws_cluster():
    job = yaml.safe_load((REPO / "launch" / "kuberay-rayjob.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert images == {aws_config()["docker"]["image"]}
    dockerfile = (REPO / "launch" / "Dockerfile").read_text()
    assert "ARG BASE=pytorch/pytorch:" in dockerfile and "cuda" in dockerfile.split("ARG BASE=")[1].split("\n")[0]
    assert "pip install --no-cache-dir -c constraints.txt ." in dockerfile
    assert images.pop() in dockerfile  # the build line tags the image both files name


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.stem)
def test_gpu_configs_state_the_cluster_maximum(path):
    from coatnet_scale.config import load_config

    config = load_config(path)
    assert config.cluster.use_gpu
    assert config.cluster.max_resources == aws_maximum(), "cluster.max_resources is not launch/cluster-aws.yaml's maximum"
    if config.cluster.num_workers > P5["GPU"]:
        assert config.monitoring.address == "node"


def test_handoff_waits_for_each_job_unless_told_otherwise():
    """One job after another is the default; returning at once makes sense only for --together."""
    import sys

    result = subprocess.run([sys.executable, str(REPO / "launch" / "handoff.py"), "s3://bucket/run", "--no-wait"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--no-wait needs --together" in result.stderr
