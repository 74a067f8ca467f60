"""python -m bn_triton check [--device cpu|cuda]"""
import argparse
import os
import sys


def _reexec_with_interpreter() -> None:
    """Without a GPU the kernels run through Triton's interpreter, which Triton reads from
    TRITON_INTERPRET when it is imported; bn_triton is imported before this module runs, so
    the command starts itself again with the variable set."""
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "bn_triton", *sys.argv[1:]], env)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_triton")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="run the correctness matrix and print a table")
    check.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args()
    _reexec_with_interpreter()
    from bn_triton import check as check_module

    return check_module.main(args.device)


if __name__ == "__main__":
    sys.exit(main())
