"""Push adapter dirs to the Hugging Face Hub: the same command as ``python -m refusal_lightning push``.

    python scripts/push_to_hf.py --adapter refusal=artifacts/refusal_lora --adapter orth=artifacts/orth_lora \\
        --namespace my-org --private --dry_run

Options come from :func:`refusal_lightning.hub.push.push` (see ``--help``); parsing, the short forms
(repeated ``--adapter``, bare ``--dry_run``) and the one-line errors are the package CLI's own.
"""

from __future__ import annotations

import sys

from refusal_lightning.cli import main

if __name__ == "__main__":
    main(["push", *sys.argv[1:]])
