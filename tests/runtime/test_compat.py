"""One test per CPU adaptation in ``mindlora.runtime.compat`` (plus proof that each is needed,
that none touches ``torch`` itself, and that undoing them restores megatron-core exactly).

Each test runs inside :func:`compat.cpu_compat`, which undoes the adaptations afterwards, so
nothing leaks into the rest of the pytest session. Multi-rank checks run in spawned gloo ranks,
where ``init_distributed`` applies them as a real run does.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core import rerun_state_machine as rsm
from megatron.core.models.common.embeddings import rotary_pos_embedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.pipeline_parallel import p2p_communication, schedules
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.transformer import utils as transformer_utils

from mindlora.config import LoRAConfig, ModelConfig, ParallelConfig
from mindlora.models.builder import build_model
from mindlora.runtime import compat, init_parallel
from tests.distributed.harness import spawn

# torch's own, captured before any test applies anything: they must never change.
TORCH_OWN = {"current_device": torch.cuda.current_device, "synchronize": torch.cuda.synchronize,
             "tensor_cuda": torch.Tensor.cuda}


def _torch_untouched() -> bool:
    return (torch.cuda.current_device is TORCH_OWN["current_device"]
            and torch.cuda.synchronize is TORCH_OWN["synchronize"]
            and torch.Tensor.cuda is TORCH_OWN["tensor_cuda"])


@pytest.fixture(autouse=True)
def _applied():
    assert not compat.is_applied(), "an earlier test left the CPU adaptations on"
    with compat.cpu_compat():
        yield
    assert not compat.is_applied() and _torch_untouched()


def test_unpatched_torch_fails_on_cpu() -> None:
    """What each adaptation replaces fails without CUDA, so each patch earns its place: the
    device queries, the CUDA RNG state megatron's tracker saves in ``add``/``fork``, and a
    ``device="cuda"`` factory. Run in a fresh interpreter (torch only; the patches are global)
    with CUDA hidden, so a GPU host checks the same thing."""
    probe = textwrap.dedent("""
        import torch
        calls = {"current_device": torch.cuda.current_device,
                 "synchronize": torch.cuda.synchronize,
                 "rng_state": torch.cuda.get_rng_state,
                 "cuda_literal": lambda: torch.ones(2, device="cuda"),
                 "tensor_cuda": lambda: torch.ones(2).cuda()}
        for name, call in calls.items():
            try:
                call()
                print(name, "ok")
            except Exception:
                print(name, "fails")
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES="")).stdout
    assert out.split() == ["current_device", "fails", "synchronize", "fails",
                           "rng_state", "fails", "cuda_literal", "fails",
                           "tensor_cuda", "fails"], out


def test_current_device_is_cpu_in_megatron_modules_only() -> None:
    assert rotary_pos_embedding.torch.cuda.current_device() == torch.device("cpu")
    assert _torch_untouched(), "torch.cuda / Tensor.cuda were replaced for the whole process"
    # A real megatron-core call site: RoPE allocates inv_freq on current_device() and moves it
    # there again on the first forward.
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=False)
    assert rope.inv_freq.device.type == "cpu"
    assert rope(6).shape == (6, 1, 1, 8)


def test_synchronize_is_noop_in_megatron_modules() -> None:
    assert p2p_communication.torch.cuda.synchronize() is None
    assert p2p_communication.torch.cuda.synchronize(torch.device("cpu")) is None
    assert p2p_communication.torch.cuda.is_available is torch.cuda.is_available


def test_tensor_cuda_keeps_the_tensor_only_in_the_tied_embedding_setup() -> None:
    """megatron-core moves the tied output weight with ``weight.data.cuda()`` (PP > 1) inside
    ``setup_embeddings_and_output_layer``; only that call sees ``.cuda()`` keep the tensor.
    (A real PP=2 tied model: tests/checkpoint/test_logit_parity.py.)"""
    wrapped = LanguageModule.setup_embeddings_and_output_layer
    assert wrapped.__wrapped__ is not wrapped
    t = torch.ones(3)
    with compat._tensor_cuda_stays():
        assert t.cuda() is t and t.cuda(0).device.type == "cpu"
    assert torch.Tensor.cuda is TORCH_OWN["tensor_cuda"]


