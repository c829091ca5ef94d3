"""`python -m recforge.train ...` = `recforge train ...`; the form torchrun launches:

    torchrun --standalone --nproc_per_node=2 -m recforge.train --config configs/quickstart.yaml
"""

from recforge.cli import app


def main() -> None:
    import sys

    app(["train", *sys.argv[1:]], prog_name="recforge.train")


if __name__ == "__main__":
    main()
