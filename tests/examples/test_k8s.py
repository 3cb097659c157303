"""``examples/k8s/pytorchjob_lora.yaml`` agrees with the launchers it runs.

For each PyTorchJob (GPU, NPU, CPU): master and workers run the same pod (image, launcher
command, env, volumes); the command is a launcher in this repository and gives it NNODES = the
number of pods and NODE_RANK = the operator's pod RANK; every env variable meant for the launcher
is one it reads; the per-node accelerator count equals the pod's device limit; the world size
divides by TP x PP; model, data and checkpoints sit on the shared PVC mounted in every pod.
"""
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFEST = os.path.join(ROOT, "examples", "k8s", "pytorchjob_lora.yaml")
COMMAND = re.compile(r"^NNODES=(\d+) NODE_RANK=\$RANK bash (examples/mcore/\S+\.sh)$")
PATH_VARS = ("CKPT_LOAD_DIR", "CKPT_SAVE_DIR", "DATA_PATH", "TOKENIZER_PATH")
DEVICES = {"gpu": "nvidia.com/gpu", "npu": "huawei.com/Ascend910", "cpu": None}


def _launcher_vars(text: str) -> dict[str, str]:
    """``NAME=${NAME:-default}`` lines of a launcher: the variables it takes from the env."""
    found = {}
    for name, default in re.findall(r"^(\w+)=\$\{\1:-(.*)\}$", text, re.M):
        found[name] = default.strip('"')
    return found


def _jobs(path: str) -> dict[str, dict]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return {d["metadata"]["name"].rsplit("-", 1)[1]: d for d in docs}


def test_manifest_matches_the_launchers():
    check_manifest(MANIFEST)


def check_manifest(path: str) -> None:
    jobs = _jobs(path)
    assert sorted(jobs) == ["cpu", "gpu", "npu"]
    for kind, job in jobs.items():
        assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
        specs = job["spec"]["pytorchReplicaSpecs"]
        assert sorted(specs) == ["Master", "Worker"] and specs["Master"]["replicas"] == 1
        assert specs["Master"]["template"] == specs["Worker"]["template"], kind
        pods = specs["Master"]["replicas"] + specs["Worker"]["replicas"]
        pod = specs["Master"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch", "the training operator looks for the 'pytorch' container"
        assert c["command"] == ["bash", "-c"] and len(c["args"]) == 1
        m = COMMAND.match(c["args"][0])
        assert m, c["args"][0]
        nnodes, script = int(m[1]), m[2]
        assert nnodes == pods, f"{kind}: NNODES={nnodes} but the job has {pods} pods"
        with open(os.path.join(ROOT, script)) as f:
            text = f.read()
        # the launcher hands exactly these to torchrun; the operator's MASTER_* must win
        assert ("--nproc-per-node $NPUS_PER_NODE --nnodes $NNODES --node-rank $NODE_RANK"
                in text and "--master-addr $MASTER_ADDR --master-port $MASTER_PORT" in text)
        reads = _launcher_vars(text)
        assert {"MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"} <= set(reads)
        env = {e["name"]: e["value"] for e in c["env"]}
        ours = {k: v for k, v in env.items()
                if not re.match(r"(NCCL|HCCL|GLOO|CUDA|OMP)_", k)}
        unread = set(ours) - set(reads) - {"GPUS_PER_NODE"}
        assert not unread, f"{kind}: the launcher does not read {sorted(unread)}"
        per_node = int(env.get("NPUS_PER_NODE") or env["GPUS_PER_NODE"])
        limit = c["resources"]["limits"]
        if DEVICES[kind]:
            assert int(limit[DEVICES[kind]]) == per_node, kind
        else:
            assert not set(limit) - {"cpu", "memory"} and env["CUDA_VISIBLE_DEVICES"] == ""
        tp = int(env.get("TP", reads["TP"]))
        pp = int(env.get("PP", reads["PP"]))
        assert (nnodes * per_node) % (tp * pp) == 0, f"{kind}: world size vs TP x PP"
        # the shared volume: a PVC mounted in the pod, holding every path the launcher gets
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"workspace": "mindlora-workspace"}, claims
        mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["workspace"]
        for var in PATH_VARS:
            assert env[var].startswith(mount + "/"), (kind, var, env[var])
        backend = {"gpu": "NCCL_", "npu": "HCCL_", "cpu": "GLOO_"}[kind]
        assert any(k.startswith(backend) for k in env), f"{kind}: no {backend}* settings"


def test_the_check_can_fail(tmp_path):
    """A job whose NNODES disagrees with its pods, or whose env the launcher ignores, fails."""
    with open(MANIFEST) as f:
        text = f.read()
    broken = text.replace("replicas: 1\n      restartPolicy: OnFailure\n      template: *gpu_pod",
                          "replicas: 3\n      restartPolicy: OnFailure\n      template: *gpu_pod")
    renamed = text.replace('{name: TP, value: "2"}', '{name: TP_SIZE, value: "2"}')
    assert broken != text and renamed != text
    for bad, match in ((broken, "NNODES=2 but the job has 4 pods"),
                       (renamed, r"the launcher does not read \['TP_SIZE'\]")):
        path = tmp_path / "job.yaml"
        path.write_text(bad)
        with pytest.raises(AssertionError, match=match):
            check_manifest(str(path))


def test_every_launcher_takes_the_node_variables():
    """What tests/training/test_multinode.py proves for the tiny launcher holds for all: the same
    torchrun arguments from the same overridable variables."""
    import glob

    scripts = sorted(glob.glob(os.path.join(ROOT, "examples", "mcore", "*", "tune_*_ptd.sh")))
    assert len(scripts) >= 3, scripts
    for script in scripts:
        with open(script) as f:
            text = f.read()
        reads = _launcher_vars(text)
        assert {"MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"} <= set(reads), script
        assert ("--nproc-per-node $NPUS_PER_NODE --nnodes $NNODES --node-rank $NODE_RANK"
                in text and "--master-addr $MASTER_ADDR --master-port $MASTER_PORT" in text), script
        assert "NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-" in text, script