def test_undo_restores_megatron_exactly() -> None:
    """Every patched attribute is megatron's own object again after undo, and re-applying works."""
    names = ("_CUDA_RNG_STATE_TRACKER", "CudaRNGStatesTracker", "_get_cuda_rng_state",
             "_set_cuda_rng_state")
    compat.undo_cpu_compat()
    before = {m: importlib.import_module(m).torch for m in compat.CUDA_MODULES}
    rng_before = {n: getattr(mp_random, n) for n in names}
    setup_before = LanguageModule.setup_embeddings_and_output_layer
    assert all(t is torch for t in before.values())
    compat.apply_cpu_compat()
    compat.apply_cpu_compat()  # idempotent: one record per attribute
    assert len(compat._UNDO) == len(compat.CUDA_MODULES) + 1 + 5
    assert schedules.torch is not torch and mp_random.CudaRNGStatesTracker is not rng_before[
        "CudaRNGStatesTracker"]
    compat.undo_cpu_compat()
    assert {m: importlib.import_module(m).torch for m in compat.CUDA_MODULES} == before
    assert {n: getattr(mp_random, n) for n in names} == rng_before
    assert LanguageModule.setup_embeddings_and_output_layer is setup_before
    compat.apply_cpu_compat()  # the fixture's undo must find it applied


# megatron-core modules that a mindlora run imports but whose CUDA calls it never reaches:
# FSDP, the dynamic inference engine (generation uses StaticInferenceContext), Transformer
# Engine, FP8, Triton fusions, CUDA graphs, the NCCL allocator, hybrid context parallelism.
NOT_ON_OUR_PATHS = re.compile(r"megatron\.core\.(distributed\.fsdp|inference|extensions|"
                              r"fp8_utils|fusions|"
                              r"transformer\.cuda_graphs|nccl_allocator|"
                              r"pipeline_parallel\.hybrid_cp_schedule)")
CUDA_CALL = re.compile(r"torch\.cuda\.current_device\(|torch\.cuda\.synchronize\(|"
                       r"device=['\"]cuda['\"]")


def test_every_cuda_module_a_run_loads_has_a_view() -> None:
    """When megatron-core grows a new CUDA call site on mindlora's paths, this names the module."""
    for entry in ("mindlora.training.loop", "mindlora.generation.engine",
                  "mindlora.models.builder", "mindlora.checkpoint.megatron_format",
                  "megatron.core.dist_checkpointing.strategies.torch"):
        importlib.import_module(entry)
    missing = []
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not name.startswith("megatron.core") or not path or NOT_ON_OUR_PATHS.match(name):
            continue
        with open(path) as f:
            if CUDA_CALL.search(f.read()) and name not in compat.CUDA_MODULES:
                missing.append(name)
    assert not missing, missing


def test_recompute_rng_helpers_have_no_cuda_state() -> None:
    """Activation recomputation saves/restores "the CUDA RNG state"; on CPU there is none, and
    megatron-core's checkpoint function still replays the same CPU dropout mask."""
    assert mp_random._get_cuda_rng_state().numel() == 0
    assert mp_random._set_cuda_rng_state(torch.empty(0)) is None
    x = torch.ones(64, requires_grad=True)
    drop = torch.nn.Dropout(0.5)
    torch.manual_seed(0)
    out = mp_random.checkpoint(lambda t: drop(t) * 2, False, x)
    out.sum().backward()
    torch.manual_seed(0)
    ref = drop(torch.ones(64)) * 2
    assert torch.equal(out, ref) and torch.equal(x.grad, (ref != 0).float() * 4)


