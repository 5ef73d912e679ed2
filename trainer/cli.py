"""The `gramrec` command: train, evaluate, export, serve, trainer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Collection
from pathlib import Path

from pydantic import BaseModel, ValidationError

from gramrec.service.errors import GramrecError
from gramrec.trainer.logs import configure_logging


def literal_choices(annotation) -> list[str]:
    """The allowed values of a Literal field (also inside Optional[...]); [] for other types."""
    import typing

    if typing.get_origin(annotation) is typing.Literal:
        return [str(value) for value in typing.get_args(annotation)]
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return literal_choices(arg)
    return []


# Help for settings whose field carries no description (the settings classes belong to their packages).
EXTRA_HELP = {
    "period": "how often multi-step GRAM regresses the encoder: N steps (1s, 10s) or a fraction of an epoch "
    "(0.5e, 1e); ignored by the other strategies",
    "data": "the data folder (see README, Data)",
}


def field_help(info, name: str = "") -> str:
    """The field's description, its choices and its default, e.g. "optimizer (choices: adam, sgd; default: adam)"."""
    from pydantic_core import PydanticUndefined

    parts = []
    choices = literal_choices(info.annotation)
    if choices:
        parts.append("choices: " + ", ".join(choices))
    if info.default_factory is not None:
        default = info.default_factory()
    else:
        default = info.default
    if default is PydanticUndefined:
        parts.append("required")
    else:
        parts.append(f"default: {'unset' if default is None else default}")
    text = (info.description or EXTRA_HELP.get(name, "")).replace("%", "%%")
    return f"{text} ({'; '.join(parts)})" if text else f"({'; '.join(parts)})"


def add_settings_arguments(
    parser: argparse.ArgumentParser, model: type[BaseModel], skip: Collection[str] = frozenset()
) -> None:
    """One --kebab-case flag per settings field; pydantic does all parsing and validation."""
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field_help(info, name)
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = literal_choices(info.annotation)
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            parser.add_argument(flag, dest=name, default=None, help=help_text, metavar=metavar)


def settings_from_args(model: type[BaseModel], args: argparse.Namespace, **extra):
    given = {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}
    try:
        return model(**(given | extra))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"gramrec: invalid settings: {problems}") from None


def _train(args: argparse.Namespace) -> None:
    from gramrec.trainer.settings import TrainSettings
    from gramrec.trainer.train import train

    report = train(settings_from_args(TrainSettings, args))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the same report
        summary = {k: v for k, v in report.items() if k not in ("history", "settings")}
        print(json.dumps(summary, indent=2, default=float))


def _evaluate(args: argparse.Namespace) -> None:
    from gramrec.trainer.evaluate import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(Path(args.checkpoint), Path(args.data), args.split, args.device), indent=2))


def _export(args: argparse.Namespace) -> None:
    from gramrec.trainer.export import export_checkpoint

    path = export_checkpoint(Path(args.checkpoint), Path(args.out), args.version, device=args.device)
    print(json.dumps({"version": path.name, "path": str(path)}, indent=2))


def _serve(args: argparse.Namespace) -> None:
    import logging

    import uvicorn

    from gramrec.service.settings import ServiceSettings
    from gramrec.trainer.bootstrap import start_in_background, tasks_without_versions

    settings = settings_from_args(ServiceSettings, args)
    if settings.bootstrap and tasks_without_versions(settings):
        start_in_background(settings)  # the server answers meanwhile: /healthz 200, /readyz 503 with progress
    url = f"http://{settings.host}:{settings.port}"
    logging.getLogger("gramrec.serve").info(
        f"gramrec serving on {url}: open {url}/docs, or try curl -s {url}/readyz",
        extra={"url": url, "docs": f"{url}/docs", "readyz": f"{url}/readyz", "workers": settings.workers},
    )
    level = "info" if args.verbose else "warning"
    if settings.workers > 1:  # each worker process builds its app (and settings, from the environment)
        uvicorn.run(
            "gramrec.service.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=level,
            access_log=False,
        )
        return
    from gramrec.service.app import create_app

    logging.getLogger("uvicorn.error").setLevel(level.upper())
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=level, access_log=False)


def _trainer(args: argparse.Namespace) -> None:
    from gramrec.trainer.retrain.settings import WorkerSettings
    from gramrec.trainer.retrain.worker import run_trainer, trainer_health

    settings = settings_from_args(WorkerSettings, args)
    if args.health:
        healthy, message = trainer_health(settings)
        print(message, file=sys.stdout if healthy else sys.stderr)
        raise SystemExit(0 if healthy else 1)
    run_trainer(settings)


def build_parser() -> argparse.ArgumentParser:
    from gramrec.trainer.settings import TrainSettings

    parser = argparse.ArgumentParser(prog="gramrec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress events (JSON lines) to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a content encoder + CF head")
    add_settings_arguments(train, TrainSettings)
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on a data split")
    evaluate.add_argument("checkpoint", help="a checkpoint folder (runs/kt/best)")
    evaluate.add_argument("--data", required=True, help="the data folder to evaluate on (required)")
    evaluate.add_argument(
        "--split", choices=["val", "test"], default="test", help="(choices: val, test; default: test)"
    )
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    evaluate.set_defaults(func=_evaluate)

    export = commands.add_parser("export", help="export a checkpoint to a new, immutable ONNX artifact version")
    export.add_argument("checkpoint", help="a checkpoint folder (runs/kt/best)")
    export.add_argument(
        "--out", required=True, help="artifacts root; the version is written to OUT/VERSION/ (required)"
    )
    export.add_argument("--version", default=None, help="(default: <task>-<UTC yyyymmddTHHMMSS>-<6 hex>)")
    export.add_argument(
        "--device", default="auto", help="device that encodes the item table: auto, cpu, cuda (default: auto)"
    )
    export.set_defaults(func=_export)

    serve = commands.add_parser("serve", help="serve the HTTP API (other settings: GRAMREC_* variables, REDIS_URL)")
    serve.add_argument("--host", default=None, help="(default: 127.0.0.1, or GRAMREC_HOST)")
    serve.add_argument("--port", default=None, help="(default: 8000, or GRAMREC_PORT)")
    serve.add_argument("--workers", default=None, help="uvicorn worker processes (default: 1, or GRAMREC_WORKERS)")
    serve.add_argument(
        "--bootstrap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train and export a small model for tasks that have none, while serving (default: on)",
    )
    serve.set_defaults(func=_serve)

    trainer = commands.add_parser(
        "trainer", help="run scheduled and requested retrains (settings: GRAMREC_RETRAIN__* variables, REDIS_URL)"
    )
    trainer.add_argument(
        "--health",
        action="store_true",
        help="exit 0 if a trainer on this host publishes its heartbeat in the store, else 1 (a container "
        "healthcheck); runs no trainer (default: off)",
    )
    trainer.set_defaults(func=_trainer)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    configure_logging(
        "INFO" if args.verbose else None, default="INFO" if args.command in ("serve", "trainer") else "WARNING"
    )
    try:
        args.func(args)
    except (GramrecError, ValueError, FileNotFoundError) as exc:  # domain errors name the file and the problem
        print(f"gramrec: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
