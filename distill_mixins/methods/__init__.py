"""Distillation methods, one per file (KD, DMD2, ... land with their issues)."""
