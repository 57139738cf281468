"""Data-parallel training on Vertex AI: torchrun with one process per GPU on every replica.

    python -m ops.engines.vertex_launch GPUS_PER_REPLICA RUN_DIR

Vertex describes the job's machines in CLUSTER_SPEC (JSON: cluster.workerpool0 = the chief,
workerpool1 = the others; task.type and task.index = this machine); the chief is the rendezvous.
"""

import json
import os
import sys

RENDEZVOUS_PORT = 29500


def torchrun_args(cluster_spec: dict, gpus_per_replica: int) -> list[str]:
    cluster, task = cluster_spec.get("cluster", {}), cluster_spec.get("task", {"type": "workerpool0", "index": 0})
    chief = cluster.get("workerpool0", ["localhost:2222"])[0].split(":")[0]
    workers = cluster.get("workerpool1", [])
    node_rank = 0 if task["type"] == "workerpool0" else 1 + int(task["index"])
    return [
        f"--nnodes={1 + len(workers)}",
        f"--node_rank={node_rank}",
        f"--nproc_per_node={gpus_per_replica}",
        f"--master_addr={chief}",
        f"--master_port={RENDEZVOUS_PORT}",
    ]


def main(argv: list[str]) -> None:
    gpus_per_replica, run_dir = int(argv[0]), argv[1]
    cluster_spec = json.loads(os.environ.get("CLUSTER_SPEC", "{}"))
    args = ["torchrun", *torchrun_args(cluster_spec, gpus_per_replica), "-m", "diffusion", run_dir]
    os.execvp(args[0], args)


if __name__ == "__main__":
    main(sys.argv[1:])
