"""The `kvtier` command line (also `python -m kvtier`): demo, config, model, inspect, server, controller.

A bad configuration (KVTIER_* or LMCACHE_* variables, a config file) or another kvtier error is
reported as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvtier.errors import KVTierError
from kvtier.version import __version__

DESCRIPTION = """kvtier stores the KV cache of LLM serving engines outside GPU memory and reuses it,
so a prompt whose prefix was seen before is not prefilled again."""

EPILOG = """examples:
  kvtier demo                       long-document QA on the built-in model, with and without the cache
  kvtier config                     print the effective configuration (YAML, KVTIER_* and LMCACHE_*)
  kvtier model export               write the built-in model as a plain Hugging Face folder
  kvtier inspect ~/.cache/kvtier/demo-disk --verify
                                    count and check the objects of a disk tier
  kvtier server --memory 8GiB --disk-path /var/cache/kvtier
                                    run a kvtier server (clients use remote url kvtier://127.0.0.1:7480)
  kvtier controller --port 9000     run the cluster controller (instances set cluster.controller_url)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="long-document QA: TTFT with and without kvtier, then a restart",
                          description="Answer questions about a ~6,000-token public-domain document, each "
                          "once without and once with kvtier; compare TTFT and answers; then show a new "
                          "process hitting the disk tier.")  # fmt: skip
    demo.add_argument("--model", help="local folder or hub id (default: the built-in SmolLM2-135M-Instruct)")
    demo.add_argument("--engine", choices=["auto", "hf", "vllm"], default="auto",
                      help="serving engine (default: vllm when it is installed, else hf transformers)")  # fmt: skip
    demo.add_argument("--disk-path", help="disk tier directory (default: ~/.cache/kvtier/demo-disk)")
    demo.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per answer (default: 32)")
    demo.add_argument("--questions", type=int, default=3, choices=[1, 2, 3], help="how many questions (default: 3)")
    demo.add_argument("--keep-cache", action="store_true", help="do not clear the disk tier first")
    demo.add_argument("--no-restart", action="store_true", help="skip the second (restarted) process")
    demo.add_argument("--restart-check", help=argparse.SUPPRESS)
    demo.add_argument("--vllm-phase", help=argparse.SUPPRESS)

    sub.add_parser("config", help="print the effective configuration as YAML",
                   description="Print the configuration kvtier would use here, after reading KVTIER_CONFIG, "
                   "KVTIER_* variables and their LMCache equivalents.")  # fmt: skip

    model = sub.add_parser("model", help="the built-in model", description="Manage the built-in model.")
    model_sub = model.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = model_sub.add_parser("export", help="write it as a plain Hugging Face folder and print the path")
    export.add_argument("--dest", help="target folder (default: ~/.cache/kvtier/models/smollm2-135m-instruct-*)")

    inspect = sub.add_parser("inspect", help="summarize (and verify) the objects of a disk tier",
                             description="Count the objects of a disk tier directory per namespace; with "
                             "--verify, check every header and checksum.")  # fmt: skip
    inspect.add_argument("path", help="disk tier directory")
    inspect.add_argument("--verify", action="store_true", help="read every object and check it")
    inspect.add_argument("--delete-corrupt", action="store_true", help="with --verify, delete corrupt objects")

    server = sub.add_parser("server", help="run a kvtier cache server (remote tier for kvtier:// URLs)",
                            description="Serve KV cache objects to kvtier clients over TCP (protocol: "
                            "docs/protocol.md), from a memory budget and an optional write-through disk. "
                            "SIGINT or SIGTERM finishes requests in flight, then stops.")  # fmt: skip
    from kvtier.server.main import add_arguments

    add_arguments(server)

    controller = sub.add_parser("controller", help="run the cluster controller (which instance holds which KV)",
                                description="Track which instance holds which chunks (instances register, "
                                "heartbeat and send KV events), and answer lookups: the cached prefix of a "
                                "prompt on every instance, and the best one to route it to. HTTP API: "
                                "docs/cluster.md.")  # fmt: skip
    from kvtier.cluster.controller import add_arguments as controller_arguments

    controller_arguments(controller)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `kvtier` command; its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KVTierError as exc:
        name = f"kvtier {args.command}" if args.command else "kvtier"
        print(f"{name}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _demo(args)
    if args.command == "config":
        import yaml

        from kvtier.config import Config

        print(yaml.safe_dump(Config.load().to_dict(), sort_keys=False), end="")
        return 0
    if args.command == "model":
        from kvtier.models import export_default_model

        print(export_default_model(args.dest))
        return 0
    if args.command == "inspect":
        from kvtier.inspect import inspect_disk

        return inspect_disk(args.path, verify=args.verify, delete_corrupt=args.delete_corrupt)
    if args.command == "server":
        from kvtier.server.main import run

        return run(args)
    if args.command == "controller":
        from kvtier.cluster.controller import run as run_controller

        return run_controller(args)
    build_parser().print_help()
    return 0


def _demo(args: argparse.Namespace) -> int:
    import importlib.util

    from kvtier.config import Config
    from kvtier.demo import hf_demo

    Config.load()  # a bad configuration stops here, before a model loads or a process starts

    if args.restart_check:
        return hf_demo.restart_check(args.restart_check)
    if args.vllm_phase:
        from kvtier.demo import vllm_demo

        return vllm_demo.phase(args.vllm_phase)
    opts = hf_demo.DemoOptions(
        model=args.model, disk_path=args.disk_path, max_new_tokens=args.max_new_tokens,
        questions=args.questions, keep_cache=args.keep_cache, restart=not args.no_restart,
    )  # fmt: skip
    engine = args.engine
    if engine == "auto":
        engine = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if engine == "vllm":
        from kvtier.demo import vllm_demo

        return vllm_demo.run(opts)
    return hf_demo.run(opts)


if __name__ == "__main__":
    sys.exit(main())
