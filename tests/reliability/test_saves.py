"""Saves survive crashes, full disks and preemption; resumes after them are exact.

One world-2 group runs the reference and every fault that leaves the group alive (a full disk on
one rank, SIGTERM on one rank, the time limit, the save limit); the kill -9 comes last because it
ends the group, and a second group resumes from what it left.
"""
import json
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.harness import spawn
from tests.reliability.helpers import MainRun, digest, flags, full_disk_on, train
from tests.training.fixtures import tiny_model, write_base_checkpoint, write_instruction_data

DYN = ("--no-pad-to-seq-lengths",)


def _faults_body(rank, world, base, data, root):
    from mindlora.checkpoint import megatron_format as fmt
    from mindlora.training import durable
    from mindlora.training.durable import CheckpointWriteError
    from mindlora.training.loop import Trainer

    full = train(base, data, 6, *DYN)
    if rank == 0:
        with open(f"{root}/full.json", "w") as f:
            json.dump(full.losses, f)
    # 1. a full disk on rank 0 (the DP rank that writes) while saving iteration 4: every rank
    # fails with one message
    restore = full_disk_on(".iter_0000004.tmp") if rank == 0 else (lambda: None)
    match = (r"saving checkpoint iteration 4 to .*/enospc failed: .*mp_rank_00/model_optim_rng\.pt"
             r": No space left on device; the previous checkpoint \(iteration 2\) is untouched"
             if rank == 0 else r"another rank failed to write its part; the previous checkpoint "
                               r"\(iteration 2\) is untouched")
    with pytest.raises(CheckpointWriteError, match=match):
        train(base, data, 6, *DYN, "--save", f"{root}/enospc", "--save-interval", "2")
    restore()
    assert fmt.read_tracker(f"{root}/enospc") == 2
    assert sorted(os.listdir(f"{root}/enospc")) == ["iter_0000002", fmt.TRACKER]
    # 2. SIGTERM reaching rank 1 only, during iteration 2: both ranks stop after it and save
    step = Trainer.train_step

    def signalled_step(self):
        out = step(self)
        if rank == 1 and self.state.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    Trainer.train_step = signalled_step
    stopped = train(base, data, 6, *DYN, "--save", f"{root}/sig", "--exit-signal-handler")
    Trainer.train_step = step
    assert stopped.state.iteration == 2 and fmt.read_tracker(f"{root}/sig") == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed after the run
    resumed = train(base, data, 6, *DYN, "--lora-load", f"{root}/sig")
    assert resumed.losses == full.losses[2:], (resumed.losses, full.losses)
    # 3. the time limit: both ranks agree to stop after the first iteration past it, and save
    timed = train(base, data, 6, *DYN, "--save", f"{root}/timed",
                  "--exit-duration-in-mins", "1e-6")
    assert timed.state.iteration == 1 and fmt.read_tracker(f"{root}/timed") == 1
    # 4. --save-total-limit keeps the newest N
    train(base, data, 5, *DYN, "--save", f"{root}/limit", "--save-interval", "1",
          "--save-total-limit", "2")
    assert durable.iterations(f"{root}/limit") == [4, 5]
    # 5. kill -9 of rank 1 inside a TP2 save of iteration 4 (after writing its own file, while
    # rank 0 waits for it): TP2 so that both ranks write a part
    tp2 = ("--tensor-model-parallel-size", "2")
    full_tp2 = train(base, data, 6, *DYN, *tp2)
    if rank == 0:
        with open(f"{root}/full_tp2.json", "w") as f:
            json.dump(full_tp2.losses, f)

    def die(stage, path):
        if rank == 1 and stage == "rank_file_written" and ".iter_0000004.tmp" in path:
            with open(f"{root}/before.json", "w") as f:  # the previous checkpoint, as it was
                json.dump(digest(f"{root}/kill/iter_0000002"), f)
            os.kill(os.getpid(), signal.SIGKILL)

    durable.fault_point = die
    train(base, data, 6, *DYN, *tp2, "--save", f"{root}/kill", "--save-interval", "2")


def _after_kill_body(rank, world, base, data, root):
    from mindlora.checkpoint import megatron_format as fmt

    with open(f"{root}/full_tp2.json") as f:
        full = json.load(f)
    assert fmt.read_tracker(f"{root}/kill") == 2
    resumed = train(base, data, 6, *DYN, "--tensor-model-parallel-size", "2",
                    "--lora-load", f"{root}/kill", "--save", f"{root}/kill", "--save-interval", "2")
    assert resumed.losses == full[2:], (resumed.losses, full)
    assert fmt.read_tracker(f"{root}/kill") == 6
    assert not [d for d in os.listdir(f"{root}/kill") if d.startswith(".")]


def test_full_disk_sigterm_time_limit_save_limit_and_kill9(tmp_path):
    root = str(tmp_path)
    base = write_base_checkpoint(f"{root}/base", tiny_model())
    data = write_instruction_data(f"{root}/data/sft", n=40)
    with pytest.raises(mp.ProcessExitedException, match="process 1 terminated with signal SIGKILL"):
        spawn(_faults_body, 2, base, data, root)
    # the killed save left its temporary directory, never a published or tracked one
    from mindlora.checkpoint import megatron_format as fmt

    assert fmt.read_tracker(f"{root}/kill") == 2
    assert sorted(os.listdir(f"{root}/kill")) == [".iter_0000004.tmp", "iter_0000002", fmt.TRACKER]
    with open(f"{root}/before.json") as f:
        assert digest(f"{root}/kill/iter_0000002") == json.load(f)
    spawn(_after_kill_body, 2, base, data, root)


