"""refusal_lightning: does a chat model keep refusing after harmful fine-tuning constrained orthogonal to its
refusal direction? The parts live in subpackages (``train``, ``defences``, ``models``, ``serving``,
``evaluation``, ``hub``, ``experiment``); ``cli`` is the command line above them all."""

from refusal_lightning import legacy

__version__ = "0.1.0"

legacy.install()  # old flat module paths (``refusal_lightning.model``, ...) still import, with a warning
