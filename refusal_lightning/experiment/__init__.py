"""The experiment that chains the parts: stages, results and their controls.

- ``pipeline``: the ``pipeline`` command (refusal fit -> directions -> arms -> serve -> evaluate).
- ``arms``: the pipeline's rows as declared arms (fits of a shared attack config, post-hoc transforms).
- ``frontier``: the no-defence frontier and an arm's gain at matched red NLL, with a paired bootstrap.
- ``preflight``: the ``preflight`` command (what the real run needs, checked before any GPU time);
  ``memory_estimate`` its GPU memory per fit.
- ``results``: one ``results.json`` / ``results.md`` from the stages' outputs; ``results_plot`` its picture.
- ``heldout_nll``: held-out red and blue reply NLL of every evaluated model (did the attack learn?).
- ``judge_check``: the keyword judge's verdicts on held-out blue and red replies (what it can see).
- ``drift_null``: a benign LoRA's drift along ``dW_r`` beside the Gaussian chance level (the drift null).
"""
