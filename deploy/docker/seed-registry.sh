#!/usr/bin/env bash
# Train the quickstart models and make them production in a registry: the DNN ranker ("ranker") and a
# two-tower retriever ("retrieval"), the pair `recforge serve` loads. key=value overrides go to every step.
#   recforge-seed-registry REGISTRY WORKDIR [key=value ...]
#   recforge-seed-registry s3://recforge/registry /data/quickstart train.epochs=1
# Used by the compose `train` job and the CI smoke test, so both exercise the same commands.
set -euo pipefail
usage="usage: recforge-seed-registry REGISTRY WORKDIR [key=value ...]"
registry=${1:?$usage}
workdir=${2:?$usage}
shift 2

recforge quickstart "workdir=$workdir" "$@"
recforge train "workdir=$workdir" "$@" model.name=two_tower "run_dir=$workdir/two_tower"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
for pair in ranker:run retrieval:two_tower; do
  model=${pair%%:*}
  run=${pair#*:}
  bundle="$workdir/bundles/$model-$stamp"
  recforge export --run "$workdir/$run" --out "$bundle"
  recforge registry publish "$model" "$bundle" --registry "$registry" --note "seeded from $workdir"
  recforge registry promote "$model" latest --registry "$registry" --reason "seeded from $workdir"
done
echo "seeded $registry: ranker and retrieval at production"
