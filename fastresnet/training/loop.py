"""The training loop: steps without host syncs, evaluation, checkpoints, logs.

    from fastresnet.training import TrainConfig, train
    result = train(TrainConfig(length=2))

One step is: next batch (timed as data wait), lr from the schedule (host
arithmetic), forward under autocast, backward (scaled under fp16), optimizer
step, zero_grad(set_to_none=True), and a device-side add to the metric sums.
Nothing in it reads a device value; the host syncs once per `log_every` steps.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastresnet.data import BadImageError, build_loaders
from fastresnet.data.loader import require_batches
from fastresnet.errors import UserError
from fastresnet.flops import count_macs
from fastresnet.outputs import writable_folder
from fastresnet.ops import tuning
from fastresnet.training import distributed, smoke
from fastresnet.training.checkpoint import (
    CHECKPOINT_NAME, CheckpointError, capture_rng, check_resumable, load_checkpoint, load_weights, restore_rng,
    save_atomic,
)
from fastresnet.training.config import TrainConfig, validate
from fastresnet.training.fields import ConfigError
from fastresnet.training.metrics import (
    EvalAccumulator, JsonLines, Throughput, TrainAccumulator, memory_gib, peak_tflops, train_flops_per_image,
)
from fastresnet.training.model import amp_autocast, build_model, build_optimizer, prepare_model
from fastresnet.training.plot import plot_curves
from fastresnet.training.precision import choose_amp
from fastresnet.training.progress import Progress
from fastresnet.training.rundir import open_run_dir, run_config, write_run_files
from fastresnet.training.schedule import LRSchedule, ScheduleSpec
from fastresnet.training.signals import StopRequest

FORMAT_VERSION = 1
# What _save writes and _load reads back
RESUME_NEEDS = ("model", "optimizer", "scaler", "schedule", "epoch", "batches_done", "step", "rng_epoch_start", "rng",
                "config")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def train(cfg: TrainConfig, resume: str | Path | None = None) -> dict:
    """Train (or continue, from a run directory) and return the final metrics and where outputs went."""
    validate(cfg)
    writable_folder(resume or cfg.out_dir, "--resume" if resume else "--out_dir")  # before any data is read
    cfg = smoke.shrink(cfg)
    info, device = distributed.setup(cfg.device, cfg.dist_backend)
    stop = StopRequest().install()
    try:
        try:
            trainer = Trainer(cfg, info, device, Path(resume) if resume else None, stop)
        except UserError:
            raise
        except (ValueError, FileNotFoundError) as err:  # a dataset folder, a class count, a batch size
            raise ConfigError(f"cannot start: {err}") from err
        return trainer.run()
    finally:
        stop.uninstall()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_cuda(cfg: TrainConfig, device: torch.device) -> None:
    """The GPU's math as a training run of `cfg` has it: cuDNN's autotuner as configured, TF32 for
    fp32 matmuls and convs. The profile and the tuning ahead of a run set the same."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class Trainer:
    def __init__(self, cfg: TrainConfig, info, device: torch.device, resume: Path | None, stop: StopRequest):
        self.cfg, self.info, self.device, self.stop = cfg, info, device, stop
        seed_everything(cfg.seed)  # the same on every rank: identical initial weights (DDP also broadcasts them)
        configure_cuda(cfg, device)
        if device.type == "cuda" and info.rank == 0:  # a first call's measurements, said as they happen
            tuning.show_progress(tuning.TuningProgress())  # (python -m fastresnet.tune makes them ahead)

        self.data = build_loaders(cfg.data, device=device, rank=info.rank, world_size=info.world_size, seed=cfg.seed)
        model = build_model(cfg, self.data.num_classes)
        self.macs = count_macs(model, (3, self.data.image_size, self.data.image_size))
        # A timed step where it matters; under torchrun every rank runs rank 0's choice.
        self.precision = distributed.rank0_choice(choose_amp(cfg, device, self.data.image_size))
        self.amp = self.precision.dtype
        self.prepared = prepare_model(model, cfg, device, self.data.image_size)
        self.model = self.prepared.module
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None

        require_batches(self.data.train)
        self.steps_per_epoch = len(self.data.train)
        self.global_batch = cfg.data.batch_size * info.world_size
        self.lr_scale = self.global_batch / cfg.base_batch_size if cfg.base_batch_size else 1.0
        self.peak_lr = cfg.lr * self.lr_scale
        self.total_steps = self._to_steps(cfg.length)
        self.smoke = smoke.on()
        if self.smoke:
            self.total_steps = min(self.total_steps, smoke.STEPS)
        self.schedule = LRSchedule(self._schedule_spec())
        self.optimizer = build_optimizer(self.model, cfg, device, self.schedule.lr_at(0))
        self.optimizer_impl = "fused" if self.optimizer.defaults.get("fused") else (
            "foreach" if self.optimizer.defaults.get("foreach") else "for-loop")
        self.train_step = make_train_step(self.prepared.runner, self.criterion, self.optimizer, self.amp, self.scaler)

        self.epoch, self.batches_done, self.step = 0, 0, 0
        self.epoch_start_rng: dict | None = None
        self.resume_rng: dict | None = None
        self.last_good_checkpoint: Path | None = None
        self.last_eval: dict = {}
        self.evaluated_at = self.saved_at = -1  # the steps of the last evaluation and checkpoint
        self.saved_evaluated_at = -1  # the step of the last evaluation that the checkpoint records
        self.restarted = False  # a torchelastic restart continuing its launch's run
        if resume is None:
            self.run_dir, self.restarted = open_run_dir(cfg, info.is_main)
            if self.restarted and (self.run_dir / CHECKPOINT_NAME).is_file():
                resume = self.run_dir
        else:
            self.run_dir = resume
        if resume is not None:
            self._load(resume / CHECKPOINT_NAME)
        # A resumed run that had reached its length and its final evaluation: nothing to do, nothing to write.
        self.finished = self.step >= self.total_steps and self.evaluated_at == self.step
        writes = info.is_main and not self.finished
        self.metrics_log = JsonLines(self.run_dir / "metrics.jsonl" if writes else None)
        self.metrics_log.drop_after(self.step)  # what a killed process logged after its last checkpoint
        self.reported_skips: set[str] = set()  # bad files listed so far (bad_files="skip")
        self.progress = Progress(cfg.progress, enabled=info.is_main, total_steps=self.total_steps,
                                 steps_per_epoch=self.steps_per_epoch)
        if writes:
            write_run_files(self.run_dir, cfg, self.data.backend, device, info.world_size,
                            speed=self._speed_settings(), start_step=self.step)
        self.accumulator = TrainAccumulator(device)
        self.throughput = Throughput()
        self.window_steps = 0
        self.timed_steps = 0  # steps in the throughput window (the first step of a process is left out)
        self.first_step_of_process = True
        self.first_step_speed: dict | None = None  # the window's speed while it holds only that first step
        self.flops_per_image = train_flops_per_image(self.macs)
        self.peak = peak_tflops(device, "bf16" if self.amp == torch.bfloat16 else "fp16" if self.amp else "off")

    # --- lengths and schedule

    def _to_steps(self, amount: float) -> int:
        if self.cfg.unit == "step":
            return int(round(amount))
        return int(round(amount * self.steps_per_epoch))

    def _schedule_spec(self) -> ScheduleSpec:
        cfg = self.cfg
        return ScheduleSpec(
            peak_lr=self.peak_lr, total_steps=self.total_steps, kind=cfg.schedule,
            milestones=tuple(self._to_steps(m) for m in cfg.lr_milestones), decay=cfg.lr_decay, min_lr=cfg.min_lr,
            warmup_steps=self._to_steps(cfg.warmup), warmup_kind=cfg.warmup_kind,
            warmup_lr=cfg.warmup_lr * self.lr_scale,  # the recipe's 0.01 is for the same base batch as its 0.1
            warmup_until_train_error=cfg.warmup_until_train_error,
            plateau_patience=cfg.plateau_patience, plateau_threshold=cfg.plateau_threshold,
        )

    # --- the run

    def run(self) -> dict:
        if self.finished:
            return self._say_finished()
        self._announce()
        try:
            status = self._run_epochs()
        except BadImageError as err:
            raise self._stopped_by(err) from err
        if (self.saved_at, self.saved_evaluated_at) != (self.step, self.evaluated_at):  # a final test run since
            self._save()
        self._report_skipped()
        if self.evaluated_at != self.step:  # else the evaluation at this step drew every record already
            self._plot()
        self.progress.close()
        result = {"status": status, "step": self.step, "epoch": self.epoch, "run_dir": str(self.run_dir),
                  "checkpoint": str(self.last_good_checkpoint), "skipped_files": len(self.reported_skips),
                  **{f"test_{k}": v for k, v in self.last_eval.items()}}
        self._say_where_outputs_went(result)
        return result

    def _run_epochs(self) -> str:
        status = "completed"
        while self.step < self.total_steps:
            status = self._train_epoch()
            if status != "epoch-done":
                break
            status = "completed"
            done = self.step >= self.total_steps
            if done or (self.cfg.eval_every and self.epoch % self.cfg.eval_every == 0):
                self._evaluate_and_log()
            if done or (self.cfg.checkpoint_every and self.epoch % self.cfg.checkpoint_every == 0):
                self._save()
            self._report_skipped()
        if status == "completed" and self.evaluated_at != self.step:  # a step-length run ending mid-epoch
            self._evaluate_and_log()
        return status

    def _stopped_by(self, err: BadImageError) -> BadImageError:
        """A bad file met under bad_files="fail": keep the progress (alone: the state is at a step
        boundary; under torchrun the other ranks wait in a collective) and say what to do."""
        if not self.info.distributed and self.info.is_main:
            self._save()
        kept = f"checkpoint saved at step {self.saved_at}" if self.saved_at == self.step else (
            f"the last checkpoint is {self.last_good_checkpoint or 'none (none was written yet)'}")
        return BadImageError(err.path, f"{err.reason or 'a bad file'}; {kept}. Replace or remove the file "
                             f"(python -m fastresnet.data verify {self.cfg.data.root} lists every bad one) or set "
                             f"--data.bad_files skip, then continue with --resume {self.run_dir}")

    def _report_skipped(self) -> None:
        """The bad files skipped since the last report (bad_files="skip"), from every rank: one line on
        the console, all of them in skipped_files.txt."""
        mine = [*self.data.train.skipped_files.items(), *self.data.val.skipped_files.items()]
        found = dict(item for rank_items in distributed.gather(mine) for item in rank_items)
        new = [(path, reason) for path, reason in found.items() if path not in self.reported_skips]
        self.reported_skips.update(found)
        if not new or not self.info.is_main:
            return
        listing = self.run_dir / "skipped_files.txt"
        with open(listing, "a") as f:
            f.writelines(f"{path}: {reason}\n" for path, reason in new)
        self.progress.note(f"skipped {len(new)} bad file(s) (bad_files=skip), listed in {listing}; "
                           f"the first: {new[0][0]}: {new[0][1]}")

    def _epoch_batches(self):
        """The epoch's batch iterator, positioned after the batches already done (a resumed run)."""
        loader = self.data.train
        loader.set_epoch(self.epoch)
        if self.batches_done == 0:
            if self.resume_rng is not None:
                restore_rng(self.resume_rng)
                self.resume_rng = None
            self.epoch_start_rng = capture_rng()
            return iter(loader)
        # Mid-epoch: rebuild the iterator from the epoch's starting RNG state, skip what was done,
        # then continue from the RNG state at the interruption (the data order is a function of seed and epoch).
        restore_rng(self.epoch_start_rng)
        batches = iter(loader)
        for _ in range(self.batches_done):
            next(batches)
        restore_rng(self.resume_rng)
        self.resume_rng = None
        return batches

    def _train_epoch(self) -> str:
        """Steps until the epoch ends ("epoch-done"), the run's length is reached, or a stop is requested."""
        batches = self._epoch_batches()
        if self.first_step_of_process:  # the first window starts at the first batch, after the set-up
            self.throughput.restart()
        self.model.train()
        while self.batches_done < self.steps_per_epoch and self.step < self.total_steps:
            with self.throughput.waiting():
                batch = next(batches, None)
            if batch is None:  # every file of a batch was bad and skipped: the epoch is that much shorter
                self._check_short_epoch_allowed()
                break
            images, labels = batch
            self._step(images, labels)
            self.batches_done += 1
            self.step += 1
            self.window_steps += 1
            self.timed_steps += 1
            if self.first_step_of_process:  # compilation, cuDNN autotuning, allocator growth: not speed
                self.first_step_of_process = False
                if self.device.type == "cuda":  # once per process: the step ends when its kernels do
                    torch.cuda.synchronize(self.device)
                self.first_step_speed = self.throughput.read(self.global_batch)  # and the next window starts
                self.timed_steps = 0
            self.progress.tick(self.step, self.epoch)
            at_log = self.step % self.cfg.log_every == 0
            if at_log:
                self._log_train()
            if self._should_stop(at_log):
                self._log_train()
                return "interrupted" if self.stop else "stopped-at-step"
        self._log_train()
        if self.batches_done >= self.steps_per_epoch or self.step < self.total_steps:
            self.epoch += 1
            self.batches_done = 0
            return "epoch-done"
        return "completed"

    def _check_short_epoch_allowed(self) -> None:
        if self.info.distributed:  # the other ranks would wait for this one's gradients forever
            raise BadImageError(
                f"rank {self.info.rank}", f"a whole batch of bad files was skipped in epoch {self.epoch}, so this "
                "rank has fewer batches than the others, which DistributedDataParallel cannot run: remove the bad "
                f"files (python -m fastresnet.data verify {self.cfg.data.root} lists them)")

    def _should_stop(self, at_log: bool) -> bool:
        if self.cfg.stop_at_step and self.step == self.cfg.stop_at_step:
            return True
        if not self.info.distributed:
            return bool(self.stop)
        # Ranks must stop at the same step: they agree at logging time (a sync there anyway).
        return at_log and distributed.any_rank(bool(self.stop), self.device)

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        lr = self.schedule.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.current_lr = lr
        loss, logits = self.train_step(images, labels)
        self.accumulator.add(loss, logits, labels)

    # --- logging (the only host syncs)

    def _log_train(self) -> None:
        if self.window_steps == 0:
            return
        window = self.accumulator.read()
        # A window of the first step alone (--log_every 1, a one-step epoch) reports that step's own speed.
        speed = self.first_step_speed
        if self.timed_steps:
            speed = self.throughput.read(self.timed_steps * self.global_batch)
        self.timed_steps, self.first_step_speed = 0, None
        steps, self.window_steps = self.window_steps, 0
        self._check_finite(window, steps)
        if self.schedule.observe_train_error(self.step, window["error"]):
            self.progress.note(f"warm-up ended at step {self.step}: training error {window['error']:.1f}% "
                               f"< {self.cfg.warmup_until_train_error:g}%")
        tflops = speed["images_per_s"] * self.flops_per_image / 1e12
        record = {
            "kind": "train", "step": self.step, "epoch": self.epoch + self.batches_done / self.steps_per_epoch,
            "lr": self.current_lr, "loss": window["loss"], "error": window["error"],
            "images_per_s": speed["images_per_s"], "compute_images_per_s": speed["compute_images_per_s"],
            "data_wait_fraction": speed["data_wait_fraction"], "tflops": tflops,
            "peak_fraction": tflops / self.peak if self.peak else None,
            "memory_gib": memory_gib(self.device), "skipped_steps": window["nonfinite_steps"],
            "time": time.time(),
        }
        self.metrics_log.write(record)
        self.progress.train_line(record, self.total_steps)

    def _check_finite(self, window: dict, steps: int) -> None:
        bad = window["nonfinite_steps"]
        if bad == 0:
            return
        if self.scaler is not None and bad < steps * self.info.world_size:
            return  # fp16: the GradScaler skipped those steps and lowered its scale, as designed
        kept = self.last_good_checkpoint or "none was written yet"
        raise NonFiniteLoss(
            f"the loss became NaN or infinite in {bad} of the last {steps} steps (up to step {self.step}); stopping. "
            f"The last good checkpoint is kept: {kept}. Lower --lr, add --warmup, or try --amp fp16/off "
            f"(fp16 skips such steps) and resume with --resume {self.run_dir}."
        )

    # --- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        return evaluate_model(self.model, self.data.val, self.device, self.amp, self.cfg.channels_last)

    def _evaluate_and_log(self) -> None:
        distributed.average_buffers(self.model)
        result = self.evaluate()
        self.last_eval = result
        if self.schedule.observe_test_error(result["top1_error"]):
            self.progress.note(f"test error plateaued: lr divided by {self.cfg.lr_decay:g}")
        record = {"kind": "eval", "step": self.step, "epoch": self.epoch + self.batches_done / self.steps_per_epoch,
                  "crops": self.data.val.crops, **result, "time": time.time()}
        self.metrics_log.write(record)
        self.progress.eval_line(record)
        self.evaluated_at = self.step
        self._plot()

    # --- checkpoints

    def _save(self) -> None:
        distributed.average_buffers(self.model)  # also a barrier: every rank reaches the save
        if not self.info.is_main:
            self.saved_at, self.saved_evaluated_at = self.step, self.evaluated_at
            return
        state = {
            "format": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "step": self.step,
            "rng_epoch_start": self.epoch_start_rng if self.batches_done else None,
            "rng": capture_rng(),
            "config": run_config(self.cfg, self.data.backend),
            "world_size": self.info.world_size,
            "last_eval": self.last_eval,
            "evaluated_at": self.evaluated_at,
        }
        self.last_good_checkpoint = save_atomic(state, self.run_dir / CHECKPOINT_NAME)
        self.saved_at, self.saved_evaluated_at = self.step, self.evaluated_at

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path, needs=RESUME_NEEDS)
        check_resumable(state, self.cfg, self.info.world_size, path)
        load_weights(self.model, state, path, f"{self.cfg.model} with {self.data.num_classes} classes")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            self.schedule.load_state_dict(state["schedule"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{path}: its optimizer or schedule state does not fit this run ({err})") from None
        self.epoch, self.batches_done, self.step = state["epoch"], state["batches_done"], state["step"]
        self.epoch_start_rng = state["rng_epoch_start"]
        self.resume_rng = state["rng"]
        self.last_eval = state.get("last_eval") or {}
        self.evaluated_at = state.get("evaluated_at", -1)  # a checkpoint from before it was kept: not known
        self.saved_at, self.saved_evaluated_at = self.step, self.evaluated_at
        self.last_good_checkpoint = path

    # --- messages

    def _announce(self) -> None:
        cfg, p = self.cfg, self.prepared
        what = "resuming" if self.step else "training"
        self.progress.note(
            f"{what} {cfg.model} ({self.macs / 1e6:.1f} M multiply-adds/image) on {self.data.backend} "
            f"({self.data.train.num_samples} train images/rank, {self.data.num_classes} classes, "
            f"{self.data.image_size}px) | {self.info.world_size} x {self.device} | batch {self.global_batch} | "
            f"peak lr {self.peak_lr:g} | {self.total_steps} steps ({self.steps_per_epoch}/epoch)"
            + (f" from step {self.step}" if self.step else "")
        )
        self.progress.note(
            f"speed: amp {self.precision.summary()}, channels_last {cfg.channels_last}, compile {p.compile_mode}, "
            f"fused blocks {p.fused_blocks}, SGD {self.optimizer_impl}"
        )
        if self.smoke:
            self.progress.note(smoke.note(f"run of {self.total_steps} step(s) and one batch per evaluation, "
                                          f"batches of {smoke.BATCH} images at most"))
        if self.restarted:
            self.progress.note("restarted by torchelastic: continuing this launch's run "
                               + (f"from its checkpoint at step {self.step}" if self.step else "from the start"))
        if self.run_dir is not None:
            self.progress.note(f"outputs: {self.run_dir}")

    def _say_finished(self) -> dict:
        top1 = self.last_eval.get("top1")
        score = f", test top-1 {top1:.2f}%" if top1 is not None else ""
        self.progress.note(f"{self.run_dir} is finished (step {self.step} of {self.total_steps}{score}): nothing "
                           "to do and nothing changed; a longer --length continues it")
        return {"status": "completed", "step": self.step, "epoch": self.epoch, "run_dir": str(self.run_dir),
                "checkpoint": str(self.last_good_checkpoint), "skipped_files": 0,
                **{f"test_{k}": v for k, v in self.last_eval.items()}}

    def _speed_settings(self) -> dict:
        p = self.prepared
        return {
            "amp": self.precision.amp,
            "amp_choice": self.precision.as_dict(),
            "compile": p.compile_mode,
            "fused_blocks": p.fused_blocks,
            "fused_choice": p.fused_choice.as_dict() if p.fused_choice is not None else None,
            "optimizer": self.optimizer_impl,
            "dispatch": tuning.decisions(),
            "smoke": self.smoke,  # a smoke run (FASTRESNET_SMOKE=1), not a result
        }

    def _plot(self) -> None:
        if self.cfg.plot and self.info.is_main:
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png",
                        title=f"{self.cfg.model} on {self._dataset_name()}")

    def _dataset_name(self) -> str:
        """The data set by name: the back end's own (digits, cifar10, ...), or an ImageFolder's folder name."""
        backend = self.data.backend
        if backend in ("dali", "nvjpeg", "torchvision"):
            return f"{Path(self.cfg.data.root).resolve().name} ({backend})"
        return backend

    def _say_where_outputs_went(self, result: dict) -> None:
        if not self.info.is_main:
            return
        if result["status"] == "interrupted":
            self.progress.note(f"stopped by {self.stop.signal_name} after step {self.step}; checkpoint saved. "
                               f"Continue with: python -m fastresnet.train --resume {self.run_dir}")
        elif result["status"] == "stopped-at-step":
            self.progress.note(f"stopped at step {self.step} (stop_at_step); continue with --resume {self.run_dir}")
        top1 = self.last_eval.get("top1")
        if top1 is not None:
            self.progress.note(f"test accuracy: top-1 {top1:.2f}%, top-5 {self.last_eval['top5']:.2f}% "
                               f"({self.data.val.crops} crop{'s' if self.data.val.crops > 1 else ''})")
        self.progress.note(f"outputs in {self.run_dir}: config.json env.json metrics.jsonl curves.png {CHECKPOINT_NAME}")


def make_train_step(runner: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    amp: torch.dtype | None, scaler: torch.amp.GradScaler | None):
    """One optimizer step on a batch, returning (loss, logits) still on the device: no host syncs."""
    device_type = next(runner.parameters()).device.type

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with amp_autocast(device_type, amp):
            logits = runner(images)
            loss = criterion(logits, labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # skips the update when a gradient overflowed fp16
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # frees the gradients instead of writing zeros
        return loss, logits

    return train_step


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, device: torch.device, amp: torch.dtype | None,
                   channels_last: bool = True) -> dict:
    """Top-1/top-5 (%) and mean loss over the loader; 10-crop scores are softmax averages over the crops."""
    was_training = model.training
    model.eval()
    acc = EvalAccumulator(device)
    crops = getattr(loader, "crops", 1)
    for images, labels in smoke.batches(loader):
        with amp_autocast(device.type, amp):
            logits = model(images)
        logits = logits.float()
        if crops > 1:
            probs = logits.softmax(dim=1).view(labels.shape[0], crops, -1).mean(dim=1)
            loss_sum = nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
            acc.add(probs, labels, loss_sum)
        else:
            acc.add(logits, labels, nn.functional.cross_entropy(logits, labels, reduction="sum"))
    model.train(was_training)
    return acc.read()

