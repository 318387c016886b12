"""The training core: HarmfulQA pairs in, a LoRA adapter out.

- ``harmfulqa``: records, the reply-selection rule and the split by question id (duplicates grouped).
- ``data_report``: pairs per thread of a HarmfulQA file and the share the pairing rule changes.
- ``refusal_markers``: the marker list that selects training replies, and marker matching.
- ``datamodule``: ``HarmfulQADataModule``, tokenisation with the chat template, the length-grouped sampler.
- ``module``: ``RefusalLoRAModule``, the LightningModule (LoRA, projection, AsFT, saving the adapter).
- ``retain``, ``retain_answers``, ``retain_loss``: the retain term of the refusal fit (its settings and
  prompts, the base model's cached answers, its KL to the base).
- ``chunked_loss``: the next-token loss without materialising the full logits.
- ``inputs``: checks of a fit's model, adapters and directions before anything loads.
- ``progress``: the step / max_steps progress bar.
- ``fit``: ``fit``/``validate``/``test``/``predict`` through LightningCLI (the CLI and the pipeline call it).
"""
