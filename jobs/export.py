"""`radiag export` as a Ray job (see jobs/__init__.py); `--help` lists its options."""

from jobs import run_command

if __name__ == "__main__":
    run_command("export")
