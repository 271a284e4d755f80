"""The same flow as ``run.sh`` through the Python API: ``python examples/self_forcing/run.py [TEACHER_WEIGHTS]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distill_mixins.trainer.pipeline import PIPELINE_STAGES, load_pipeline, run_pipeline

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # toy_pipeline.py: the factories pipeline.json names

if __name__ == "__main__":
    config = HERE / "pipeline.json"
    if len(sys.argv) > 1:
        data = json.loads(config.read_text())
        for stage in ("causal_kd", "self_forcing"):
            data[stage]["model_args"]["teacher_weights"] = sys.argv[1]
        config = Path("runs") / "example-self-forcing.json"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(data, indent=2))
    pipeline = load_pipeline(config)  # checks every field; errors name it
    for stage in PIPELINE_STAGES:  # or run_pipeline(pipeline) for all four
        run_pipeline(pipeline, stage)
