"""The GPU tests' worker, run here on the CPU: so the GPU session only meets GPU problems.

``tests/gpu/test_cuda_training.py`` runs the worker on CUDA and the CPU reference with CUDA
hidden; this runs the same two entry points (training, fused layer check) on the CPU.
"""
from tests.gpu.test_cuda_training import _flags, _run, _run_layers
from tests.training.fixtures import tiny_model, write_base_checkpoint, write_instruction_data


def test_worker_trains_and_checks_layers_on_cpu(tmp_path):
    root = str(tmp_path)
    base = write_base_checkpoint(f"{root}/base", tiny_model())
    data = write_instruction_data(f"{root}/data/sft", n=32)
    report = _run(root, "cpu", _flags(base, data, 3), cpu=True, deterministic=True)
    assert (report["device"], report["backend"]) == ("cpu", "gloo")
    assert len(report["losses"]) == 3 and report["param_devices"] == ["cpu"]
    assert report["batch_devices"] == ["cpu"] and report["peak_bytes"] > 0
    layers = _run_layers(cpu=True)
    assert layers == {"device": "cpu", "backend": "gloo",
                      "checked": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
