#!/bin/sh
# Trains one model from GRAMREC_TRAIN_* settings (GRAMREC_TRAIN_TASK and GRAMREC_TRAIN_DATA required), then exports its best
# checkpoint as a new immutable version under GRAMREC_ARTIFACTS_DIR. The API adopts it by itself when its task
# has no active version yet; otherwise activate it with POST /admin/models/{version}/activate.
set -eu
: "${GRAMREC_TRAIN_TASK:?set GRAMREC_TRAIN_TASK to kt or nr}"
: "${GRAMREC_TRAIN_DATA:?set GRAMREC_TRAIN_DATA to the training data folder}"
out="${GRAMREC_TRAIN_OUT:-/data/runs/latest}"
gramrec -v train
checkpoint="$out/best"
[ -d "$checkpoint" ] || checkpoint="$out/last"
gramrec export "$checkpoint" --out "${GRAMREC_ARTIFACTS_DIR:-/data/artifacts}"
