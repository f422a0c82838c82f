"""`python -m qwen_runner` runs the CLI."""

from qwen_runner.cli import main

if __name__ == "__main__":
    main()
