"""Checkpoints as safetensors + JSON (never pickle): self-contained and resumable.

Layout of a checkpoint directory:
    config.json            settings, encoder facts, progress (epoch, step, best metric)
    encoder/               the fine-tuned backbone and its tokenizer, a plain Hugging Face model directory
    model.safetensors      pooling, CF head and strategy state (item table, id embeddings, ...)
    optimizer.safetensors  optimizer moments (resumable checkpoints only); their hyper-parameters in config.json
    items.json             item ids and texts, in item-index order
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from gramrec.models.content_encoder import ContentEncoder
from gramrec.service.errors import GramrecError
from gramrec.trainer.items import ItemCatalog
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "gramrec-checkpoint/1"


@dataclass
class CheckpointMeta:
    settings: dict
    epoch: int
    global_step: int
    best_metric: float | None
    val_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


def _flat_optimizer_state(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for param_id, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"{name}.{param_id}.{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def _nested_optimizer_state(name: str, tensors: dict[str, torch.Tensor], groups: dict) -> dict:
    state: dict[int, dict] = {}
    prefix = f"{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            param_id, slot = key[len(prefix) :].split(".", 1)
            state.setdefault(int(param_id), {})[slot] = value
    return {"state": state, "param_groups": groups["param_groups"]}


def save_checkpoint(
    path: Path,
    meta: CheckpointMeta,
    encoder: ContentEncoder,
    tokenizer,
    head: nn.Module,
    items: ItemCatalog,
    strategy_tensors: dict[str, torch.Tensor],
    optimizers: dict | None = None,
    loop_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Writes to a temporary sibling, then renames, so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    encoder.backbone.save_pretrained(tmp / "encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "encoder")
    tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
    tensors |= {f"encoder.{k}": v for k, v in encoder.state_dict().items() if not k.startswith("backbone.")}
    tensors |= {f"strategy.{k}": v for k, v in strategy_tensors.items()}
    tensors |= {f"loop.{k}": v for k, v in (loop_tensors or {}).items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors")
    config = {
        "format": FORMAT,
        "settings": meta.settings,
        "encoder": {"pooling": encoder.pooling, "dim": encoder.dim},
        "epoch": meta.epoch,
        "global_step": meta.global_step,
        "best_metric": meta.best_metric,
        "val_metrics": meta.val_metrics,
        "history": meta.history,
        "num_items": len(items),
    }
    if optimizers:
        opt_tensors, opt_json = {}, {}
        for name, (optimizer, scheduler) in optimizers.items():
            flat, groups = _flat_optimizer_state(name, optimizer)
            opt_tensors |= flat
            opt_json[name] = groups | {"scheduler": scheduler.state_dict()}
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        config["optimizers"] = opt_json
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (tmp / "items.json").write_text(json.dumps({"ids": items.ids, "texts": items.texts}))
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


class CheckpointError(GramrecError, ValueError):
    pass


def read_config(path: Path) -> dict:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: not a gramrec checkpoint (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: invalid JSON: {exc}") from exc
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{config_file}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def read_items(path: Path) -> ItemCatalog:
    data = json.loads((Path(path) / "items.json").read_text())
    return ItemCatalog(ids=data["ids"], texts=data["texts"])


def load_weights(path: Path, encoder: ContentEncoder, head: nn.Module) -> dict[str, torch.Tensor]:
    """Loads pooling and head weights in place; returns the strategy tensors (and loop state under 'loop.')."""
    tensors = load_file(str(Path(path) / "model.safetensors"))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    head.load_state_dict(part("head."))
    encoder.load_state_dict(part("encoder."), strict=False)  # backbone comes from encoder/
    return part("strategy.") | {f"loop.{k}": v for k, v in part("loop.").items()}


def load_optimizers(path: Path, config: dict, optimizers: dict) -> None:
    tensors = load_file(str(Path(path) / "optimizer.safetensors"))
    for name, (optimizer, scheduler) in optimizers.items():
        saved = config["optimizers"][name]
        optimizer.load_state_dict(_nested_optimizer_state(name, tensors, saved))
        scheduler.load_state_dict(saved["scheduler"])


@dataclass
class TrainedModel:
    """A checkpoint loaded for inference: evaluation, export, serving."""

    config: dict
    encoder: ContentEncoder
    tokenizer: object
    head: nn.Module
    items: ItemCatalog
    strategy_tensors: dict[str, torch.Tensor]

    @property
    def task(self) -> str:
        return self.config["settings"]["task"]

    @property
    def strategy(self) -> str:
        return self.config["settings"]["strategy"]

    @property
    def max_tokens(self) -> int:
        return int(self.config["settings"]["max_tokens"])


def load_trained_model(path: Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Loads encoder, head and items of a checkpoint, in eval mode."""
    from gramrec.models.content_encoder import load_tokenizer
    from gramrec.models.heads import build_head

    path = Path(path)
    config = read_config(path)
    settings = config["settings"]
    encoder = ContentEncoder.from_pretrained(path / "encoder", pooling=config["encoder"]["pooling"])
    head = build_head(settings["task"], encoder.dim, settings["hidden_dim"])
    strategy_tensors = load_weights(path, encoder, head)
    return TrainedModel(
        config=config,
        encoder=encoder.to(device).eval(),
        tokenizer=load_tokenizer(path / "encoder"),
        head=head.to(device).eval(),
        items=read_items(path),
        strategy_tensors=strategy_tensors,
    )
