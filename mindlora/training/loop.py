"""The training run: set-up, megatron-core pipeline schedules, optimizer step, eval, checkpoints.

Flow: configs -> runtime -> model chunks (LoRA spec) -> base weights -> data -> schedule loop ->
adapter checkpoints. Everything parallel happens inside megatron-core's schedules (1F1B,
interleaved) and the LoRA layers; this file only orders the steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mindlora.checkpoint import describe
from mindlora.checkpoint import loading
from mindlora.config import ModelConfig, ParallelConfig
from mindlora.lora.blocks import keep_block_structure
from mindlora.models.builder import build_model, parameter_report, transformer_config
from mindlora.models.families.base import lora_block_masks
from mindlora.parallel.layout import pad_vocab, virtual_stages
from mindlora.runtime import current, init_distributed, init_parallel
from mindlora.runtime.device import to_device
from mindlora.runtime.dtypes import from_flags
from mindlora.training import checkpointing as ckpt
from mindlora.training.args import ARCH_FLAGS, RunConfig
from mindlora.training.batches import BatchPlan, SampleOrder, micro_batches, pad_to_common_length
from mindlora.training.batches import replicate
from mindlora.training.data import TrainingData
from mindlora.training.logging import MetricsLogger
from mindlora.training.moe_metrics import pop_aux_losses
from mindlora.training.optim import LossScaler, LRSchedule, clip_grads, finalize_grads
from mindlora.training.optim import lora_parameters, make_optimizer
from mindlora.training.samples import SampleAnswers
from mindlora.training.stopping import ExitConditions


@dataclass
class TrainResult:
    """What a run returns to its caller (tests compare these across layouts)."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    aux_losses: list[dict[str, float]] = field(default_factory=list)
    """MoE only: per-iteration load-balancing loss (reported apart from the lm loss)."""
    state: Optional[ckpt.TrainState] = None


def _loss_func(loss_mask: torch.Tensor, per_token: torch.Tensor):
    loss_sum = (per_token * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(),
                                                          num_tokens.detach().float()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                      segment_ids=batch.get("segment_ids"))
    return per_token, partial(_loss_func, batch["loss_mask"])


def resolve_model(run: RunConfig) -> tuple[ModelConfig, ParallelConfig]:
    """Model architecture from the base checkpoint; check optional architecture flags against it."""
    _, meta = describe.read_checkpoint_meta(run.train.load,
                                            hf_config_dir=run.data.tokenizer_name_or_path)
    model = ModelConfig.from_dict(meta["model_config"])
    arch = dict(run.arch_overrides)
    vstage = arch.pop("num_layers_per_virtual_pipeline_stage", None)
    wrong = check_arch_flags(arch, model, run.parallel.tensor_model_parallel_size)
    if wrong:
        raise ValueError(f"flags contradict the checkpoint in --load {run.train.load}: "
                         + ", ".join(wrong))
    parallel = run.parallel
    if vstage:
        pp = parallel.pipeline_model_parallel_size
        if model.num_layers % (pp * vstage):
            raise ValueError(f"--num-layers-per-virtual-pipeline-stage ({vstage}) x "
                             f"--pipeline-model-parallel-size ({pp}) must divide num_layers "
                             f"({model.num_layers})")
        parallel = ParallelConfig(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=pp, sequence_parallel=parallel.sequence_parallel,
            virtual_pipeline_model_parallel_size=virtual_stages(model.num_layers, pp, vstage),
            expert_model_parallel_size=parallel.expert_model_parallel_size)
    parallel.check_model(model)
    if model.is_moe and parallel.tensor_model_parallel_size > 1 and not parallel.sequence_parallel:
        raise ValueError(f"--tensor-model-parallel-size {parallel.tensor_model_parallel_size} "
                         f"with a mixture-of-experts model ({model.family}) needs "
                         f"--sequence-parallel: without it every TP rank's copy of a token is "
                         f"routed, and expert gradients would count each token TP times")
    if (parallel.expert_model_parallel_size > 1 and not run.data.pad_to_seq_lengths
            and current().is_cpu):
        raise ValueError("--no-pad-to-seq-lengths with --expert-model-parallel-size > 1 on the "
                         "CPU: the allgather token dispatcher needs every rank of an expert "
                         "group to hold the same number of tokens; pad to --seq-length")
    return model, parallel


def check_arch_flags(arch: dict, model: ModelConfig, tp: int) -> list[str]:
    """Architecture flags that contradict the checkpoint's ``model`` (one entry each)."""
    wrong = []
    for key, value in arch.items():
        flag = ARCH_FLAGS[key]
        if key == "padded_vocab_size":
            # Megatron's padded size is the embedding's row count; mindlora pads vocab_size to a
            # multiple of TP (what --make-vocab-size-divisible-by 1 does), so either is consistent.
            allowed = {model.vocab_size, pad_vocab(model.vocab_size, tp)}
            if value not in allowed:
                wrong.append(f"{flag} {value} (checkpoint: vocab_size {model.vocab_size}, "
                             f"padded for TP={tp} to {pad_vocab(model.vocab_size, tp)})")
        elif isinstance(value, bool):
            if getattr(model, key) != value:
                wrong.append(f"{flag} (checkpoint: {key}={getattr(model, key)})")
        elif getattr(model, key) != value:
            wrong.append(f"{flag} {value} (checkpoint: {getattr(model, key)})")
    return wrong