def test_rng_tracker_forks_reproducible_cpu_stream() -> None:
    assert isinstance(mp_random.get_cuda_rng_tracker(), compat.CpuRNGStatesTracker)
    assert mp_random.CudaRNGStatesTracker is compat.CpuRNGStatesTracker  # survives force_reset
    tracker = compat.CpuRNGStatesTracker()
    tracker.add("stream", 123)
    expected = torch.rand(8, generator=torch.Generator().manual_seed(123))

    torch.manual_seed(0)
    outer_expected = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork("stream"):
        first = torch.rand(4)
    assert torch.equal(torch.rand(4), outer_expected), "fork did not restore the outer state"
    with tracker.fork("stream"):
        second = torch.rand(4)  # the stream continues where it stopped
    assert torch.equal(torch.cat([first, second]), expected)

    saved = tracker.get_states()
    with tracker.fork("stream"):
        third = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork("stream"):
        assert torch.equal(torch.rand(4), third), "set_states did not rewind the stream"

    with pytest.raises(ValueError, match="seed 123 already exists"):
        tracker.add("other", 123)
    with pytest.raises(ValueError, match="stream already exists"):
        tracker.add("stream", 5)
    with pytest.raises(KeyError, match="missing"):
        with tracker.fork("missing"):
            pass


def test_cuda_literal_modules_create_cpu_tensors() -> None:
    for module in (schedules, transformer_utils, rsm):
        assert isinstance(module.torch, compat._CpuTorchView)
        assert module.torch.zeros(2, device="cuda").device.type == "cpu"
        assert module.torch.tensor([1], device="cuda").device.type == "cpu"
        assert module.torch.float32 is torch.float32  # everything else is torch's own
    assert transformer_utils.get_default_causal_mask(4).device.type == "cpu"
    view = schedules.torch
    compat.apply_cpu_compat()
    assert schedules.torch is view  # idempotent: the view is not wrapped twice
    if not torch.cuda.is_available():  # the real torch is untouched outside those modules
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")


def test_applies_on_a_host_that_has_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU suite on a GPU machine: a CPU run there gets the same adaptations."""
    compat.undo_cpu_compat()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    compat.apply_cpu_compat()
    assert compat.is_applied()
    assert schedules.torch.cuda.current_device() == torch.device("cpu")


def _multi_rank(rank: int, world: int) -> None:
    init_parallel(ParallelConfig(tensor_model_parallel_size=world), seed=99)
    assert compat.is_applied() and _torch_untouched()  # init_distributed applied it, scoped
    group = parallel_state.get_tensor_model_parallel_group()
    # RNG: the default stream agrees across TP ranks, the model-parallel stream differs.
    with mp_random.get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(4)
    draws = {"default": torch.rand(4), "tp": tp_draw}
    gathered = {}
    for name, t in draws.items():
        parts = [torch.empty(4) for _ in range(world)]
        dist.all_gather(parts, t, group=group)
        gathered[name] = parts
    assert torch.equal(*gathered["default"]) and not torch.equal(*gathered["tp"])

    # rerun_state_machine: device="cuda" all-reduce flags.
    machine = rsm.RerunStateMachine()
    assert machine._reduce_any(rank == 0) is True
    assert machine._reduce_any([False, rank == 1]) == (False, True)

    # pipeline schedule: its device="cuda" token counter, one forward/backward step.
    model_cfg = ModelConfig(family="llama", num_layers=1, hidden_size=32, ffn_hidden_size=64,
                            num_attention_heads=4, num_query_groups=2, vocab_size=32)
    parallel = ParallelConfig(tensor_model_parallel_size=world)
    model = build_model(model_cfg, parallel, LoRAConfig(r=2))[0]
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))

    def step(data_iterator, chunk):
        logits = chunk(next(data_iterator), torch.arange(8).expand(2, -1), attention_mask=None)

        def loss(output):
            total = output.float().pow(2).sum()
            return total, torch.tensor(16), {"loss": total.detach()}
        return logits, loss

    out = schedules.get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([ids]), model=[model], num_microbatches=1,
        seq_length=8, micro_batch_size=2, forward_only=False)
    assert len(out) == 1
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_multi_rank_rng_rerun_and_schedule() -> None:
    spawn(_multi_rank, 2)
