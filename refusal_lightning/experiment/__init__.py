"""The experiment that chains the parts: stages, results and their controls.

- ``pipeline``: the ``pipeline`` command (refusal fit -> directions -> attacks -> serve -> evaluate).
- ``results``: one ``results.json`` / ``results.md`` from the stages' outputs; ``results_plot`` its picture.
- ``heldout_nll``: held-out red and blue reply NLL of every evaluated model (did the attack learn?).
- ``judge_check``: the keyword judge's verdicts on held-out blue and red replies (what it can see).
"""
