"""`python -m recforge.train ...` = `recforge train ...`; the form torchrun launches:

    torchrun --standalone --nproc_per_node=2 -m recforge.train --config configs/quickstart.yaml
"""

from recforge.cli import app


def main() -> None:
    import faulthandler
    import sys

    # A rank that dies of a signal (SIGSEGV in a native kernel, SIGABRT) prints its Python stack to
    # stderr before torchrun's summary, instead of only "exitcode -11".
    faulthandler.enable()
    app(["train", *sys.argv[1:]], prog_name="recforge.train")


if __name__ == "__main__":
    main()
