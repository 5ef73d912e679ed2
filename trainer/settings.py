"""All training configuration in one typed object; CLI flags and GRAMREC_* environment variables fill it."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Task = Literal["kt", "nr"]
Strategy = Literal["e2e", "gram", "nofinetune", "nocontent"]

_PERIOD = re.compile(r"^(\d+(?:\.\d+)?)([se])$")


class Period(BaseModel):
    """How often multi-step GRAM regresses the encoder: every N steps ('10s') or fraction of an epoch ('0.5e')."""

    value: float
    unit: Literal["s", "e"]

    @classmethod
    def parse(cls, text: str) -> Period:
        match = _PERIOD.match(text.strip().lower())
        if not match:
            raise ValueError(f"period must look like '1s', '10s', '0.5e' or '1e', got {text!r}")
        value, unit = float(match.group(1)), match.group(2)
        if value <= 0 or (unit == "s" and value != int(value)):
            raise ValueError(f"period {text!r}: steps must be a positive integer, epochs a positive number")
        return cls(value=value, unit=unit)

    def steps(self, steps_per_epoch: int) -> int:
        if self.unit == "s":
            return int(self.value)
        return max(1, math.ceil(self.value * steps_per_epoch))

    @property
    def is_single_step(self) -> bool:
        return self.unit == "s" and self.value == 1

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"


class TrainSettings(BaseSettings):
    """Everything `gramrec train` needs. Defaults that depend on the task are filled in by `with_task_defaults`."""

    model_config = SettingsConfigDict(env_prefix="GRAMREC_TRAIN_", extra="forbid")

    task: Task
    data: Path
    strategy: Strategy = "gram"
    period: str = "1e"
    out: Path = Path("runs/latest")
    resume: Path | None = None
    init_from: Path | None = Field(
        None, description="warm start: begin from this checkpoint's encoder and head (fresh optimizers and epochs)"
    )

    # Content encoder
    encoder_dir: Path | None = Field(None, description="local Hugging Face model directory; default all-MiniLM-L6-v2")
    max_tokens: int | None = Field(None, ge=4, le=512, description="default: 128 (kt), 32 (nr)")
    pooling: Literal["mean", "attention"] | None = Field(None, description="default: mean (kt), attention (nr)")
    use_abstract: bool = False
    encoder_batch_size: int = Field(
        4096, ge=1, description="items per encoder forward; on a GPU the pass is launch-bound below ~10k tokens"
    )
    encoder_batch_tokens: int | None = Field(
        65536, ge=1, description="also cap tokens per encoder forward, so long texts stay within memory"
    )
    attention: Literal["auto", "packed", "padded"] = Field(
        "auto",
        description="encoder batch layout: packed = padding-free (varlen attention on CUDA); auto = packed "
        "on CUDA under bf16 autocast, padded elsewhere",
    )
    freeze_bottom_layers: int = Field(
        0,
        ge=0,
        description="freeze the embeddings and this many bottom encoder layers and cache their outputs for "
        "all items once (IISAN-style); re-encodes and regressions then run only the top layers",
    )
    encoder_memory_gib: float | None = Field(
        None,
        gt=0,
        description="GPU memory (GiB) the encoder's calls may take with the fixed part (weights, gradients, Adam "
        "moments, item tables): the token caps of every inference encode and regression micro-batch are chosen "
        "to fit it (trainer/memory_budget.py), never above --encoder-batch-tokens; a budget that cannot hold the "
        "fixed part stops the run. E2E and GRAM-1S keep a whole step's graph, so it bounds only their inference "
        "encodes. Unset: the fixed caps",
    )
    # Multi-step GRAM (trainer/strategies.py GramMultiStep, trainer/regression.py)
    table_lr: float | None = Field(
        None,
        gt=0,
        description="multi-step GRAM: SGD step of the item table on the gradient of the loss summed over "
        "the batch's users (1 is the paper's Eq. 8 with lr 1); default: 16 (kt), 0.25 (nr), measured (BENCHMARKS.md §1)",
    )
    regress_lr: float | None = Field(
        None,
        gt=0,
        description="multi-step GRAM: learning rate of the regression's "
        "encoder optimizer (its own, no warm-up); default: 3e-4 (kt), 1e-4 (nr), measured",
    )
    regress_batch_size: int = Field(256, ge=1, description="multi-step GRAM: items per regression optimizer step")
    regress_fit: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="multi-step GRAM: a regression passes over the "
        "touched rows until its pseudo-loss has fallen by this fraction",
    )
    regress_max_passes: int = Field(
        4,
        ge=1,
        description="multi-step GRAM: most passes of one regression (1: the paper's one pass; 4 fitted KT's rows 5x "
        "closer and gained 1.7 AUC points more, measured: BENCHMARKS.md §1)",
    )
    regress_backtrack: bool = Field(
        True,
        description="multi-step GRAM: undo a regression pass that raised the "
        "pseudo-loss and retry it at a quarter of the learning rate",
    )
    regress_line_search: bool = Field(
        True,
        description="multi-step GRAM: a regression pass that raised the pseudo-loss is rescued at the length along "
        "its parameter move that the check rows ask for (least squares), before it is undone",
    )
    regress_check_items: int = Field(
        4096,
        ge=0,
        description="multi-step GRAM: touched rows (a fixed random sample) on which each regression pass is measured "
        "in float32 to scale, keep or undo it; 0: all touched rows",
    )
    regress_max_s: float | None = Field(None, gt=0, description="multi-step GRAM: most seconds of one regression")

    # CF head and data
    hidden_dim: int = Field(128, ge=8, description="CF head width (KT: LSTM hidden size)")
    batch_size: int = Field(32, ge=1, description="CF batch: users (kt: answer windows, nr: clicks) per step")
    cf_lr_scaling: Literal["none", "sqrt", "linear"] = Field(
        "none",
        description="scale the CF head's learning rate (--lr-cf) with the CF batch, relative to "
        "--cf-lr-reference-batch: by sqrt(batch / reference) (Adam's rule) or batch / reference; under either rule "
        "the head's warm-up counts the same samples (--warmup-steps x reference / batch steps). --table-lr, a step "
        "on the loss summed over the batch, already scales linearly and is left alone (README)",
    )
    cf_lr_reference_batch: int = Field(
        32, ge=1, description="the CF batch at which --lr-cf and --warmup-steps were tuned (cf_lr_scaling)"
    )
    max_seq_len: int = Field(100, ge=2, description="kt: sequences are cut into windows of this many answers")
    history_len: int = Field(50, ge=1, description="nr: clicked news the user encoder sees")
    negatives: int = Field(4, ge=1, description="nr: non-clicked candidates per click")
    cold_item_frac: float = Field(0.1, ge=0.0, lt=1.0, description="kt: items held out of training entirely")

    # Optimisation
    epochs: int = Field(5, ge=1)
    optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="for CF head and encoder (Adam with warm-up by default)"
    )
    lr_cf: float = Field(1e-3, gt=0)
    lr_encoder: float = Field(3e-5, gt=0)
    warmup_steps: int = Field(50, ge=0)
    patience: int = Field(2, ge=1, description="epochs without validation improvement before stopping")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cut epochs short (benchmarks)")
    time_budget_s: float | None = Field(None, gt=0, description="stop training after this many seconds")
    seed: int = 0

    cf_step: Literal["auto", "eager", "graphed"] = Field(
        "auto",
        description="CF step: graphed = batches padded to a few bucketed shapes and the head's forward, backward "
        "and optimizer step (with multi-step GRAM's table gather and update) replayed as CUDA graphs (on a CPU "
        "the same padded step runs eagerly); eager = the reference step; auto = graphed on one GPU, else eager",
    )
    encoder_step: Literal["auto", "eager", "graphed"] = Field(
        "auto",
        description="the encoder's training calls on padded (short-text) batches: graphed = captured once per "
        "(rows, width) shape as CUDA graphs and replayed (multi-step GRAM's regression: forward, pseudo-loss and "
        "backward; E2E and GRAM-1S: the step's forward, and its backward when the CF loss reaches it; on a CPU the "
        "same padded calls run eagerly); eager = the reference calls; auto = the regression's calls graphed on a GPU "
        "(measured: 2.5-3.6x faster regressions), the rest eager",
    )
    device: str = "auto"
    progress: bool = True

    @field_validator("period")
    @classmethod
    def _period_parses(cls, value: str) -> str:
        Period.parse(value)
        return value

    @model_validator(mode="after")
    def _fill_task_defaults(self) -> TrainSettings:
        if self.max_tokens is None:
            self.max_tokens = 128 if self.task == "kt" else 32
        if self.pooling is None:
            self.pooling = "mean" if self.task == "kt" else "attention"
        if self.table_lr is None:
            self.table_lr = 16.0 if self.task == "kt" else 0.25
        if self.regress_lr is None:
            self.regress_lr = 3e-4 if self.task == "kt" else 1e-4
        return self

    @property
    def parsed_period(self) -> Period:
        return Period.parse(self.period)

    @property
    def cf_lr_factor(self) -> float:
        """How much larger the CF head's learning rate is than --lr-cf at this CF batch (1 at the reference)."""
        ratio = self.batch_size / self.cf_lr_reference_batch
        return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[self.cf_lr_scaling]

    @property
    def cf_lr(self) -> float:
        """The CF head's learning rate after warm-up."""
        return self.lr_cf * self.cf_lr_factor

    @property
    def cf_warmup_steps(self) -> int:
        """The CF head's warm-up in steps: under a scaling rule it spans the samples --warmup-steps spans at the
        reference batch (a batch 16x larger warms up in 16x fewer steps), rounded up."""
        if self.cf_lr_scaling == "none":
            return self.warmup_steps
        return math.ceil(self.warmup_steps * self.cf_lr_reference_batch / self.batch_size)

    @property
    def label(self) -> str:
        """Short name for reports: e2e, gram-1s, gram-0.5e, nofinetune, nocontent."""
        return f"gram-{self.parsed_period}" if self.strategy == "gram" else self.strategy
