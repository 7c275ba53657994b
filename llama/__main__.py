"""`python -m llama ...`: the `codellama` command."""

from llama.commands import entry_point

if __name__ == "__main__":
    entry_point()
