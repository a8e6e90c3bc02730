"""The one training loop behind the four recipes (SFT / KD x single device / distributed).

A single device is a world of one: the same code runs under ``tune run recipes/<x>.py`` and under
``tune run --nproc_per_node N recipes/<x>_distributed.py`` (torchrun, FSDP2 ``fully_shard``, gloo on
CPU, nccl on CUDA). The entry points only say which task and whether to shard.

Normalization is exact (../shared/design.md, "Normalization"): before the first backward of an
optimizer step, the valid tokens of all its micro-batches on all data-parallel ranks are counted (one
all-reduce, on device); each micro-batch then backpropagates ``loss_sum * dp / global_tokens`` (FSDP2
averages gradients over the dp ranks, hence ``* dp``). Gradients are never rescaled afterwards, so
batch 4, batch 2 x 2 accumulation steps and 2 ranks x batch 2 give the same loss and gradient norm.

Tensor parallelism (``tensor_parallel_dim: T``, distributed recipes, fused losses): a 2-D mesh
``(dp, tp) = (world / T, T)``; the output projection is sharded over the vocabulary on ``tp``
(``ColwiseParallel``: weight ``Shard(0)``), which the fused losses compute vocabulary-parallel
(:mod:`tune_losses.fused.vocab_parallel`); everything is FSDP2-sharded over ``dp``. The ``T`` ranks of
one dp group read the same batch and hold the same replicated layers, so their losses, hidden-state
gradients and layer gradients agree; tokens are counted over dp only.

How the model feeds the loss is decided by what the loss is
(:func:`tune_losses.configure_model_for_loss`): fused linear losses get hidden states, chunked-output
losses get logit chunks, anything else full logits.
"""

from __future__ import annotations

import os
import time
from functools import partial
from itertools import islice
from typing import Any, Dict, Iterator, List

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import config, training, utils
from torchtune.data import padded_collate_sft
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.peft import get_adapter_params, get_merged_lora_ckpt, set_trainable_params
from tqdm import tqdm

from loss_memory import peak_memory_of
from tune_losses import LossSum, configure_model_for_loss, output_projection, set_output_mode, split_tokens
from tune_losses.accounting import all_reduce_token_count, count_step_tokens

log = utils.get_logger("INFO")

RESUME_FILE = "resume/state.pt"


def _shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels for next-token prediction: ``labels[:, 1:]`` with an ignored last column ([B, S] -> [B, S])."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def loss_sum_and_count(loss_fn: nn.Module, *args) -> LossSum:
    """``(sum, count)`` from any loss: ours report it; a foreign mean loss (torchtune's, torch's) is
    multiplied back by its count (0 when there is no valid token, instead of torchtune's NaN)."""
    if callable(getattr(loss_fn, "sum_and_count", None)):
        return loss_fn.sum_and_count(*args)
    labels = args[-1]
    ignore = getattr(loss_fn, "ignore_index", -100)
    count = (labels != ignore).sum()
    if isinstance(loss_fn, nn.CrossEntropyLoss):  # torch's wants [N, V] / [N]
        args = tuple(a.reshape(-1, a.shape[-1]) for a in args[:-1]) + (labels.reshape(-1),)
    mean = loss_fn(*args)
    return LossSum(torch.where(count > 0, mean * count, torch.zeros_like(mean)), count)


