"""LoRA fine-tuning of a LLaVA model on LLaVA-format SFT data (``pip install -e ".[train]"``):

    python -m llava.train.lora --data sft.json --image-folder coco/train2017 --model-path liuhaotian/llava-v1.5-7b \\
        --out checkpoints/llava-v1.5-7b-ecso-lora --bf16 --gradient-checkpointing

LLaVA's conventions: LoRA on every linear layer of the language model (``--target-modules`` to choose), the vision
tower frozen, the projector frozen or trained at its own learning rate (``--tune-projector``, ``--projector-lr``);
the model's template (``vicuna_v1`` for LLaVA-1.5) and the tokenization inference uses, the loss on the assistant's
tokens only; images padded to a square (``pad``) as LLaVA-1.5 preprocesses them; AdamW, cosine schedule with 3%
warm-up, no weight decay (LLaVA-1.5's finetune_lora.sh). transformers' Trainer runs the loop, so ``accelerate launch
-m llava.train.lora ...`` or ``torchrun --nproc_per_node N -m llava.train.lora ...`` trains on several GPUs.

OUT gets the checkpoint (LLaVA's LoRA release layout: load it with ``--model-path OUT --model-base MODEL_PATH`` in
run_llava, the worker, generate), ``trainer_state.json`` (the loss at every step) and ``ecso_train.json`` (what was
trained on what, with which settings). Exit status: 0 done, 2 error.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from llava.cli_args import setup_logging
from llava.errors import ECSOError, InvalidRequestError, UnsupportedError
from llava.eval.gen.manifest import environment, file_digest, now_iso, write_manifest
from llava.extras import check_extra, require_extra
from llava.mm_utils import ASPECT_RATIOS
from llava.model.builder import load_model
from llava.model.lora import ADAPTER_CONFIG
from llava.model.vlm import checkpoint_family
from llava.train.checkpoint import PROJECTOR, write_checkpoint
from llava.train.sft_dataset import LlavaTemplateFormat, SFTDataset, collate, read_sft_json

__all__ = ["TrainConfig", "TrainResult", "language_model_targets", "train", "build_parser", "config_from_args",
           "main"]

logger = logging.getLogger("llava.train.lora")
TRAIN_MANIFEST = "ecso_train.json"
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class TrainConfig:
    """One LoRA run. ``max_steps`` > 0 overrides ``epochs``; ``target_modules`` empty: every linear layer of the
    language model; ``max_length``: tokens per row (default: the model's context); ``batch_size`` is per device."""

    data: Path
    image_folder: Path
    model_path: str
    out: Path
    max_steps: int = -1
    epochs: float = 1.0
    lr: float = 2e-4
    projector_lr: float = 2e-5
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ()
    tune_projector: bool = False
    batch_size: int = 16
    grad_accum: int = 1
    bf16: bool = False
    seed: int = 0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    max_length: int | None = None
    gradient_checkpointing: bool = False
    conv_mode: str | None = None
    image_aspect_ratio: str | None = None
    logging_steps: int = 1
    dataloader_workers: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "logging_steps"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "projector_lr", "epochs"):
            if not getattr(self, name) > 0:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise InvalidRequestError(f"--lora-dropout and --warmup-ratio must be in [0, 1), got "
                                      f"{self.lora_dropout} and {self.warmup_ratio}")
        if self.lr_scheduler not in SCHEDULERS:
            raise InvalidRequestError(f"unknown --lr-scheduler {self.lr_scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        if self.max_length is not None and self.max_length < 2:
            raise InvalidRequestError(f"--max-length must be at least 2, got {self.max_length}")
        if (Path(self.out) / ADAPTER_CONFIG).exists() and not self.overwrite:
            raise InvalidRequestError(f"{self.out} already holds a checkpoint; choose another --out or pass "
                                      "--overwrite")


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float]
    rows: int
    dropped: dict[str, list[str]]


def language_model_targets(model: Any, names: tuple[str, ...] = ()) -> str:
    """peft's ``target_modules`` as a regex over the model's module names: the language model's linear layers whose
    last name component is in ``names`` (all of them when empty; never ``lm_head``, the vision tower or the
    projector, as LLaVA's ``find_all_linear_names``). An unknown name is an error listing the valid ones."""
    import torch

    prefix = "model.language_model."
    found = sorted({n.rsplit(".", 1)[1] for n, m in model.named_modules()
                    if n.startswith(prefix) and isinstance(m, torch.nn.Linear)})
    unknown = sorted(set(names) - set(found))
    if unknown or not found:
        raise InvalidRequestError(f"--target-modules {', '.join(unknown)}: not linear layers of the language model; "
                                  f"valid: {', '.join(found)}")
    chosen = sorted(names) if names else found
    return re.escape(prefix) + r".*\.(" + "|".join(map(re.escape, chosen)) + ")"