class Trainer:
    """One training run on this process (collective: every rank builds one)."""

    def __init__(self, run: RunConfig, log=print) -> None:
        self.run, self.log = run, log
        t = run.train
        self.start_time = time.time()
        self.device = init_distributed()
        self.torch_device = self.device.torch_device()
        if t.distributed_backend and t.distributed_backend != dist.get_backend():
            raise ValueError(f"--distributed-backend {t.distributed_backend}, but this "
                             f"{self.device.kind} run uses {dist.get_backend()} (the backend "
                             f"follows the device: cuda nccl, npu hccl, cpu gloo)")
        self.model_cfg, self.parallel = resolve_model(run)
        init_parallel(self.parallel, seed=t.seed)
        self.dtype = from_flags(t.bf16, t.fp16)
        tp = self.parallel.tensor_model_parallel_size
        self.data = TrainingData(run.data, t, self.model_cfg, tp, self.parallel.sequence_parallel)
        self.plan = BatchPlan(t.global_batch_size, t.micro_batch_size,
                              parallel_state.get_data_parallel_world_size(),
                              parallel_state.get_data_parallel_rank())
        vpp = self.parallel.virtual_pipeline_model_parallel_size
        if vpp and self.plan.num_microbatches % self.parallel.pipeline_model_parallel_size:
            raise ValueError(f"interleaved pipelines need the number of micro-batches "
                             f"({self.plan.num_microbatches}) to be a multiple of "
                             f"--pipeline-model-parallel-size "
                             f"({self.parallel.pipeline_model_parallel_size})")
        self.scaler = LossScaler(t.fp16, t.initial_loss_scale)
        config = transformer_config(self.model_cfg, self.parallel, self.dtype,
                                    t.recompute_granularity, t.recompute_method,
                                    t.recompute_num_layers)
        config.finalize_model_grads_func = finalize_grads
        config.grad_scale_func = (lambda loss: loss * self.scaler.scale) if t.fp16 else None
        hf_dir = run.data.tokenizer_name_or_path
        # an imported PEFT adapter may stack q/k/v factors: build and train with its structure
        self.lora = loading.saved_lora_structure(t.lora_load, run.lora, hf_dir) if t.lora_load \
            else run.lora
        self.chunks = build_model(self.model_cfg, self.parallel, self.lora, self.dtype, config)
        loading.load_base(t.load, self.chunks, self.model_cfg, self.parallel, hf_config_dir=hf_dir)
        keep_block_structure(self.chunks, lora_block_masks(self.model_cfg, self.lora),
                             self.parallel.tensor_model_parallel_size,
                             parallel_state.get_tensor_model_parallel_rank())
        self.params = lora_parameters(self.chunks)
        self.optimizer = make_optimizer(self.params, t.lr, t.weight_decay,
                                        (t.adam_beta1, t.adam_beta2), t.adam_eps)
        warmup = (round(t.lr_warmup_fraction * t.train_iters) if t.lr_warmup_fraction is not None
                  else t.lr_warmup_iters)
        self.schedule = LRSchedule(t.lr, t.min_lr, warmup, t.lr_decay_iters or t.train_iters,
                                   t.lr_decay_style)
        self.state = ckpt.TrainState()
        self._bad_streak = 0
        if t.lora_load:
            self.state, scaler_state = ckpt.load_adapter(
                t.lora_load, self.chunks,
                None if t.finetune or t.no_load_optim else self.optimizer,
                self.model_cfg, self.lora, self.parallel, t.finetune, hf_config_dir=hf_dir,
                load_rng=not t.no_load_rng)
            if scaler_state:
                self.scaler.load_state_dict(scaler_state)
        self.order = SampleOrder(len(self.data.train), t.seed)
        self.metrics = MetricsLogger(t, self.log)
        self.samples = (SampleAnswers(run, self.chunks, self.model_cfg, self.log,
                                      self.metrics.writer) if t.eval_prompts else None)
        self.log(f"> {parameter_report(self.chunks)} (this rank)")
        self.log(f"> LoRA target modules: {' '.join(self.lora.target_modules)}")

    def _run_schedule(self, batches: list[dict], forward_only: bool) -> tuple[float, float]:
        """Forward(+backward) over micro-batches; returns (loss sum, token count), global."""
        vpp = self.parallel.virtual_pipeline_model_parallel_size
        model = self.chunks if vpp else self.chunks[0]
        iters = replicate(batches, vpp) if vpp else iter(batches)
        seq = batches[0]["tokens"].shape[1]
        out = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iters, model=model,
            num_microbatches=len(batches), seq_length=seq,
            micro_batch_size=self.run.train.micro_batch_size, forward_only=forward_only)
        totals = torch.zeros(2, dtype=torch.float64, device=self.torch_device)
        for item in out:
            totals += item["lm loss"].double()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        return float(totals[0]), float(totals[1])

    def _batches(self, dataset, order, consumed: int) -> list[dict]:
        batches = list(micro_batches(dataset, order, self.plan, consumed, self.data.collate))
        if self.parallel.pipeline_model_parallel_size > 1:
            batches = pad_to_common_length(batches)
        return [to_device(b, self.torch_device) for b in batches]

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step; returns (loss, grad norm, skipped)."""
        it = self.state.iteration + 1
        lr = self.schedule(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for c in self.chunks:
            c.train()
        self.optimizer.zero_grad(set_to_none=True)
        batches = self._batches(self.data.train, self.order, self.state.consumed_samples)
        self.metrics.count_tokens(batches)
        loss_sum, tokens = self._run_schedule(batches, forward_only=False)
        self.last_aux = pop_aux_losses(len(batches), self.model_cfg.num_layers)
        if self.scaler.enabled:
            for _, p in self.params:
                if p.grad is not None:
                    p.grad.div_(self.scaler.scale)
        norm, finite = clip_grads(self.params, self.run.train.clip_grad)
        loss = loss_sum / max(tokens, 1.0)
        loss_bad = not math.isfinite(loss)
        skipped = loss_bad or not finite
        # fp16 overflow is routine (the scaler backs off); anything else non-finite is not.
        bad = loss_bad or (skipped and not self.scaler.enabled)
        self._bad_streak = self._bad_streak + 1 if bad else 0
        if skipped:
            self.state.skipped_iterations += 1
            self.state.nan_iterations += int(loss_bad)
        else:
            self.optimizer.step()
        self.scaler.update(not finite)
        self.state.iteration = it
        self.state.consumed_samples += self.run.train.global_batch_size
        self.metrics.step(self.state, lr, loss, norm, self.scaler.scale,
                          self.run.train.global_batch_size, self.last_aux)
        if self._bad_streak >= self.run.train.max_nan_iterations:
            raise RuntimeError(f"stopping: {self._bad_streak} consecutive iterations had NaN/Inf "
                               f"loss or gradients (--max-nan-iterations "
                               f"{self.run.train.max_nan_iterations}); lower --lr or check the data")
        return loss, norm, skipped

    def evaluate(self) -> float:
        """Mean validation loss over ``--eval-iters`` global batches."""
        valid = self.data.valid
        if valid is None or len(valid) == 0:
            return float("nan")
        for c in self.chunks:
            c.eval()
        order = SampleOrder(len(valid), self.run.train.seed, shuffle=False)
        total, count = 0.0, 0.0
        with torch.no_grad():
            for k in range(self.run.train.eval_iters):
                s, n = self._run_schedule(self._batches(valid, order,
                                                        k * self.plan.global_batch_size), True)
                total, count = total + s, count + n
        loss = total / max(count, 1.0)
        self.metrics.validation(self.state.iteration, loss)
        return loss

    def save(self) -> None:
        t = self.run.train
        path = ckpt.save_adapter(t.save, self.state, self.chunks, self.optimizer,
                                 self.scaler.state_dict(), self.model_cfg, self.lora,
                                 self.parallel, self.dtype, keep=t.save_total_limit)
        self.log(f"> saved adapter checkpoint at iteration {self.state.iteration} to {path}")

    def fit(self) -> TrainResult:
        t = self.run.train
        result = TrainResult()
        exits = ExitConditions(t.exit_interval, t.exit_duration_in_mins, t.exit_signal_handler,
                               self.start_time, self.torch_device)
        while self.state.iteration < t.train_iters:
            loss, norm, _ = self.train_step()
            result.losses.append(loss)
            result.grad_norms.append(norm)
            result.aux_losses.append(self.last_aux)
            it = self.state.iteration
            if t.eval_interval and it % t.eval_interval == 0:
                if t.eval_iters:
                    self.evaluate()
                if self.samples is not None:
                    self.samples.write(it)
            stop = exits.check(it)  # --exit-interval, -duration-in-mins, -signal-handler
            if t.save and ((t.save_interval and it % t.save_interval == 0)
                           or it == t.train_iters or stop):
                self.save()
            if stop:
                self.log(stop)
                break
        exits.close()
        result.state = self.state
        self.metrics.close()
        return result


def train(run: RunConfig, log=print) -> TrainResult:
    """Build a :class:`Trainer` for ``run`` and train it to the end."""
    start = time.time()
    trainer = Trainer(run, log)
    result = trainer.fit()
    log(f"> training finished in {time.time() - start:.1f} s")
    return result
