#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md, one stage per call (each ends well inside 10 minutes):
#   bash benchmarks/gpu.sh speed      # ResNet-101 dense vs l1 vs Torch-Pruning, bf16 + channels_last, eager
#   bash benchmarks/gpu.sh compiled   # the same with torch.compile (round_to 8 rows only: compiling is slow)
#   bash benchmarks/gpu.sh train      # training images/s: dense ResNet-101 (DDP), ResNet-50 DDP vs DeepSpeed ZeRO-2
#   bash benchmarks/gpu.sh lossvar    # lossvar's selection at 224 px, 256 calibration images
#   bash benchmarks/gpu.sh data       # DALI mixed vs CPU vs PyTorch loader to the GPU, then a DALI-fed prune
# Run alone on the machine. PYTHON picks the interpreter (default python3).
set -euo pipefail
py=${PYTHON:-python3}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1

train_rate() {  # ARCH BACKEND...: one `prunepipe prune` on synthetic data, nothing pruned (ratio 0) so the
  # fine-tune trains the dense network; prints each epoch's training images/s (the first one warms up)
  local arch=$1; shift
  "$py" -m torch.distributed.run --standalone --nproc-per-node 1 -m launch.cli prune configs/imagenet_resnet101.yaml \
    model.arch="$arch" model.weights=null data.backend=synthetic data.synthetic_samples=10240 \
    data.synthetic_classes=1000 data.batch_size=256 prune.method=l1 prune.prune_ratio=0 prune.epochs=0 \
    train.epochs=3 train.warmup_epochs=0 measure.rounds=5 registry.enabled=false \
    output_dir="/tmp/prunepipe-gpu-$arch-$*" "$@" 2>&1 |
    grep -oE '"epoch": [0-9]+, "phase": "(finetune|final)"|"train_img_s_per_worker": [0-9.]+|Error.*' |
    paste -sd' ' | sed "s/^/$arch $* /"
}

case ${1:-} in
  speed) "$py" benchmarks/speed.py --archs resnet101 --targets 0.42 0.5 --round-to 1 8 --batch 256 --rounds 20 ;;
  compiled) "$py" benchmarks/speed.py --archs resnet101 --targets 0.42 0.5 --round-to 8 --batch 256 --rounds 20 \
              --compile off on ;;
  train)
    train_rate resnet101 train.backend=ddp
    train_rate resnet50 train.backend=ddp
    train_rate resnet50 train.backend=deepspeed train.zero_stage=2 ;;
  lossvar) "$py" benchmarks/lossvar_cost.py --arch resnet101 --image-size 224 --calib 256 --batch 64 ;;
  data)
    "$py" benchmarks/loaders.py --data /tmp/prunepipe-imnet --images 2048 --batch 64 --rounds 3 --workers 4 8 \
      --device cuda
    # the same shards through a whole trial: DALI decoding on the GPU feeding DDP training (bf16)
    "$py" -m torch.distributed.run --standalone --nproc-per-node 1 -m launch.cli prune configs/imagenet_resnet101.yaml \
      model.arch=resnet50 model.weights=null data.root=/tmp/prunepipe-imnet data.batch_size=64 prune.method=l1 \
      prune.prune_ratio=0.3 prune.epochs=0 train.epochs=2 train.warmup_epochs=0 measure.rounds=5 \
      registry.enabled=false output_dir=/tmp/prunepipe-gpu-dali 2>&1 |
      grep -oE '"phase": "[a-z]+"|"train_img_s_per_worker": [0-9.]+|"bad_samples": [0-9]+|pruned model.*|Error.*' ;;
  *) echo "usage: $0 speed|compiled|train|lossvar|data" >&2; exit 2 ;;
esac
