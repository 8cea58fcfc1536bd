#!/usr/bin/env bash
# `make demo`: real Fashion-MNIST -> shards -> SimCLR pretraining (time-budgeted to fit the
# 15-minute demo on a 2-core CPU) -> backbone registered in MLflow as an MLflow model -> kNN top-1
# on the test set. Every step is the product's own CLI; rerunning resumes the prep and starts a fresh
# pretraining. The run goes to MLflow's store by the usual rule: $MLFLOW_TRACKING_URI if set, else
# runs/mlflow.db of this checkout, beside every other run started here (docs/downstream.md).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
FOUNDRY="$VENV/bin/foundry"
CONFIG=${DEMO_CONFIG:-configs/simclr_resnet18_fmnist.yaml}
DATA=${DEMO_DATA:-data/fashion-mnist}
OUTPUT=${DEMO_OUTPUT:-runs/demo}
# Minutes of training; the rest of the 15 (prep 0.5 on a first run, start-up, export, kNN over
# 70,000 images at 40 px) takes ~1.5-2.
BUDGET_MIN=${DEMO_BUDGET_MIN:-12}
export MLFLOW_DISABLE_TELEMETRY=true

start=$SECONDS
echo "== 1/2 shards: Fashion-MNIST (Debian dataset-fashion-mnist) -> $DATA"
"$FOUNDRY" prep fashion-mnist "$DATA"

echo "== 2/2 pretrain + export + register + kNN: $CONFIG"
# A fresh run each time (train.resume=never); the time budget, not max_steps, sets the length.
"$FOUNDRY" pretrain "$CONFIG" "output_dir=$OUTPUT" "data.train=$DATA/train" \
  "data.eval_train=$DATA/train" "data.eval_test=$DATA/test" train.resume=never \
  "train.budget_minutes=$BUDGET_MIN" train.max_steps=1000000 "$@"

echo "demo finished in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s"
