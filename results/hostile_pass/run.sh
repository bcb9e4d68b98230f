#!/bin/bash
# The hostile pass of issue #27 (session 16): each command prints its last lines and its exit code.
# Run from the repository root: bash results/hostile_pass/run.sh > results/hostile_pass/output.txt
set -u
ROOT=$(pwd)
H=$(mktemp -d); cd $H
ROOT=$ROOT python - <<'PY'
import os, sys; sys.path.insert(0, os.environ["ROOT"])
from pathlib import Path
from tests.data_helpers import make_dataset, write_image, phantom
make_dataset(Path("ds"), n=3)
make_dataset(Path("ign"), n=3, labels={"background": 0, "liver": 1, "spleen": 2, "ignore": 3})
import numpy as np
image, label = phantom(0)
write_image(Path("sheared/s_0000.mha"), image, direction=(1.0, 0.2, 0, 0, 1.0, 0, 0, 0, 1.0))
write_image(Path("shift.nii.gz"), label, origin=(51.0, 0, 0))
PY
cat > exp.yaml <<Y
model: {preset: tiny, img_size: 64, embed_dim: 16, num_heads: [1, 2, 2, 4], window_size: 2}
train: {epochs: 1, batch_size: 4, samples_per_epoch: 8, workers: 0, val_every: 1, pretrain_epochs: 1}
split: {folds: 3}
datasets: [{path: ds, modality: CT}]
Y
run() { echo "\$ m4oe $*"; out=$(m4oe "$@" 2>&1); rc=$?; echo "$out" | grep -v "^\s*$" | tail -2; echo "  -> exit $rc"; }
mkdir thesis; echo mine > thesis/thesis.md; echo notes > notes.md
run prepare exp.yaml -o ds
run prepare exp.yaml -o thesis
run prepare exp.yaml -o notes.md
run prepare exp.yaml -o ds/imagesTr
run train exp.yaml -o run --cache thesis
run train exp.yaml -o thesis --cache cache
run train exp.yaml -o cache/run --cache cache
ls ds ds/imagesTr thesis; cat notes.md; ls -a .
run pretrain exp.yaml -o pre --cache cache
run train exp.yaml -o run --cache cache --init pre
cp run/config.yaml config_before.yaml
run train exp.yaml -o run --cache cache
sed 's/img_size: 64/img_size: 128/' exp.yaml > exp128.yaml
run train exp128.yaml -o run --cache cache128 --resume
cmp run/config.yaml config_before.yaml && echo "config.yaml unchanged"
run predict -m pre/last -i ds/imagesTr -o p1 --dataset ds
run experts -m pre/last -i ds/imagesTr/case_000_0000.nii.gz -o e1 --dataset ds
run predict -m run/last -i ds/imagesTr -o ds/labelsTr --dataset ds
run predict -m run/last -i ds/imagesTr -o ds --dataset ds
run predict -m run/last -i ds/imagesTr -o run/last --dataset ds
run predict -m run/last -i ds/imagesTr -o notes.md --dataset ds
run predict -m run/last -i ds/imagesTr -o preds --dataset ds
run predict -m run/last -i ds/imagesTr -o preds --dataset ds
run predict -m run/last -i ds/imagesTr -o preds --dataset ds --overwrite
run predict -m run/last -i sheared -o sp --dataset ds --probabilities
ls sp
cp -r run/last edited; python -c "
import json; p='edited/config.json'; c=json.load(open(p)); c['extra']['img_size']=96; json.dump(c, open(p,'w'))"
run predict -m edited -i ds/imagesTr -o p2 --dataset ds
run predict -m run/last -i 'scans [patient 1]/x[/y].nii.gz' -o p3
run predict -m run/last -i ds/imagesTr -o p4 --tta-rotate nan
sed 's/epochs: 1,/epochs: 1, min_lr: -1,/' exp.yaml > neg.yaml; run prepare neg.yaml --verify-only
sed 's/samples_per_epoch: 8/samples_per_epoch: 0/' exp.yaml > zero.yaml; run prepare zero.yaml --verify-only
sed 's/img_size: 64/img_size: 64.0/' exp.yaml > float.yaml; run prepare float.yaml --verify-only
sed 's/img_size: 64/img_size: "64"/' exp.yaml > str.yaml; run prepare str.yaml --verify-only
printf 'train: {lr: 0.1}\ntrain: {lr: 0.2}\ndatasets: [{path: ds}]\n' > dup.yaml; run prepare dup.yaml --verify-only
sed 's/path: ds/path: ign/' exp.yaml > ign.yaml; run prepare ign.yaml --verify-only
run overlay -i ds/imagesTr/case_000_0000.nii.gz --gt shift.nii.gz -o o.png
run overlay -i ds/imagesTr/case_000_0000.nii.gz -o overlay
mkdir existingdir; run evaluate --gt ds/labelsTr --pred preds --labels ds/dataset.json -o existingdir
run evaluate --gt ds/labelsTr --pred preds --labels ds/dataset.json -o s.json --nsd-tolerance -5
run evaluate --gt ds/labelsTr --pred preds --labels ds/dataset.json -o notes.md
run experts -m run/last -i ds/imagesTr/case_000_0000.nii.gz -o notes.md --dataset ds
run experts -m run/last -i ds/imagesTr/case_000_0000.nii.gz -o thesis --dataset ds
run demo -o thesis
ls thesis; cat notes.md
