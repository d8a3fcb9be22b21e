"""`python -m fastcore_ai [info | demo | bench [--family F] [--device D] [--json PATH] [--quick]
[--sweep [--op OP] [--out DIR] [--list] | --sweep-report JSON]]`."""

import argparse
import json

import torch

from . import backends, bench, build_info


def print_info() -> None:
    print("fastcore_ai.build_info():")
    print(json.dumps(build_info(), indent=2))
    print("\nbackends (op, backend, dtypes, usable here):")
    for op, name, dtypes, usable in backends.describe():
        print(f"  {op:16s} {name:10s} {dtypes:40s} {usable}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastcore_ai")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print build_info() and the backend table")
    demo = sub.add_parser("demo", help="build info plus the benchmark tables of every family")
    demo.add_argument("--full", action="store_true", help="every benchmark shape (default: a quick subset)")
    run = sub.add_parser("bench", help="benchmark tables")
    run.add_argument(
        "--family",
        action="append",
        choices=sorted(bench.FAMILIES),
        help="repeatable; default: every family's main table",
    )
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    run.add_argument("--json", dest="json_path", help="also write the rows and build info as JSON")
    run.add_argument("--quick", action="store_true", help="a subset of shapes, shorter timing")
    run.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads for the run (default: torch's); with "
        "--sweep: the one thread count to sweep (default 1 and 2)",
    )
    bench.sweep.add_arguments(run)  # --sweep, --op, --out, --list, --sweep-report (docs/sweep.md)
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        print_info()
    elif args.command == "demo":
        print_info()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bench.main(bench.DEFAULT_FAMILIES, device, None, quick=not args.full)
    elif bench.sweep.wants_sweep(args):
        bench.sweep.main(args)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        bench.main(args.family or bench.DEFAULT_FAMILIES, args.device, args.json_path, args.quick)


if __name__ == "__main__":
    main()
