"""The training program's configuration: one typed dataclass, units in comments.

Every field is a command-line flag of the same name (`--lr 0.4`); the data
fields are nested under `data.` (`--data.backend digits`), exactly as in the
recipe files (`[data]` table). Values are resolved in this order, later
winning: the defaults below, the recipe (`--recipe paper-cifar`), the saved
config of the run being resumed (`--resume DIR`), the command line.

"auto" means: the fast setting on CUDA, the cheap one on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fastresnet.data import DataConfig
from fastresnet.errors import ConfigError

CompileMode = Literal["auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def _default_data() -> DataConfig:
    # ResNet-20 on the small `digits` set runs in about a minute on a laptop CPU.
    return DataConfig(backend="digits", batch_size=128)


@dataclass
class TrainConfig:
    # --- what to train
    model: str = "resnet20"  # a name of fastresnet.models.list_models()
    shortcut: str = ""  # "A" zero-pad, "B" projection where dims change, "C" always; "" = the model's default
    zero_init_residual: bool = False  # last BN of each residual branch starts at 0
    data: DataConfig = field(default_factory=_default_data)  # batch_size is per process (per GPU)

    # --- how long, and the learning-rate schedule (lengths in `unit`)
    unit: Literal["epoch", "step"] = "epoch"  # unit of length, lr_milestones and warmup; step = one optimizer step
    length: float = 15.0  # training length, in `unit`
    lr: float = 0.1  # peak learning rate (per base_batch_size images per step if that is set)
    base_batch_size: int = 0  # linear scaling: lr * global_batch / base_batch_size; 0 = lr as given
    schedule: Literal["constant", "step", "cosine", "plateau"] = "cosine"
    lr_milestones: tuple[float, ...] = ()  # in `unit`; schedule "step" divides lr by lr_decay at each
    lr_decay: float = 10.0  # divisor at each milestone or plateau
    plateau_patience: int = 5  # epochs without a new best test error (>= plateau_threshold better) before decaying
    plateau_threshold: float = 0.1  # test error improvement that counts, in percentage points
    min_lr: float = 0.0  # floor of the cosine schedule
    warmup: float = 0.0  # warm-up length, in `unit`
    warmup_kind: Literal["linear", "constant"] = "linear"  # linear: warmup_lr -> lr; constant: warmup_lr throughout
    warmup_lr: float = 0.0  # lr at the start of a linear warm-up, or during a constant one (scaled like lr)
    warmup_until_train_error: float = 0.0  # percent; > 0: warm-up ends once the training error is below it

    # --- optimizer and loss
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4  # L2 penalty per step, on the weights
    no_bn_bias_decay: bool = False  # no weight decay on BN parameters and biases (ndim <= 1)
    label_smoothing: float = 0.0  # fraction of the target mass spread over all classes
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"  # auto: fused on CUDA, foreach else

    # --- speed
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"; under torchrun each process takes cuda:LOCAL_RANK
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # autocast dtype; fp16 adds a GradScaler; auto: bf16 on CUDA, on a CPU bf16 where a timed step wins (AMX/AVX512-BF16), else off
    channels_last: bool = True  # NHWC memory format (tensor cores, fused kernels)
    compile: CompileMode = "auto"  # torch.compile mode; CUDA graphs come only with reduce-overhead or max-autotune; auto: default on CUDA, off on CPU
    fused_blocks: Literal["auto", "on", "off"] = "auto"  # fused conv-BN-ReLU blocks; auto: off on CPU, on with CUDA, and under compile only if a timed step (cached) says they win
    cudnn_benchmark: bool = True  # let cuDNN time its algorithms on the first steps
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # under torchrun; auto: nccl on CUDA, gloo on a CPU

    # --- evaluation, logging, outputs
    eval_every: int = 1  # epochs between evaluations on the validation set (0 = only at the end)
    log_every: int = 20  # optimizer steps between metric reads (the only host syncs of the step loop)
    progress: Literal["auto", "bar", "lines", "off"] = "auto"  # auto: a bar on a terminal, plain lines otherwise
    out_dir: str = "runs"  # parent directory of run directories
    run_name: str = ""  # "" = <model>-<backend>-<UTC time>
    checkpoint_every: int = 1  # epochs between checkpoints (a checkpoint is also written at the end and on SIGTERM)
    plot: bool = True  # write curves.png at each evaluation and at the end
    seed: int = 0
    stop_at_step: int = 0  # > 0: save and exit after this global step as if preempted (tests, fixed job slots)


def saved_values(saved: dict) -> dict:
    """A run's saved config (config.json, or its checkpoint's copy) as flat values to apply.

    Configs saved while `data.num_classes` was 1000 by default on every back end hold 1000 where it
    meant "not given" (a back end with its own count ignored it): it is read as not given, which
    every back end takes as it took 1000 then."""
    from fastresnet.training.fields import flatten

    values = flatten(saved)
    if values.get("data.num_classes") == 1000:
        del values["data.num_classes"]
    return values


def validate(cfg: TrainConfig) -> None:
    """Semantic checks across fields (types were checked when the values were parsed)."""
    from fastresnet.models import list_models
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(cfg.model in list_models(), f"model {cfg.model!r} is not in the zoo; choose one of: {', '.join(list_models())}")
    need(cfg.shortcut in ("", "A", "B", "C"), f"shortcut must be A, B, C or empty, got {cfg.shortcut!r}")
    need(not (cfg.shortcut and cfg.model.startswith("plain")),
         f"--shortcut {cfg.shortcut}: {cfg.model} is a plain net, it has no shortcuts (train a resnet to compare options)")
    need(not (cfg.zero_init_residual and cfg.model.startswith("plain")),
         f"--zero_init_residual true: {cfg.model} is a plain net, it has no residual branch to start at zero")
    need(cfg.length > 0, f"length must be > 0 ({cfg.unit}s), got {cfg.length}")
    need(cfg.unit == "epoch" or float(cfg.length).is_integer(), f"length in steps must be whole, got {cfg.length}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.base_batch_size >= 0, f"base_batch_size must be >= 0, got {cfg.base_batch_size}")
    need(cfg.lr_decay > 0, f"lr_decay must be > 0, got {cfg.lr_decay}")
    need(cfg.schedule != "step" or len(cfg.lr_milestones) > 0, "schedule 'step' needs lr_milestones (in `unit`)")
    need(cfg.schedule == "step" or not cfg.lr_milestones,
         f"--lr_milestones {','.join(f'{m:g}' for m in cfg.lr_milestones)}: the {cfg.schedule} schedule does not use "
         "them; add --schedule step, or drop them")
    check_schedule_settings_apply(cfg)
    need(list(cfg.lr_milestones) == sorted(cfg.lr_milestones), f"lr_milestones must ascend, got {cfg.lr_milestones}")
    need(all(m > 0 for m in cfg.lr_milestones), f"lr_milestones must be > 0, got {cfg.lr_milestones}")
    need(cfg.plateau_patience >= 1, f"plateau_patience must be >= 1 evaluation, got {cfg.plateau_patience}")
    need(cfg.schedule != "plateau" or cfg.eval_every >= 1, "schedule 'plateau' needs evaluations: eval_every >= 1")
    need(0 <= cfg.min_lr <= cfg.lr, f"min_lr must be in [0, lr], got {cfg.min_lr}")
    need(cfg.warmup >= 0, f"warmup must be >= 0, got {cfg.warmup}")
    need(cfg.warmup < cfg.length, f"warmup ({cfg.warmup}) must be shorter than length ({cfg.length})")
    need(0 <= cfg.warmup_until_train_error <= 100, "warmup_until_train_error is a percentage in [0, 100]")
    need(cfg.warmup_lr >= 0, f"warmup_lr must be >= 0, got {cfg.warmup_lr}")
    need(cfg.warmup_kind != "constant" or cfg.warmup_lr > 0, "a constant warm-up needs warmup_lr > 0")
    need(0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    need(not cfg.nesterov or cfg.momentum > 0, "nesterov needs momentum > 0")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(0 <= cfg.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(cfg.log_every >= 1, f"log_every must be >= 1 step, got {cfg.log_every}")
    need(cfg.eval_every >= 0, f"eval_every must be >= 0 epochs, got {cfg.eval_every}")
    need(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0 epochs, got {cfg.checkpoint_every}")
    need(cfg.stop_at_step >= 0, f"stop_at_step must be >= 0, got {cfg.stop_at_step}")
    need(0 <= cfg.seed < 2**32, f"seed must be in [0, 2**32), got {cfg.seed}")  # numpy's range
    need("/" not in cfg.run_name and "\\" not in cfg.run_name and cfg.run_name not in (".", ".."),
         f"--run_name {cfg.run_name!r}: a run name is one folder name inside --out_dir, not a path")
    if cfg.device != "auto":
        check_device(cfg.device)
    check_data_settings_apply(cfg)
    from fastresnet.training import smoke

    smoke.on()  # a bad FASTRESNET_SMOKE value is the user's mistake too
    from fastresnet.ops import tuning

    try:  # the tuning switches (FASTRESNET_DISPATCH and kin): a mistake there is the user's too
        tuning.settings()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_schedule_settings_apply(cfg: TrainConfig) -> None:
    """A schedule setting away from its default that the run's schedule does not read is an error."""
    warm = cfg.warmup > 0 or cfg.warmup_until_train_error > 0
    readers = {  # field: (whether this run reads it, what does)
        "lr_decay": (cfg.schedule in ("step", "plateau"), "the step and plateau schedules"),
        "plateau_patience": (cfg.schedule == "plateau", "the plateau schedule"),
        "plateau_threshold": (cfg.schedule == "plateau", "the plateau schedule"),
        "min_lr": (cfg.schedule == "cosine", "the cosine schedule"),
        "warmup_kind": (warm, "a warm-up (--warmup or --warmup_until_train_error)"),
        "warmup_lr": (warm, "a warm-up (--warmup or --warmup_until_train_error)"),
    }
    defaults = TrainConfig()
    for name, (read, by) in readers.items():
        value = getattr(cfg, name)
        if not read and value != getattr(defaults, name):
            shown = f"{value:g}" if isinstance(value, float) else value
            this_run = "this run has no warm-up" if name.startswith("warmup") else f"this run's is {cfg.schedule}"
            raise ConfigError(f"--{name} {shown}: it is read only by {by}, and {this_run}; "
                              "drop it, or add what reads it")


def check_data_settings_apply(cfg: TrainConfig) -> None:
    """Every data setting applies to the back end the run will use (`auto` resolved as build_loaders
    resolves it): one the back end does not read, away from its default, is an error naming it."""
    import torch

    from fastresnet.data import resolve_backend
    from fastresnet.data.config import check_settings_apply

    on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    backend = resolve_backend(cfg.data, torch.device("cuda" if on_gpu else "cpu"))
    try:
        check_settings_apply(cfg.data, backend, flag_prefix="--data.")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_device(name: str) -> None:
    """The device exists here: a CUDA device needs a visible GPU of that index."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to this process; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine shows {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
