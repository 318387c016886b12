"""The Hugging Face Hub: ``push`` (the command) and ``model_card`` (the card, from ``model_card.md``)."""