def test_sigterm_entry_point_saves_and_exits_zero(tmp_path):
    """A preempted job: SIGTERM to the process; it finishes the step, saves, exits 0."""
    from mindlora.checkpoint import megatron_format as fmt

    root = str(tmp_path)
    base = write_base_checkpoint(f"{root}/base", tiny_model())
    data = write_instruction_data(f"{root}/data/sft", n=40)
    # the LR schedule must not depend on --train-iters, which differs from the reference's
    run = MainRun(flags(base, data, 100000, "--save", f"{root}/ckpt", "--exit-signal-handler",
                        "--lr-decay-iters", "50"), root)
    try:
        run.wait_for(r"iteration\s+2/")
        run.signal(signal.SIGTERM)
        rc, out, err = run.wait()
    finally:
        run.kill()
    assert rc == 0, err
    assert "exiting program after receiving SIGTERM." in out
    stopped = fmt.read_tracker(f"{root}/ckpt")
    assert stopped >= 2 and f"saved adapter checkpoint at iteration {stopped}" in out
    spawn(_sigterm_resume_body, 1, base, data, root, stopped)


def _sigterm_resume_body(rank, world, base, data, root, stopped):
    full = train(base, data, stopped + 2, "--lr-decay-iters", "50")
    resumed = train(base, data, stopped + 2, "--lr-decay-iters", "50", "--lora-load",
                    f"{root}/ckpt")
    assert resumed.losses == full.losses[stopped:], (resumed.losses, full.losses)


def _tree(root, iters, tracked):
    from mindlora.checkpoint import megatron_format as fmt

    for it in iters:
        os.makedirs(os.path.join(root, fmt.iteration_dir_name(it)))
        with open(os.path.join(root, fmt.iteration_dir_name(it), "x"), "w") as f:
            f.write(f"old {it}")
    fmt.write_tracker(root, tracked)


@pytest.mark.parametrize("exchange", [True, False])
def test_rewriting_the_tracked_iteration_never_exposes_a_missing_directory(tmp_path, monkeypatch,
                                                                          exchange):
    """Rank 0's publication step alone: a crash at the worst moment (old directory renamed
    aside, new one not yet in) leaves the tracker on a complete directory."""
    from mindlora.checkpoint import megatron_format as fmt
    from mindlora.training import durable

    root = str(tmp_path)
    _tree(root, [1, 2], tracked=2)
    os.makedirs(f"{root}/.iter_0000002.tmp")
    with open(f"{root}/.iter_0000002.tmp/x", "w") as f:
        f.write("new 2")
    if not exchange:
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)

    class Crash(Exception):
        pass

    def crash(stage, path):
        assert fmt.read_tracker(root) == 1  # moved off iteration 2 before it was renamed aside
        raise Crash()

    monkeypatch.setattr(durable, "fault_point", crash)
    final = f"{root}/iter_0000002"
    if exchange:  # atomic swap: no intermediate state to crash in
        durable.publish(root, f"{root}/.iter_0000002.tmp", final, 2)
        assert open(f"{final}/x").read() == "new 2" and fmt.read_tracker(root) == 2
        return
    with pytest.raises(Crash):
        durable.publish(root, f"{root}/.iter_0000002.tmp", final, 2)
    tracked = fmt.read_tracker(root)
    assert tracked == 1 and open(f"{root}/iter_0000001/x").read() == "old 1"
    monkeypatch.setattr(durable, "fault_point", lambda stage, path: None)
    shutil_tree = sorted(os.listdir(root))
    assert ".iter_0000002.old" in shutil_tree and ".iter_0000002.tmp" in shutil_tree


def test_rewriting_the_only_checkpoint_removes_the_tracker_first(tmp_path, monkeypatch):
    from mindlora.checkpoint import megatron_format as fmt
    from mindlora.training import durable

    root = str(tmp_path)
    _tree(root, [3], tracked=3)
    os.makedirs(f"{root}/.iter_0000003.tmp")
    monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    seen = []
    monkeypatch.setattr(durable, "fault_point",
                        lambda stage, path: seen.append(os.path.exists(f"{root}/{fmt.TRACKER}")))
    durable.publish(root, f"{root}/.iter_0000003.tmp", f"{root}/iter_0000003", 3)
    assert seen == [False]  # no tracker while iteration 3 was aside
    assert fmt.read_tracker(root) == 3 and sorted(os.listdir(root)) == ["iter_0000003",
                                                                        fmt.TRACKER]


def test_save_total_limit_never_removes_the_tracked_checkpoint(tmp_path):
    from mindlora.training import durable

    root = str(tmp_path)
    _tree(root, [1, 2, 3, 4], tracked=2)
    assert durable.prune(root, 1) == [1, 3]
    assert durable.iterations(root) == [2, 4]


def test_publishing_removes_leftovers_of_killed_saves(tmp_path):
    from mindlora.checkpoint import megatron_format as fmt
    from mindlora.training import durable

    root = str(tmp_path)
    _tree(root, [1], tracked=1)
    for stale in (".iter_0000007.tmp", ".iter_0000003.old", ".iter_0000002.tmp"):
        os.makedirs(f"{root}/{stale}")
    durable.publish(root, f"{root}/.iter_0000002.tmp", f"{root}/iter_0000002", 2)
    assert sorted(os.listdir(root)) == ["iter_0000001", "iter_0000002", fmt.TRACKER]
    assert fmt.read_tracker(root) == 2
