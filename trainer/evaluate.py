"""`gramrec evaluate`: metrics of a checkpoint on a split of a dataset (the data it was trained on, or another)."""

from __future__ import annotations

from pathlib import Path

from gramrec.trainer.checkpoint import (
    CheckpointError,
    load_weights,
    read_config,
    read_items,
)
from gramrec.trainer.explicit_settings import explicit_train_settings
from gramrec.trainer.split_file import evaluation_only
from gramrec.trainer.train import build_run, evaluate, restore


def evaluate_checkpoint(checkpoint: Path, data: Path, split: str = "test", device: str = "auto") -> dict:
    """Rebuilds the run from the checkpoint's own settings, pointed at `data`, and evaluates one split.

    Item-indexed state (the multi-step GRAM table, NoContent's id embeddings) only means something for the
    same item catalog, so a different catalog is refused for NoContent and re-encoded from text otherwise.
    """
    config = read_config(checkpoint)
    saved = config["settings"] | {"data": str(data), "device": device, "resume": None, "progress": False}
    settings = explicit_train_settings(**saved)  # the checkpoint's settings, not the environment's
    with evaluation_only():  # a test-only data set: no training part, MIND without times (split.json decides)
        run = build_run(settings, encoder_dir=Path(checkpoint) / "encoder")
    same_items = read_items(checkpoint).ids == run.task.items.ids
    if same_items:
        restore(run, checkpoint, with_optimizers=False)
    elif settings.strategy == "nocontent":
        raise CheckpointError(f"{checkpoint}: a NoContent model only knows the items it was trained on")
    else:
        load_weights(checkpoint, run.encoder, run.head)  # the strategy's item state is rebuilt from the new catalog
    return {"checkpoint": str(checkpoint), "split": split, "strategy": settings.label, "metrics": evaluate(run, split)}
