"""python -m bn_triton check [--device cpu|cuda]"""
import argparse
import sys

from bn_triton.dispatch import rerun_with_interpreter_if_no_gpu


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_triton")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="run the correctness matrix and print a table")
    check.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args()
    rerun_with_interpreter_if_no_gpu("bn_triton", sys.argv[1:])
    from bn_triton import check as check_module

    return check_module.main(args.device)


if __name__ == "__main__":
    sys.exit(main())
