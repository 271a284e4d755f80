"""Packaging: trainer/ and checkpointer/ install only under the distill_mixins namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import distill_mixins.checkpointer
import distill_mixins.trainer

import distill_mixins

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_trainer_and_checkpointer_into_the_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
        + [str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("distill_mixins-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"distill_mixins"}
    assert "distill_mixins/trainer/__init__.py" in names
    assert "distill_mixins/checkpointer/__init__.py" in names
    assert "distill_mixins/testing/gmm.py" in names
    assert "distill_mixins/toy/weights/toy_teacher.safetensors" in names  # the shipped toy teacher
    assert "distill_mixins/toy/weights/toy_teacher_eval.safetensors.xz" in names  # its held-out samples
    assert "distill_mixins/toy/weights/toy_dit_teacher.safetensors" in names  # the causal pipeline's teacher
    assert "distill_mixins/toy/weights/toy_dit_teacher_eval.safetensors.xz" in names  # its held-out samples
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "distill-mixins = distill_mixins.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_public_names():
    for name in ("DistillationCoreMixin", "TrigFlowMixin", "DistillConfig", "DiffusionHost"):
        assert hasattr(distill_mixins, name), name
    assert Path(distill_mixins.trainer.__file__).parent.name == "trainer"
    assert Path(distill_mixins.checkpointer.__file__).parent.name == "checkpointer"
