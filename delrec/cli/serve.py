"""`delrec serve`: an SR model or distilled student as an HTTP JSON service (`delrec.serving`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from delrec.config import Device, THREADS, above, at_least, between, check_fields, device_option, parse_command


@dataclass
class ServeArguments:
    model: str = field(metadata={"help": "An SR model or student folder (from `delrec sr train` or `student train`)."})
    data: str = field(metadata={"help": "The prepared dataset it was trained on: raw ids and titles of the answers."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(
        default=8000, metadata={"help": "TCP port to listen on.", "range": between(1, 65535, text="in 1..65535")}
    )
    device: Device = device_option("cpu", what="Where to score requests")
    num_threads: int = field(
        default=0,
        metadata={"help": "torch CPU threads for scoring; 0: the process's (OMP_NUM_THREADS, else one per free core).",
                  "range": THREADS},
    )
    max_batch_size: int = field(
        default=64, metadata={"help": "Most requests scored together when several are waiting (no timer: a lone "
                              "request is scored at once).", "range": at_least(1)}
    )
    max_history: int = field(
        default=1000, metadata={"help": "Longest request history accepted (the model reads its last max_length).",
                                "range": at_least(1)}
    )
    default_k: int = field(
        default=20, metadata={"help": "Items returned when a request gives no k (sr predict's topk).",
                              "range": at_least(1)}
    )
    max_body_bytes: int = field(
        default=1 << 20,
        metadata={"help": "Largest request body accepted; a larger one gets HTTP 413 before it is read (a 1000-item "
                  "history of 40-character ids is about 45 KB).", "range": at_least(1)},
    )
    read_timeout: float = field(
        default=10.0,
        metadata={"help": "Seconds a client has to send a whole request body; a slower one gets HTTP 408 and its "
                  "connection is closed.",
                  "range": above(0, text="a positive number of seconds")},
    )
    compiled: bool = field(
        default=False,
        metadata={"help": "Answer with the model's compiled top-default_k graph (`delrec sr compile`, ~0.1 ms a user "
                  "on CPU); requests with keep_history or a larger k use the eager model. The package is native code "
                  "that runs in this process, like a pickle: serve only folders you trust (a package whose SHA-256 "
                  "differs from the one recorded when it was compiled is refused; docs/security.md)."},
    )

    def __post_init__(self):
        check_fields(self)


def serve(argv, prog: str, description: str) -> int:
    (args,) = parse_command([ServeArguments], argv, prog, description)
    from delrec.errors import DelrecError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        from delrec.serving import SERVE_INSTALL

        raise DelrecError(f"delrec serve needs {exc.name}, which is not installed; {SERVE_INSTALL}") from None
    import torch

    from delrec.data.dataset import PreparedDataset
    from delrec.serving import Recommender, create_app, serve as run_server
    from delrec.sr import load_model
    from delrec.sr.compiled import CompiledTopK
    from delrec.device import resolve_device, torch_threads

    with torch_threads(args.num_threads):
        device = resolve_device(args.device)
        if args.compiled and torch.device(device).type != "cpu":
            raise DelrecError("--compiled serves on CPU (`delrec sr compile` builds for it); pass --device cpu")
        model = load_model(args.model, device)
        compiled = CompiledTopK.load(args.model, args.default_k) if args.compiled else None
        recommender = Recommender(model, PreparedDataset.load(args.data), args.max_history, args.default_k,
                                  args.model, compiled)
        info = {"model": Path(args.model).resolve().name, "data": Path(args.data).resolve().name}  # no absolute paths
        announce = (f"serving {args.model} ({model.model_type}, {model.num_items} items, "
                    f"{torch.get_num_threads()} torch thread(s)) on http://{args.host}:{args.port}  "
                    "(POST /recommend, GET /health; Ctrl-C to stop)")
        app = create_app(recommender, args.max_batch_size, info, announce, args.max_body_bytes, args.read_timeout)
        run_server(app, args.host, args.port)
    return 0
