"""distill_mixins.checkpointer: the dual-network checkpointer (installed from top-level checkpointer/).

The checkpointer lands with its own issue; ``model.state_dict()`` already never holds the teacher.
"""
