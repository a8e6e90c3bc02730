"""The one training loop behind the recipes (SFT / KD x single device / distributed).

A single device is a world of one: the same code runs under ``tune run recipes/<x>.py`` and under
``tune run --nproc_per_node N recipes/<x>_distributed.py`` (torchrun, FSDP2 ``fully_shard``, gloo on
CPU, nccl on CUDA). The entry points only say which task and whether to shard.

Normalization is exact: before the first backward of an optimizer step, the valid tokens of all its
micro-batches on all data-parallel ranks are counted (one all-reduce, on device); each micro-batch's
loss is given ``scale = dp / global_tokens`` and backpropagates ``loss_sum * scale`` (FSDP2 averages
gradients over the dp ranks, hence ``* dp``). Gradients are never rescaled afterwards, so batch 4,
batch 2 x 2 accumulation steps and 2 ranks x batch 2 give the same loss and gradient norm.

Tensor parallelism (``tensor_parallel_dim: T``, distributed recipes, fused losses): a 2-D mesh
``(dp, tp) = (world / T, T)``; the output projection is sharded over the vocabulary on ``tp``
(``ColwiseParallel``: weight ``Shard(0)``), which the fused losses compute vocabulary-parallel;
everything is FSDP2-sharded over ``dp``. The ``T`` ranks of one dp group read the same batch and hold
the same replicated layers; tokens are counted over dp only.

A step whose loss or gradient norm is not finite is not applied (the optimizer step is skipped on
every rank alike); ``max_nonfinite_steps`` such steps in a row stop the run with an error naming the
step and what was not finite, before anything non-finite can be saved.

How the model feeds the loss is decided by what the loss is
(:func:`tune_losses.configure_model_for_loss`): fused linear losses get hidden states, chunked-output
losses get logit chunks, anything else full logits.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import Dataset
from torchtune import config, training, utils
from torchtune.data import padded_collate_sft
from torchtune.modules.peft import get_adapter_params, get_merged_lora_ckpt

from tune_losses.accounting import LossSum, all_reduce_token_count, count_step_tokens
from tune_losses.heads import configure_model_for_loss
from tune_losses.training import checkpointing, data
from tune_losses.training.distributed import Parallelism, barrier, collective, init_process_group
from tune_losses.training.gradients import clip_grads_, grad_norm, nonfinite_grads, nonfinite_params
from tune_losses.training.memory import loss_peak_memory
from tune_losses.training.model import build_model
from tune_losses.training.progress import Progress
from tune_losses.training.protocol import ModelOutputLoss, TeacherOutputLoss, TrainingLoss
from tune_losses.training.settings import LoopSettings, known_keys, warn_unknown_keys

log = utils.get_logger("INFO")


class NonFiniteTrainingError(RuntimeError):
    """``max_nonfinite_steps`` optimizer steps in a row had a non-finite loss or gradient."""


class LossRecipe:
    """Recipe for SFT (``task="sft"``) or knowledge distillation (``task="kd"``), torchtune-shaped:
    ``setup(cfg)``, ``train()``, ``save_checkpoint(epoch)``, ``cleanup()``.

    Config keys (see configs/tiny/*.yaml for every one, commented): the components model, tokenizer,
    checkpointer, dataset, loss, optimizer, lr_scheduler, metric_logger, device, dtype, and the
    settings of :class:`tune_losses.training.settings.LoopSettings`; KD adds teacher_model,
    teacher_checkpointer, kd_loss and kd_ratio (unless the loss is a fused distillation loss, which
    carries its own ratio). A subclass that reads more top-level keys lists them in ``config_keys``; one
    that adds a task (overriding ``setup`` / ``_micro_batch_loss``) lists it in ``tasks``.
    """

    tasks: tuple = ("sft", "kd")
    config_keys: tuple = ()

    def __init__(self, cfg: DictConfig, task: str, distributed: bool):
        if task not in self.tasks:
            raise ValueError(f"task: expected one of {list(self.tasks)}, got {task!r}")
        self.task = task
        self.distributed = distributed
        self.settings = LoopSettings.from_config(cfg)
        self.device = utils.get_device(cfg.device)
        if distributed:
            init_process_group(self.device, self.settings.process_group_timeout_s)
        self.par = Parallelism.build(self.device, distributed, self.settings.tensor_parallel_dim)
        self.is_rank_zero = self.par.is_rank_zero
        if self.is_rank_zero:
            warn_unknown_keys(cfg, known_keys(self.config_keys))
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.global_step = 0
        self.epochs_run = 0
        self.nonfinite_in_a_row = 0
        self.saved_at_step: Optional[int] = None
        self.progress: Optional[Progress] = None
        # The resumed checkpoint's data state (data.loader_state); None for one written before it existed.
        self.resume_data: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        s = self.settings
        if self.is_rank_zero:
            checkpointing.remove_partial_files(s.output_dir, cfg.checkpointer.get("output_dir", s.output_dir))
        # Same seed on every rank for model init (LoRA weights are not in the checkpoint), so a sharded
        # run starts from exactly the single-device weights; data order comes from the sampler's seed.
        torch.manual_seed(s.seed)
        self.metric_logger = config.instantiate(cfg.metric_logger) if self.is_rank_zero else None
        if self.metric_logger is not None:
            self.metric_logger.log_config(cfg)
        self.tokenizer = config.instantiate(cfg.tokenizer)

        ckpt = config.instantiate(cfg.checkpointer).load_checkpoint()
        self.checkpointer = config.instantiate(cfg.checkpointer)
        self.model = self._build(
            cfg.model,
            ckpt[training.MODEL_KEY],
            trainable=True,
            activation_checkpointing=s.enable_activation_checkpointing,
        )
        loss_module = config.instantiate(cfg.loss)
        self._check_tensor_parallel_loss(loss_module)
        self.loss = TrainingLoss(loss_module)
        self.ignore_index = self.loss.ignore_index
        self.output_mode = configure_model_for_loss(self.model, loss_module)

        self.teacher = None
        self.kd_loss: Optional[TrainingLoss] = None
        if self.task == "kd":
            t_ckpt = config.instantiate(cfg.teacher_checkpointer).load_checkpoint()
            self.teacher = self._build(cfg.teacher_model, t_ckpt[training.MODEL_KEY], trainable=False)
            self.teacher.eval()
            if isinstance(loss_module, TeacherOutputLoss):
                loss_module.set_teacher_output(self.teacher)  # fused: CE + KD in one pass
                self.kd_ratio = float(loss_module.kd_ratio)
            else:
                self.kd_loss = TrainingLoss(config.instantiate(cfg.kd_loss))
                self.kd_ratio = float(cfg.kd_ratio)
                if not 0.0 <= self.kd_ratio <= 1.0:
                    raise ValueError(f"kd_ratio: expected a number in [0, 1], got {cfg.kd_ratio!r}")
                # The teacher emits what the student emits (same chunk count and split): the KD loss pairs them.
                configure_model_for_loss(self.teacher, loss_module)
        p = self.par
        log.info(
            f"rank {p.rank}: {self.task} with {self.loss.name}, model output mode '{self.output_mode}', "
            f"world size {p.world_size}"
            + (f" (data parallel {p.dp_size} x tensor parallel {p.tp})" if p.tp > 1 else "")
        )

        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, self.params)
        ds = self._build_data(cfg)
        self.steps_per_epoch = data.steps_per_epoch(
            len(ds),
            self.dataloader,
            batch_size=s.batch_size,
            grad_accum=s.gradient_accumulation_steps,
            dp_size=p.dp_size,
            max_steps_per_epoch=s.max_steps_per_epoch,
        )
        self.lr_scheduler = None
        if cfg.get("lr_scheduler", None) is not None:
            self.lr_scheduler = config.instantiate(
                cfg.lr_scheduler, self.optimizer, num_training_steps=s.epochs * self.steps_per_epoch
            )
        if s.resume_from_checkpoint:
            self._load_resume_state()

    def _build_data(self, cfg: DictConfig):
        """The training set (returned) and its loader and sampler (``self.dataloader``, ``self.sampler``)."""
        data.validate_text_files(cfg.dataset, warn=self.is_rank_zero)
        return self._load_batches_of(config.instantiate(cfg.dataset, self.tokenizer))

    def _load_batches_of(self, ds: Dataset, collate: Callable = padded_collate_sft) -> Dataset:
        """Set ``self.dataloader`` and ``self.sampler`` over ``ds``, batched by ``collate(samples,
        padding_idx, ignore_idx)`` with this run's batch size, seed and data-parallel rank; returns ``ds``."""
        s, p = self.settings, self.par
        self.dataloader, self.sampler = data.build_dataloader(
            ds,
            batch_size=s.batch_size,
            shuffle=s.shuffle,
            seed=s.seed,
            dp_size=p.dp_size,
            dp_rank=p.dp_rank,
            pad_id=self.tokenizer.pad_id,
            ignore_index=self.ignore_index,
            collate=collate,
        )
        return ds

    def _build(self, cfg_model: DictConfig, state_dict, trainable: bool, activation_checkpointing: bool = False):
        return build_model(
            cfg_model,
            state_dict,
            device=self.device,
            dtype=self.dtype,
            trainable=trainable,
            distributed=self.distributed,
            par=self.par,
            activation_checkpointing=activation_checkpointing,
        )

    def _check_tensor_parallel_loss(self, loss_module) -> None:
        """Tensor parallelism shards the logits' vocabulary: only fused losses (hidden states in) see it."""
        if self.par.tp == 1:
            return
        fused = isinstance(loss_module, ModelOutputLoss)
        if not fused or (self.task == "kd" and not isinstance(loss_module, TeacherOutputLoss)):
            raise ValueError(
                f"tensor_parallel_dim: {self.par.tp} needs a fused loss (tune_losses.LinearCrossEntropyLoss, or "
                f"tune_losses.LinearDistillationLoss for KD), which computes the vocabulary-sharded output "
                f"projection without gathering logits; got loss {type(loss_module).__name__}"
            )

    # ------------------------------------------------------------------------------------------ train
    def _micro_batch_loss(self, batch: Dict[str, torch.Tensor], labels: torch.Tensor, scale: torch.Tensor) -> LossSum:
        """Forward one micro-batch; its loss sum (and parts) times ``scale``, and its valid-token count."""
        tokens = batch["tokens"]
        kwargs = {k: batch[k] for k in ("mask", "input_pos") if k in batch}
        out = self.model(tokens, **kwargs)
        if self.teacher is None:
            return self.loss(out, labels=labels, scale=scale)
        with torch.no_grad():
            t_out = self.teacher(tokens, **kwargs)
        if self.kd_loss is None:
            return self.loss(out, t_out, labels=labels, scale=scale)
        ce = self.loss(out, labels=labels, scale=scale)
        kd = self.kd_loss(out, t_out, labels=labels, scale=scale)
        total = (1 - self.kd_ratio) * ce.total + self.kd_ratio * kd.total
        return LossSum(total, ce.num_tokens, {"class_loss": ce.total.detach(), "kd_loss": kd.total.detach()})

    def train(self) -> None:
        s = self.settings
        self.model.train()
        self.progress = Progress(
            s.epochs * self.steps_per_epoch,
            initial=self.global_step,
            desc=self.task,
            enabled=self.is_rank_zero,
            every=s.progress_every_n_steps,
        )
        try:
            for epoch in range(self.global_step // self.steps_per_epoch, s.epochs):
                done = self.global_step - epoch * self.steps_per_epoch
                resume, self.resume_data = self.resume_data, None  # the resumed epoch only
                for micro in data.step_batches(
                    self.dataloader,
                    self.sampler,
                    epoch,
                    self.steps_per_epoch,
                    done,
                    s.gradient_accumulation_steps,
                    resume=resume,
                ):
                    metrics = self._train_step(micro)
                    self.global_step += 1
                    self.progress.update(metrics["loss"])
                    if self.metric_logger is not None and self.global_step % s.log_every_n_steps == 0:
                        self.metric_logger.log_dict(metrics, step=self.global_step)
                    end_of_epoch = self.global_step == (epoch + 1) * self.steps_per_epoch
                    if end_of_epoch:
                        self.epochs_run = epoch + 1
                    if end_of_epoch or (s.save_every_n_steps and self.global_step % s.save_every_n_steps == 0):
                        self.save_checkpoint(epoch)
                    if s.stop_after_steps is not None and self.global_step >= s.stop_after_steps:
                        self.progress.write(
                            f"stop_after_steps={s.stop_after_steps} reached: stopping (resume to continue)"
                        )
                        return
                if self.epochs_run < epoch + 1:  # the loader ran out before the epoch's last step
                    self.epochs_run = epoch + 1
                    self.save_checkpoint(epoch)
        finally:
            self.progress.close()

    def _train_step(self, micro: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        s, p = self.settings, self.par
        start = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step runs at
        data.to_device(micro, self.device)
        labels = [data.shift_labels(b.pop("labels"), self.ignore_index) for b in micro]
        with collective("all-reduce of the step's valid-token count", s.process_group_timeout_s):
            scale, global_tokens = self._step_normalizer(labels)
        if self.global_step == 0 and s.log_loss_memory:
            self._log_loss_memory(micro[0], labels[0])
        sums: Dict[str, torch.Tensor] = {}
        with collective("forward / backward (FSDP2 all-gather and reduce-scatter)", s.process_group_timeout_s):
            for batch, lab in zip(micro, labels):
                result = self._micro_batch_loss(batch, lab, scale)
                result.total.backward()
                for k, v in {"loss": result.total, **(result.parts or {})}.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
        with collective("all-reduce of the gradient norm", s.process_group_timeout_s):
            norm = grad_norm(self.params)
        # One all-reduce of the step's scaled sums over dp, then the host reads them (outside the loss math).
        keys = sorted(sums)
        with collective("all-reduce of the step's metrics", s.process_group_timeout_s):
            stacked = all_reduce_token_count(torch.stack([sums[k] for k in keys]), group=p.dp_group) / p.dp_size
        # One host read per step: the logged metrics and the gradient norm together (fp32 sums widened
        # exactly to fp64); the non-finite check below reads these values, not the device again.
        metrics = dict(
            zip(keys + ["grad_norm"], torch.cat([stacked.double(), norm.reshape(1).to(stacked.device)]).tolist())
        )
        problem = self._nonfinite(metrics)
        if problem is None:
            if s.clip_grad_norm is not None:
                clip_grads_(self.params, norm, s.clip_grad_norm)
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        if problem is not None:
            self._on_nonfinite(problem)
        metrics["lr"] = lr
        metrics["step_seconds"] = time.perf_counter() - start
        metrics["tokens_per_second_per_rank"] = float(global_tokens) / p.dp_size / metrics["step_seconds"]
        return metrics

    def _step_normalizer(self, labels: List[torch.Tensor]):
        """``(scale, global_tokens)`` of one optimizer step, before its first backward: what each
        micro-batch's loss sums are multiplied by (``dp / global_tokens``) and the step's valid tokens
        over all micro-batches and data-parallel ranks (one all-reduce)."""
        global_tokens = count_step_tokens(labels, self.ignore_index, group=self.par.dp_group)
        return self.par.dp_size / global_tokens.clamp(min=1).float(), global_tokens

    def _nonfinite(self, metrics: Dict[str, float]) -> Optional[str]:
        """What was not finite this step (the same answer on every rank), or None."""
        bad_values = [k for k in ("loss", "class_loss", "kd_loss") if k in metrics and not math.isfinite(metrics[k])]
        if bad_values:
            return ", ".join(f"{k} {metrics[k]}" for k in bad_values)
        if math.isfinite(metrics["grad_norm"]):
            return None
        names = nonfinite_grads(self.model)
        if dist.is_initialized():
            gathered: List = [None] * dist.get_world_size()
            with collective("all-gather of non-finite gradient names", self.settings.process_group_timeout_s):
                dist.all_gather_object(gathered, names)
            names = sorted({n for rank_names in gathered for n in rank_names})
        shown = ", ".join(f"{n} ({kind})" for n, kind in names[:5]) + (
            f" and {len(names) - 5} more" if len(names) > 5 else ""
        )
        return f"gradient of {shown}" if names else f"grad_norm {metrics['grad_norm']}"

    def _on_nonfinite(self, problem: str) -> None:
        step, limit = self.global_step + 1, self.settings.max_nonfinite_steps
        self.nonfinite_in_a_row += 1
        msg = (
            f"step {step}: non-finite {problem}; optimizer step skipped "
            f"({self.nonfinite_in_a_row} in a row, max_nonfinite_steps={limit})"
        )
        if self.nonfinite_in_a_row < limit:
            self._note(msg, warning=True)
            return
        raise NonFiniteTrainingError(
            f"stopping at step {step}: {self.nonfinite_in_a_row} optimizer steps in a row were non-finite "
            f"(max_nonfinite_steps={limit}); last: {problem}. No non-finite update was applied or saved; "
            f"lower optimizer.lr, check the data or the teacher, or resume from the last checkpoint."
        )

    def _note(self, msg: str, warning: bool = False) -> None:
        if not self.is_rank_zero:
            return
        if self.progress is not None and self.progress.bar is not None:
            self.progress.write(msg)
        elif warning:
            log.warning(msg)
        else:
            log.info(msg)

    def _log_loss_memory(self, batch: Dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Peak memory of the loss alone (output projection + loss, forward and backward), once per run."""
        if self.distributed:
            return  # outside forward, FSDP2 weights are sharded; measured by the single-device recipes
        tokens = batch["tokens"]
        peak = loss_peak_memory(
            self.model, self.loss, tokens, labels, self.device, teacher=self.teacher, kd_loss=self.kd_loss
        )
        self._note(
            f"loss peak memory (projection + loss, fwd + bwd, batch {tuple(tokens.shape)}): {peak / 2**20:.1f} MiB"
        )
        if self.metric_logger is not None:
            self.metric_logger.log_dict({"loss_peak_memory_mib": peak / 2**20}, step=0)

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, epoch: int) -> None:
        """Export weights in torchtune format (``output_dir/epoch_<epoch>``) and the full resume state
        (``output_dir/resume/state.pt``: model, optimizer, scheduler, step counters, the data loader's
        place in the epoch), each atomically; once per step, and never a non-finite model."""
        if self.saved_at_step == self.global_step:
            return
        s = self.settings
        bad = nonfinite_params(self.model)
        flag = torch.tensor(float(len(bad)), device=self.device)
        if dist.is_initialized():
            with collective("all-reduce before saving", s.process_group_timeout_s):
                dist.all_reduce(flag)
        if flag.item() > 0:
            raise NonFiniteTrainingError(
                f"step {self.global_step}: refusing to save a model with non-finite weights "
                f"({', '.join(bad[:5]) or 'on another rank'}); the previous checkpoint is kept"
            )
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        with collective("gather of the full state dict for saving", s.process_group_timeout_s):
            model_sd = get_model_state_dict(self.model, options=full)
            optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        if self.is_rank_zero:
            export = model_sd
            if get_adapter_params(self.model):
                export = get_merged_lora_ckpt(
                    dict(model_sd), rank=int(self.cfg.model.lora_rank), alpha=float(self.cfg.model.lora_alpha)
                )
            files = checkpointing.export_atomically(self.checkpointer, {training.MODEL_KEY: export}, epoch)
            resume = checkpointing.save_resume_state(
                s.output_dir,
                {
                    "model": model_sd,
                    "optimizer": optim_sd,
                    "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
                    "global_step": self.global_step,
                    "epochs_run": self.epochs_run,
                    "seed": s.seed,
                    "steps_per_epoch": self.steps_per_epoch,
                    "rng": torch.get_rng_state(),
                    "data": data.loader_state(
                        self.dataloader,
                        epoch,
                        batches=(self.global_step - epoch * self.steps_per_epoch) * s.gradient_accumulation_steps,
                        epoch_done=self.epochs_run > epoch,
                    ),
                },
            )
            size = sum(f.stat().st_size for f in files) / 2**20
            self._note(
                f"step {self.global_step}: saved {files[0].parent if files else 'nothing'} "
                f"({len(files)} file(s), {size:.1f} MiB) and {resume}"
            )
        barrier("barrier after saving", s.process_group_timeout_s)
        self.saved_at_step = self.global_step

    def _load_resume_state(self) -> None:
        state = checkpointing.load_resume_state(self.settings.output_dir)
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint has {state['steps_per_epoch']} steps per epoch, "
                f"this config {self.steps_per_epoch}; resume with the same data and batch settings"
            )
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=full)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=full)
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step, self.epochs_run = state["global_step"], state["epochs_run"]
        self.saved_at_step = self.global_step
        self.resume_data = state.get("data")
        torch.set_rng_state(state["rng"])
        log.info(f"resumed from {self.settings.output_dir}/{checkpointing.RESUME_FILE} at step {self.global_step}")

    def cleanup(self) -> None:
        metric_logger = getattr(self, "metric_logger", None)
        if metric_logger is not None:
            metric_logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def run(recipe_cls, cfg: DictConfig) -> None:
    """Entry point shared by the recipes (recipes/cache_teacher.py's too): ``recipe_cls(cfg)``,
    ``setup(cfg)``, ``train()``, and ``cleanup()`` even on error."""
    config.log_config(recipe_name=recipe_cls.__name__, cfg=cfg)
    recipe = recipe_cls(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()
