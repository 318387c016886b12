"""The defences: plain-torch math on LoRA factors, and the commands that build what it needs.

- ``lowrank``: inner products, norms and the SVD of ``B A`` from the factors (never materialised).
- ``projection``: per-module directions and the three projection modes (``lora_param``,
  ``delta_weight``, ``subspace``) on tensors; ``ProjectionConfig``.
- ``projector``: applies a projection to a PEFT model's gradients or updates and measures what it did.
- ``directions``: the ``directions`` command (refusal adapter -> directions file) and its checks.
- ``alignment``: the alignment matrix ``C`` (and its projectors) that AsFT and Safe LoRA share.
- ``asft``: the AsFT loss term that anchors the attack's update to the alignment subspace.
- ``safe_lora``: the ``safe-lora`` command, a post-hoc projection of an attack adapter.
"""
