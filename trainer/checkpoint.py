"""Checkpoints as safetensors + JSON (never pickle): self-contained and resumable.

Layout of a checkpoint directory:
    config.json            settings, the model's config ("model": encoder pooling, head kind and widths, see
                           models/configs.py; the model is rebuilt from it), progress (epoch, step, best metric)
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
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gramrec.models.configs import EncoderConfig, HeadConfig, head_config_from_dict
from gramrec.models.content_encoder import ContentEncoder
from gramrec.service.errors import GramrecError
from gramrec.trainer.items import ItemCatalog

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
    # The graphed CF step holds learning rates in device tensors; the JSON keeps their values.
    groups = [{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups}


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
        "model": model_config(encoder, head),
        "epoch": meta.epoch,
        "global_step": meta.global_step,
        "best_metric": meta.best_metric,
        "val_metrics": meta.val_metrics,
        "history": meta.history,
        "num_items": len(items),
    }
    if optimizers:
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_json: dict[str, dict] = {}
        for name, (optimizer, scheduler) in optimizers.items():
            flat, groups = _flat_optimizer_state(name, optimizer)
            opt_tensors |= flat
            opt_json[name] = groups | {"scheduler": scheduler.state_dict()}
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        config["optimizers"] = opt_json
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    listing: dict = {"ids": items.ids, "texts": items.texts}
    if items.metadata is not None:
        listing["metadata"] = items.metadata
    (tmp / "items.json").write_text(json.dumps(listing))
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


def model_config(encoder: ContentEncoder, head: nn.Module) -> dict:
    """{"encoder": EncoderConfig, "head": its head config}, as JSON; a head without a config cannot be saved."""
    head_config = getattr(head, "config", None)
    if head_config is None:
        raise ValueError(f"{type(head).__name__} has no config (models/configs.py); it cannot be checkpointed")
    return {"encoder": encoder.config.to_dict(), "head": head_config.to_dict()}


def saved_model_config(path: Path, config: dict) -> tuple[EncoderConfig, HeadConfig]:
    """The checkpoint's model config; a checkpoint written before model configs were saved is refused."""
    saved = config.get("model")
    if not isinstance(saved, dict) or "encoder" not in saved or "head" not in saved:
        raise CheckpointError(
            f"{path}: this checkpoint has no model config (it was written by an older gramrec, which did not save "
            "the encoder pooling and head widths); its weights cannot be loaded safely. Train it again."
        )
    try:
        return EncoderConfig.from_dict(saved["encoder"]), head_config_from_dict(saved["head"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model config in config.json: {exc}") from None


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
    return ItemCatalog(ids=data["ids"], texts=data["texts"], metadata=data.get("metadata"))


def load_weights(path: Path, encoder: ContentEncoder, head: nn.Module) -> dict[str, torch.Tensor]:
    """Loads pooling and head weights in place; returns the strategy tensors (and loop state under 'loop.').

    The models given must be the ones the checkpoint's model config describes (else CheckpointError): a head
    with another number of attention heads has the same weight shapes, and would load silently otherwise.
    """
    saved_encoder, saved_head = saved_model_config(Path(path), read_config(path))
    built_head = getattr(head, "config", None)
    if saved_encoder != encoder.config or saved_head != built_head:
        raise CheckpointError(
            f"{path}: the checkpoint's model ({saved_encoder}, {saved_head}) differs from the one built to load it "
            f"into ({encoder.config}, {built_head})"
        )
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
    tokenizer: Any  # a Hugging Face tokenizer
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
    from gramrec.models.heads import head_from_config

    path = Path(path)
    config = read_config(path)
    encoder_config, head_config = saved_model_config(path, config)
    encoder = ContentEncoder.from_pretrained(
        path / "encoder", pooling=encoder_config.pooling, attention_dim=encoder_config.attention_dim
    )
    head = head_from_config(head_config)
    strategy_tensors = load_weights(path, encoder, head)
    return TrainedModel(
        config=config,
        encoder=encoder.to(device).eval(),
        tokenizer=load_tokenizer(path / "encoder"),
        head=head.to(device).eval(),
        items=read_items(path),
        strategy_tensors=strategy_tensors,
    )