def _replicas(grad: torch.Tensor, world: int) -> int:
    """How many ranks hold this very gradient (shard): its squares are summed over the world once.

    A DTensor is split over the mesh dimensions where it is sharded (FSDP2's ``Shard`` /
    ``_StridedShard``, tensor parallel's ``Shard(0)``) and repeated everywhere else: over its mesh's
    ``Replicate`` dimensions and over the ranks outside its mesh (a layer FSDP-sharded over ``dp`` is
    repeated on every ``tp`` rank). A plain tensor is repeated on every rank.
    """
    if not hasattr(grad, "placements"):
        return world
    mesh, shards = grad.device_mesh, 1
    for i, p in enumerate(grad.placements):
        if p.is_shard() or type(p).__name__ == "_StridedShard":  # not a Shard subclass in torch 2.13
            shards *= mesh.size(i)
    return max(world // shards, 1)


def clip_grad_norm(params: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to ``max_norm`` by their global L2 norm, computed in fp64; returns the norm.

    torch's ``clip_grad_norm_`` sums squares in fp32 and was measured 8e-5 (single process) and 3e-5
    (FSDP2 shards) off the fp64 norm of the very same gradients on the tiny model: too coarse to
    compare runs at 1e-4. FSDP2 gradients are DTensors: each rank adds its local shard's squares
    divided by the number of ranks holding that same shard (:func:`_replicas`: 1 under plain FSDP2;
    the tensor-parallel degree for layers replicated over tp), and one all-reduce sums them, so every
    parameter counts once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    device = local[0].device if local else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    reduce = any(hasattr(g, "to_local") for g in grads) and dist.is_initialized()
    world = dist.get_world_size() if reduce else 1
    for g, g_local in zip(grads, local):
        sq_g = torch.linalg.vector_norm(g_local, dtype=torch.float64).square()
        n = _replicas(g, world) if reduce else 1
        sq += sq_g / n if n != 1 else sq_g
    if reduce:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(coef.to(g.dtype))  # in place on the local shard: no Tensor / DTensor mixing
    return norm


class LossRecipe:
    """Recipe for SFT (``task="sft"``) or knowledge distillation (``task="kd"``), torchtune-shaped:
    ``setup(cfg)``, ``train()``, ``save_checkpoint(...)``, ``cleanup()``.

    Config keys (see configs/tiny/*.yaml for every one, commented): model, tokenizer, checkpointer,
    dataset, loss, optimizer, lr_scheduler, batch_size, gradient_accumulation_steps, epochs,
    max_steps_per_epoch, clip_grad_norm, seed, shuffle, device, dtype, metric_logger, log_every_n_steps,
    output_dir, resume_from_checkpoint, save_every_n_steps, stop_after_steps,
    enable_activation_checkpointing, log_loss_memory, tensor_parallel_dim (distributed); KD adds teacher_model, teacher_checkpointer,
    kd_loss and kd_ratio (unless the loss is a fused distillation loss, which carries its own).
    """

    def __init__(self, cfg: DictConfig, task: str, distributed: bool):
        if task not in ("sft", "kd"):
            raise ValueError(f"task: expected 'sft' or 'kd', got {task!r}")
        self.task = task
        self.distributed = distributed
        if distributed and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg.device == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_rank_zero = self.rank == 0
        self.device = utils.get_device(cfg.device)
        self._setup_parallelism(cfg)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        # null seeds as 0: every rank and every resumed run must agree on it.
        self.seed = int(cfg.seed) if cfg.get("seed", None) is not None else 0
        self.epochs = int(cfg.epochs)
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.grad_accum = int(cfg.gradient_accumulation_steps)
        self.clip_grad_norm = cfg.get("clip_grad_norm", None)
        self.log_every_n_steps = int(cfg.get("log_every_n_steps", 1))
        self.save_every_n_steps = cfg.get("save_every_n_steps", None)
        self.stop_after_steps = cfg.get("stop_after_steps", None)
        self.output_dir = cfg.output_dir
        self.resume = bool(cfg.get("resume_from_checkpoint", False))
        self.global_step = 0
        self.epochs_run = 0

    # ------------------------------------------------------------------------------------------ setup
    def _setup_parallelism(self, cfg: DictConfig) -> None:
        """Data-parallel size / rank / group, and the ``(dp, tp)`` mesh when ``tensor_parallel_dim > 1``."""
        tp = cfg.get("tensor_parallel_dim", 1)
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_dim: expected an int >= 1, got {tp!r}")
        if tp > 1 and not self.distributed:
            raise ValueError(f"tensor_parallel_dim: {tp} needs a distributed recipe "
                             f"(tune run --nproc_per_node N recipes/<x>_distributed.py); the single-device ones take 1")
        if self.world_size % tp:
            raise ValueError(f"tensor_parallel_dim: expected a divisor of the world size {self.world_size}, got {tp}")
        self.tp = tp
        self.mesh = None
        self.dp_size, self.dp_rank, self.dp_group = self.world_size, self.rank, None
        if tp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (self.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
            self.dp_size = self.world_size // tp
            self.dp_rank = self.mesh.get_local_rank("dp")
            self.dp_group = self.mesh["dp"].get_group()

    def _check_tensor_parallel_losses(self) -> None:
        """Tensor parallelism shards the logits' vocabulary: only fused losses (hidden states in) see it."""
        if self.tp == 1:
            return
        fused = callable(getattr(self.loss_fn, "set_model_output", None))
        if not fused or (self.task == "kd" and not callable(getattr(self.loss_fn, "set_teacher_output", None))):
            raise ValueError(
                f"tensor_parallel_dim: {self.tp} needs a fused loss (tune_losses.LinearCrossEntropyLoss, or "
                f"tune_losses.LinearDistillationLoss for KD), which computes the vocabulary-sharded output "
                f"projection without gathering logits; got loss {type(self.loss_fn).__name__}"
            )

    def setup(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        # Same seed on every rank for model init (LoRA weights are not in the checkpoint), so a sharded
        # run starts from exactly the single-device weights; data order comes from the sampler's seed.
        torch.manual_seed(self.seed)
        self.metric_logger = config.instantiate(cfg.metric_logger) if self.is_rank_zero else None
        if self.metric_logger is not None:
            self.metric_logger.log_config(cfg)
        self.tokenizer = config.instantiate(cfg.tokenizer)

        ckpt = config.instantiate(cfg.checkpointer).load_checkpoint()
        self.checkpointer = config.instantiate(cfg.checkpointer)
        self.model = self._build_model(cfg.model, ckpt[training.MODEL_KEY], trainable=True,
                                       activation_checkpointing=cfg.get("enable_activation_checkpointing", False))
        self.loss_fn = config.instantiate(cfg.loss)
        self._check_tensor_parallel_losses()
        self.ignore_index = getattr(self.loss_fn, "ignore_index", -100)
        self.output_mode = configure_model_for_loss(self.model, self.loss_fn)

        self.teacher = None
        self.kd_loss_fn = None
        if self.task == "kd":
            t_ckpt = config.instantiate(cfg.teacher_checkpointer).load_checkpoint()
            self.teacher = self._build_model(cfg.teacher_model, t_ckpt[training.MODEL_KEY], trainable=False)
            self.teacher.eval()
            if callable(getattr(self.loss_fn, "set_teacher_output", None)):
                self.loss_fn.set_teacher_output(self.teacher)  # fused: CE + KD in one pass
                self.kd_ratio = float(self.loss_fn.kd_ratio)
            else:
                self.kd_loss_fn = config.instantiate(cfg.kd_loss)
                self.kd_ratio = float(cfg.kd_ratio)
                # The teacher emits what the student emits (same chunk count and split): the KD loss pairs them.
                configure_model_for_loss(self.teacher, self.loss_fn)
        log.info(f"rank {self.rank}: {self.task} with {type(self.loss_fn).__name__}, model output mode "
                 f"'{self.output_mode}', world size {self.world_size}"
                 + (f" (data parallel {self.dp_size} x tensor parallel {self.tp})" if self.tp > 1 else ""))

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, params)
        self.dataloader, self.sampler = self._build_data(cfg)
        self.steps_per_epoch = len(self.dataloader) // self.grad_accum
        if self.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, int(self.max_steps_per_epoch))
        self.lr_scheduler = None
        if cfg.get("lr_scheduler", None) is not None:
            self.lr_scheduler = config.instantiate(cfg.lr_scheduler, self.optimizer,
                                                   num_training_steps=self.epochs * self.steps_per_epoch)
        if self.resume:
            self._load_resume_state()

    def _build_model(self, cfg_model: DictConfig, state_dict: Dict[str, Any], trainable: bool,
                     activation_checkpointing: bool = False) -> nn.Module:
        with training.set_default_dtype(self.dtype), self.device:
            model = config.instantiate(cfg_model)
        adapter = get_adapter_params(model) if trainable else {}
        if activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
        if self.distributed:
            from torch.distributed.fsdp import fully_shard
            dp_mesh = None
            if self.tp > 1:
                self._shard_output_over_vocab(model)
                dp_mesh = self.mesh["dp"]
            for layer in model.layers:
                fully_shard(layer, mesh=dp_mesh)
            fully_shard(model, mesh=dp_mesh)
        # LoRA models lack their adapter weights in the base checkpoint: load non-strictly, then check
        # that only adapter keys were missing.
        result = set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True,
                                                                                  strict=not adapter))
        if adapter:
            unexpected_missing = [k for k in result.missing_keys if "lora" not in k]
            if unexpected_missing or result.unexpected_keys:
                raise ValueError(f"checkpoint: keys missing {unexpected_missing} / unexpected {result.unexpected_keys}")
            set_trainable_params(model, adapter)
        if not trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        return model

    def _shard_output_over_vocab(self, model: nn.Module) -> None:
        """Tensor parallel output projection: weight (and bias) ``Shard(0)`` over the vocabulary on ``tp``."""
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        head = output_projection(model).head
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"tensor_parallel_dim: expected the model's output projection to be an nn.Linear to shard over the "
                f"vocabulary, got {type(head).__name__} (tied embeddings and LoRA output layers are not supported)"
            )
        # ColwiseParallel's hooks only run when the head itself is called (never in hidden-states mode).
        parallelize_module(head, self.mesh["tp"], ColwiseParallel())

    def _build_data(self, cfg: DictConfig):
        ds = config.instantiate(cfg.dataset, self.tokenizer)
        # Ranks of one dp group (its tp ranks) read the same samples.
        sampler = DistributedSampler(ds, num_replicas=self.dp_size, rank=self.dp_rank,
                                     shuffle=bool(cfg.shuffle), seed=self.seed, drop_last=True)
        collate = partial(padded_collate_sft, padding_idx=self.tokenizer.pad_id, ignore_idx=self.ignore_index)
        loader = DataLoader(ds, batch_size=int(cfg.batch_size), sampler=sampler, collate_fn=collate, drop_last=True)
        return loader, sampler

    # ------------------------------------------------------------------------------------------ train
    def _micro_batch_loss(self, batch: Dict[str, torch.Tensor], labels: torch.Tensor) -> LossSum:
        """Forward one micro-batch; ``(sum over its valid tokens, count, parts)``."""
        tokens = batch["tokens"]
        kwargs = {k: batch[k] for k in ("mask", "input_pos") if k in batch}
        out = self.model(tokens, **kwargs)
        if self.teacher is None:
            return loss_sum_and_count(self.loss_fn, out, labels)
        with torch.no_grad():
            t_out = self.teacher(tokens, **kwargs)
        if self.kd_loss_fn is None:
            return loss_sum_and_count(self.loss_fn, out, t_out, labels)
        ce = loss_sum_and_count(self.loss_fn, out, labels)
        kd = loss_sum_and_count(self.kd_loss_fn, out, t_out, labels)
        total = (1 - self.kd_ratio) * ce.total + self.kd_ratio * kd.total
        return LossSum(total, ce.num_tokens, {"class_loss": ce.total.detach(), "kd_loss": kd.total.detach()})

    def _batches(self, epoch: int) -> Iterator[List[Dict[str, torch.Tensor]]]:
        """Optimizer steps of one epoch, each a list of ``grad_accum`` micro-batches; resumes mid-epoch."""
        self.sampler.set_epoch(epoch)
        it = iter(self.dataloader)
        done = self.global_step - epoch * self.steps_per_epoch  # steps of this epoch already taken
        for _ in islice(it, max(done, 0) * self.grad_accum):
            pass
        for _ in range(self.steps_per_epoch - max(done, 0)):
            micro = list(islice(it, self.grad_accum))
            if len(micro) < self.grad_accum:
                return
            yield micro

    def train(self) -> None:
        self.model.train()
        first_epoch = self.global_step // max(self.steps_per_epoch, 1)
        pbar = tqdm(total=self.epochs * self.steps_per_epoch, initial=self.global_step,
                    disable=not self.is_rank_zero, desc=f"{self.task}", dynamic_ncols=True)
        for epoch in range(first_epoch, self.epochs):
            for micro in self._batches(epoch):
                metrics = self._train_step(micro)
                self.global_step += 1
                pbar.update(1)
                pbar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if self.metric_logger is not None and self.global_step % self.log_every_n_steps == 0:
                    self.metric_logger.log_dict(metrics, step=self.global_step)
                if self.save_every_n_steps and self.global_step % int(self.save_every_n_steps) == 0:
                    self.save_checkpoint(epoch)
                if self.stop_after_steps is not None and self.global_step >= int(self.stop_after_steps):
                    log.info(f"stop_after_steps={self.stop_after_steps} reached: stopping (resume to continue)")
                    pbar.close()
                    return
            self.epochs_run = epoch + 1
            self.save_checkpoint(epoch)
        pbar.close()

    def _train_step(self, micro: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        start = time.perf_counter()
        for batch in micro:
            utils.batch_to_device(batch, self.device)
        labels = [_shift_labels(b.pop("labels"), self.ignore_index) for b in micro]
        # Exact normalization: the step's valid tokens over micro-batches and ranks, before any backward.
        global_tokens = count_step_tokens(labels, self.ignore_index, group=self.dp_group)
        scale = self.dp_size / global_tokens.clamp(min=1).float()
        if self.global_step == 0 and self.cfg.get("log_loss_memory", False):
            self._log_loss_memory(micro[0], labels[0])
        sums: Dict[str, torch.Tensor] = {}
        for batch, lab in zip(micro, labels):
            result = self._micro_batch_loss(batch, lab)
            (result.total * scale).backward()
            parts = {"loss": result.total.detach(), **(result.parts or {})}
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        grad_norm = None
        if self.clip_grad_norm is not None:
            grad_norm = clip_grad_norm([p for p in self.model.parameters() if p.requires_grad],
                                       max_norm=float(self.clip_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        # Logging: one all-reduce of the step's sums, then the host reads them (outside the loss math).
        keys = sorted(sums)
        stacked = all_reduce_token_count(torch.stack([sums[k] for k in keys]), group=self.dp_group)
        denom = global_tokens.clamp(min=1).float()
        metrics = {k: float(v) for k, v in zip(keys, (stacked / denom).tolist())}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["tokens_per_second_per_rank"] = float(global_tokens) / self.dp_size / (time.perf_counter() - start)
        return metrics

    def _log_loss_memory(self, batch: Dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Peak memory of the loss alone (output projection + loss, forward and backward), once per run."""
        if self.distributed:
            return  # outside forward, FSDP2 weights are sharded; measured by the single-device recipes
        tokens = batch["tokens"]
        mode, n = self.output_mode, getattr(self.model, "num_output_chunks", 0)
        with torch.no_grad():
            set_output_mode(self.model, "hidden")
            hidden = self.model(tokens)
            t_hidden = None
            if self.teacher is not None:
                t_mode, t_n = ("hidden", 0) if self.kd_loss_fn is None else (mode, n)
                set_output_mode(self.teacher, "hidden")
                t_hidden = self.teacher(tokens)
                set_output_mode(self.teacher, t_mode, t_n)
        configure_model_for_loss(self.model, self.loss_fn)
        proj = output_projection(self.model)
        t_proj = output_projection(self.teacher) if self.teacher is not None else None

        def project(p, h):
            if mode == "hidden":
                return h
            if mode == "chunks":
                return [p(c) for c in split_tokens(h, n)]
            return p(h).float()

        def region():
            h = hidden.detach().requires_grad_(True)
            args = [project(proj, h)]
            if t_hidden is not None:
                with torch.no_grad():
                    args.append(project(t_proj, t_hidden))
            if self.kd_loss_fn is None:
                total = loss_sum_and_count(self.loss_fn, *args, labels).total
            else:
                total = (loss_sum_and_count(self.loss_fn, args[0], labels).total
                         + loss_sum_and_count(self.kd_loss_fn, *args, labels).total)
            total.backward()

        peak = peak_memory_of(region, self.device)
        for p in self.model.parameters():
            p.grad = None
        msg = {"loss_peak_memory_mib": peak / 2**20}
        log.info(f"loss peak memory (projection + loss, fwd + bwd, batch {tuple(tokens.shape)}): {peak / 2**20:.1f} MiB")
        if self.metric_logger is not None:
            self.metric_logger.log_dict(msg, step=0)

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, epoch: int) -> None:
        """Export weights in torchtune format (``output_dir/epoch_<epoch>``) and the full resume state
        (``output_dir/resume/state.pt``: model, optimizer, scheduler, step counters)."""
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=full)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        if self.is_rank_zero:
            export = model_sd
            if get_adapter_params(self.model):
                export = get_merged_lora_ckpt(dict(model_sd), rank=int(self.cfg.model.lora_rank),
                                              alpha=float(self.cfg.model.lora_alpha))
            self.checkpointer.save_checkpoint({training.MODEL_KEY: export}, epoch=epoch,
                                              intermediate_checkpoint=False)
            path = os.path.join(self.output_dir, RESUME_FILE)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({
                "model": model_sd, "optimizer": optim_sd,
                "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
                "global_step": self.global_step, "epochs_run": self.epochs_run, "seed": self.seed,
                "steps_per_epoch": self.steps_per_epoch, "rng": torch.get_rng_state(),
            }, path + ".tmp")
            os.replace(path + ".tmp", path)  # never leave a half-written resume file
        if dist.is_initialized():
            dist.barrier()

    def _load_resume_state(self) -> None:
        path = os.path.join(self.output_dir, RESUME_FILE)
        if not os.path.exists(path):
            raise ValueError(f"resume_from_checkpoint: expected a resume state at {path}, found none")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"resume_from_checkpoint: the checkpoint has {state['steps_per_epoch']} steps per epoch, "
                             f"this config {self.steps_per_epoch}; resume with the same data and batch settings")
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=full)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=full)
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step, self.epochs_run = state["global_step"], state["epochs_run"]
        torch.set_rng_state(state["rng"])
        log.info(f"resumed from {path} at step {self.global_step}")

    def cleanup(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def run(recipe_cls, cfg: DictConfig) -> None:
    """Entry point shared by the four recipes: ``recipe_cls(cfg)``, setup, train, cleanup."""
    config.log_config(recipe_name=recipe_cls.__name__, cfg=cfg)
    recipe = recipe_cls(cfg)
    recipe.setup(cfg)
    recipe.train()
    recipe.cleanup()
