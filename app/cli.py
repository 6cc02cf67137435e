"""dit-sparse-demo: the Gradio demo, dense and block-sparse video side by side.

    dit-sparse-demo                                         # the shipped reference model, http://127.0.0.1:7860
    python -m dit_sparse.app --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --host 0.0.0.0 --port 8080

See docs/app.md.
"""

from __future__ import annotations

import argparse

from dit_sparse.eval.harness.settings import DTYPE_NAMES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-sparse-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="diffusers model id or local directory (default: the shipped reference model)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to serve on (default: {DEFAULT_HOST}, this machine only; 0.0.0.0 for every "
                             "interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--fps", type=int, default=16, help="frame rate of the videos (default: 16)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the short untimed dense and sparse calls made before serving (the first "
                             "request's timings then include one-time costs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("port", "threads", "fps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    import torch  # after the arguments are checked: --help and argument errors return at once

    from dit_sparse.eval.harness.models import load_model, pick_device, pick_dtype

    try:
        device = pick_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from .demo import DemoSession
    from .ui import build_demo

    try:
        model = load_model(args.model, device, pick_dtype(args.dtype, device))
        session = DemoSession(model, fps=args.fps)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    try:
        if args.warmup:
            print(f"warming up {model.name} (short untimed dense and sparse calls)")
            session.warm_up()
        build_demo(session).launch(server_name=args.host, server_port=args.port, share=args.share)
    finally:
        session.close()
    return 0