def _optimizer(model: Any, config: TrainConfig):
    """AdamW over the LoRA weights (``lr``) and, when tuned, the projector (``projector_lr``, LLaVA's
    mm_projector_lr)."""
    import torch

    lora, projector = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (projector if f".{PROJECTOR}." in name else lora).append(p)
    groups = [{"params": lora, "lr": config.lr}]
    if projector:
        groups.append({"params": projector, "lr": config.projector_lr})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _training_args(config: TrainConfig):
    import torch
    from transformers import TrainingArguments

    checkpointing: dict[str, Any] = {}
    if config.gradient_checkpointing:  # the flag is renamed in later transformers 5 releases: pass it only when used
        checkpointing = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        output_dir=str(config.out), max_steps=config.max_steps, num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr, weight_decay=config.weight_decay, warmup_steps=float(config.warmup_ratio),
        lr_scheduler_type=config.lr_scheduler, logging_steps=config.logging_steps, save_strategy="no",
        report_to=[], bf16=config.bf16, seed=config.seed, data_seed=config.seed, remove_unused_columns=False,
        label_names=["labels"], dataloader_num_workers=config.dataloader_workers, ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, **checkpointing,
    )


def _peft_model(loaded: Any, config: TrainConfig):
    from transformers import set_seed

    peft = require_extra("peft", "train", "LoRA fine-tuning")

    model = loaded.model
    model.config.use_cache = False
    lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           bias="none", target_modules=language_model_targets(model, config.target_modules))
    set_seed(config.seed)  # here, not before loading: the LoRA init must not depend on what loading drew
    wrapped = peft.get_peft_model(model, lora)
    for name, p in wrapped.named_parameters():
        if f".{PROJECTOR}." in name:
            p.requires_grad = config.tune_projector
    if config.gradient_checkpointing:
        wrapped.enable_input_require_grads()
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info("LoRA r=%d alpha=%d on %s; %d trainable parameters of %d (%.2f%%)", config.lora_r, config.lora_alpha,
                ", ".join(config.target_modules) or "every linear layer of the language model", trainable, total,
                100 * trainable / total)
    return wrapped


def _console_callbacks() -> tuple:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    return PrinterCallback, ProgressCallback  # they print the logs to stdout, which is for results


