#!/usr/bin/env bash
# The causal pipeline on the toy domain: teacher ODE pairs -> CausalKD -> bridge -> Self-Forcing, one command per
# stage (each resumable and skipped when done; Ctrl-C and run again to resume).
#
#   bash examples/self_forcing/run.sh [TEACHER_WEIGHTS]
#
# TEACHER_WEIGHTS: the bidirectional toy transformer teacher (`distill-mixins toy-teacher --arch dit --out DIR`
# writes DIR/toy_dit_teacher.safetensors). Without it the teacher is untrained: the run checks the plumbing only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="$here/pipeline.json"
if [ $# -ge 1 ]; then  # the same config with the teacher's weights as every stage's model argument
  config="$(mktemp --suffix=.json)"
  python - "$here/pipeline.json" "$1" "$config" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
for stage in ("causal_kd", "self_forcing"):
    data[stage]["model_args"]["teacher_weights"] = sys.argv[2]
json.dump(data, open(sys.argv[3], "w"), indent=2)
PY
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"  # toy_pipeline.py: the factories pipeline.json names
for stage in ode-pairs causal-kd bridge self-forcing; do
  distill-mixins pipeline self-forcing --config "$config" --stage "$stage"
done
echo "students: runs/example-self-forcing/causal_kd/student.safetensors (CausalKD),"
echo "          runs/example-self-forcing/self_forcing/student.safetensors (Self-Forcing)"
