#!/usr/bin/env bash
# Train the small models shipped in medidiff/weights/ (the defaults of `medidiff demo`) on the shipped sample
# data, one after another (never two trainings at once on a 2-core machine), and export each to a
# weights-only checkpoint. Seed 0 everywhere; each run stops at its config's max_time (4 minutes here).
#   bash tasks/train_demo_models.sh            # about 20 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
medidiff=".venv/bin/medidiff"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
train() {  # name config
    local name=$1 config=$2 root="runs/demo_models/$1"
    rm -rf "$root"
    local start=$SECONDS
    $medidiff fit --config "$config" --trainer.default_root_dir "$root" --trainer.max_time "00:00:04:00" \
        --trainer.enable_progress_bar false > "runs/demo_models/$name.log" 2>&1
    local ckpt
    ckpt=$(ls "$root"/lightning_logs/version_0/checkpoints/last.ckpt)
    $medidiff export --ckpt "$ckpt" --out "medidiff/weights/$name.ckpt"
    local steps
    steps=$(python3 -c "import csv,sys; r=list(csv.DictReader(open('$root/lightning_logs/version_0/metrics.csv'))); print(max(int(x['step']) for x in r) + 1)")
    echo "$name: $config, seed 0, ${steps} steps, $((SECONDS - start)) s wall" | tee -a runs/demo_models/summary.txt
}
mkdir -p runs/demo_models
: > runs/demo_models/summary.txt
train segmentation_mni_2d configs/segmentation/sample_mni_2d.yaml
train segmentation_ct_3d configs/segmentation/sample_ct_3d.yaml
train restoration_mni_2d configs/restoration/sample_mni_2d_kspace4x.yaml
train superres_ct_3d configs/superres/sample_ct_3d_x4.yaml
train fusion_mni_2d configs/fusion/sample_fusion_2d.yaml
