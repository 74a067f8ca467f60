"""python -m bn_triton.experiments {mnist,lr-study,renorm} [--steps N] [--data DIR] [--out DIR]
[--seed S] [--device D]"""
import argparse
import sys

from bn_triton.dispatch import rerun_with_interpreter_if_no_gpu


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_triton.experiments",
                                     description="The paper's experiments on bn_triton's layers")
    commands = parser.add_subparsers(dest="experiment", required=True)
    for name, out, about in (("mnist", "results/mnist/", "§4.1, Figure 1: sigmoid MLP with and "
                              "without BN"),
                             ("lr-study", "results/lr-study/", "§4.2, Figures 2/3: BN with "
                              "higher learning rates, a small convolutional network"),
                             ("renorm", "results/renorm/", "Batch Renormalization (Ioffe "
                              "2017): BN and Batch Renorm on minibatches of 4 and on "
                              "non-i.i.d. minibatches")):
        command = commands.add_parser(name, help=about, description=about)
        command.add_argument("--steps", type=int, default=None,
                             help="training steps per network (default: the experiment's "
                                  "DEFAULT_STEPS, sized for a few minutes on a 2-core CPU)")
        command.add_argument("--data", metavar="DIR", default=None,
                             help="a folder with MNIST's four IDX files (plain or .gz); "
                                  "default: scikit-learn's bundled 8x8 digits")
        command.add_argument("--out", metavar="DIR", default=out, help=f"default: {out}")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--device", default=None,
                             help="cuda or cpu (default: cuda where there is a GPU)")
    args = parser.parse_args()
    rerun_with_interpreter_if_no_gpu("bn_triton.experiments", sys.argv[1:])
    if args.experiment == "mnist":
        from bn_triton.experiments import mnist as experiment
    elif args.experiment == "lr-study":
        from bn_triton.experiments import lr_study as experiment
    else:
        from bn_triton.experiments import renorm as experiment
    if args.steps is None:
        args.steps = experiment.DEFAULT_STEPS
    try:
        return experiment.main(args)
    except (FileNotFoundError, ValueError) as error:
        if args.data is None:
            raise
        # A missing or malformed IDX file under --data: say which, without a traceback.
        print(f"python -m bn_triton.experiments {args.experiment}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
