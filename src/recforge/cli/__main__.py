"""`python -m recforge.cli ...` = `recforge ...` (the form tests and the simulator use without a venv script)."""

from recforge.cli import main

if __name__ == "__main__":
    main()