def _loss_logger():
    """A Trainer callback that logs each logged step (loss, learning rate, grad norm) to this module's logger."""
    from transformers import TrainerCallback

    class LossLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logger.info("step %d/%d: loss %.4f, lr %.3g, grad norm %s", state.global_step, state.max_steps,
                            logs["loss"], logs.get("learning_rate", float("nan")), logs.get("grad_norm"))

    return LossLogger()


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune, write the checkpoint and the logs (see the module docstring)."""
    from transformers import Trainer

    t0 = time.perf_counter()
    _, family = checkpoint_family(config.model_path)
    if family.engine != "llava":
        raise UnsupportedError(
            f"{config.model_path} is a {family.name} checkpoint; LoRA fine-tuning covers LLaVA-1.5 (both layouts) for "
            "now. Another family needs a PromptFormat over its processor's chat template "
            "(llava/train/sft_dataset.py), its image inputs in the collator and a checkpoint loader for --model-base")
    loaded = load_model(config.model_path, device="cpu", dtype="bfloat16" if config.bf16 else "float32",
                        image_aspect_ratio=config.image_aspect_ratio, conv_mode=config.conv_mode)
    examples = read_sft_json(config.data)
    dataset = SFTDataset(examples, LlavaTemplateFormat(loaded, config.conv_mode), loaded, config.image_folder,
                         config.max_length or loaded.context_len)
    logger.info("%s: %d rows, %d used (%d supervised tokens), left out: %s", config.data, len(examples),
                len(dataset), sum(e.supervised for e in dataset.encoded),
                {k: len(v) for k, v in dataset.dropped.items()} or "none")
    model = _peft_model(loaded, config)
    trainer = Trainer(model=model, args=_training_args(config), train_dataset=dataset,
                      data_collator=partial(collate, pad_token_id=loaded.tokenizer.pad_token_id),
                      optimizers=(_optimizer(model, config), None))
    for callback in _console_callbacks():
        trainer.remove_callback(callback)
    trainer.add_callback(_loss_logger())
    trainer.train()
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    result = TrainResult(config.out, trainer.state.global_step, losses, len(dataset), dataset.dropped)
    if trainer.is_world_process_zero():
        written = write_checkpoint(model, loaded, config.out, config.model_path)
        trainer.state.save_to_json(str(config.out / "trainer_state.json"))
        _write_manifest(config, loaded, result, written, time.perf_counter() - t0)
    return result


def _write_manifest(config: TrainConfig, loaded: Any, result: TrainResult, written: dict, elapsed: float) -> None:
    from importlib import metadata

    env = environment()
    env["packages"]["peft"] = metadata.version("peft")
    write_manifest(config.out / TRAIN_MANIFEST, {
        "created": now_iso(), "base": config.model_path, "base_model": loaded.describe(),
        "load_with": ["--model-path", str(config.out), "--model-base", config.model_path],
        "data": {"path": str(config.data), "sha256": file_digest(config.data), "image_folder": str(config.image_folder),
                 "rows_used": result.rows, "left_out": result.dropped},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "checkpoint": written, "steps": result.steps,
        "loss": {"first": result.losses[0] if result.losses else None,
                 "last": result.losses[-1] if result.losses else None},
        "elapsed_s": round(elapsed, 3), "environment": env,
    })


class _HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written; every flag's default from the flag itself."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.train.lora", description=__doc__, formatter_class=_HelpFormat)
    d = {name: f.default for name, f in TrainConfig.__dataclass_fields__.items()}
    g = p.add_argument_group("data and model")
    g.add_argument("--data", required=True, help="SFT data: LLaVA's conversation JSON (llava.train.sft_data writes it)")
    g.add_argument("--image-folder", default="", help="root of the rows' image paths ('': the current directory)")
    g.add_argument("--model-path", required=True, help="the LLaVA model to fine-tune (folder, hub id, or tiny)")
    g.add_argument("--out", required=True, help="checkpoint folder (LLaVA's LoRA layout), with the training logs")
    g.add_argument("--overwrite", action="store_true", help="write over a checkpoint already in --out")
    g.add_argument("--conv-mode", default=None, help="chat template (None: the model's; vicuna_v1 for LLaVA-1.5)")
    g.add_argument("--image-aspect-ratio", default=None, choices=ASPECT_RATIOS,
                   help="image preprocessing (None: the model's, pad for LLaVA-1.5; what inference uses)")
    g.add_argument("--max-length", type=int, default=None,
                   help="tokens per row, longer rows are cut (None: the model's context length, 2048 for LLaVA-1.5)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=d["lora_r"], help="rank (LLaVA-1.5's)")
    g.add_argument("--lora-alpha", type=int, default=d["lora_alpha"], help="alpha (LLaVA-1.5's)")
    g.add_argument("--lora-dropout", type=float, default=d["lora_dropout"], help="dropout (LLaVA-1.5's)")
    g.add_argument("--target-modules", default="",
                   help="comma-separated linear layers of the language model to adapt, e.g. q_proj,v_proj "
                        "('': all of them, as LLaVA)")
    g.add_argument("--tune-projector", action="store_true", help="also train the projector (at --projector-lr)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=d["max_steps"], help="optimizer steps (-1: --epochs over the data)")
    g.add_argument("--epochs", type=float, default=d["epochs"], help="epochs when --max-steps is not set")
    g.add_argument("--lr", type=float, default=d["lr"], help="learning rate of the LoRA weights")
    g.add_argument("--projector-lr", type=float, default=d["projector_lr"],
                   help="learning rate of the projector with --tune-projector (LLaVA's mm_projector_lr)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="rows per device and step")
    g.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="gradient accumulation steps")
    g.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"], help="share of the steps warming up")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay")
    g.add_argument("--lr-scheduler", default=d["lr_scheduler"], choices=SCHEDULERS, help="learning-rate schedule")
    g.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast (GPUs with bf16)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed of the LoRA init, dropout and shuffling")
    g.add_argument("--logging-steps", type=int, default=d["logging_steps"], help="log the loss every N steps")
    g.add_argument("--dataloader-workers", type=int, default=d["dataloader_workers"], help="data loading processes")
    g.add_argument("-v", "--verbose", action="count", default=0, help="-v: debug logs")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=Path(args.data), image_folder=Path(args.image_folder), model_path=args.model_path, out=Path(args.out),
        max_steps=args.max_steps, epochs=args.epochs, lr=args.lr, projector_lr=args.projector_lr,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()),
        tune_projector=args.tune_projector, batch_size=args.batch_size, grad_accum=args.grad_accum, bf16=args.bf16,
        seed=args.seed, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
        lr_scheduler=args.lr_scheduler, max_length=args.max_length, gradient_checkpointing=args.gradient_checkpointing,
        conv_mode=args.conv_mode, image_aspect_ratio=args.image_aspect_ratio, logging_steps=args.logging_steps,
        dataloader_workers=args.dataloader_workers, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0 if args.quiet else 1 + args.verbose)
    try:
        check_extra("train", "LoRA fine-tuning", ("peft",))  # before a model is loaded
        result = train(config_from_args(args))
    except ECSOError as exc:
        logger.error("%s", exc)
        return 2
    print(json.dumps({"out": str(result.out), "steps": result.steps, "rows": result.rows,
                      "loss_first": result.losses[0] if result.losses else None,
                      "loss_last": result.losses[-1] if result.losses else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
