"""``python -m refusal_lightning``."""

from refusal_lightning.cli import main

if __name__ == "__main__":
    main()
