"""distill_mixins.trainer: the dedicated distillation trainer (installed from top-level trainer/).

The trainer lands with its own issue; until then, drive a composed model with a plain loop:
``out, loss = model.training_step(batch, it); loss.backward(); model.optimizer_step(it)``.
"""
