#!/usr/bin/env bash
# Build the peer libraries' wheels (pytorch-grad-cam 1.5.7, ttach, torchcam) into benchmarks/peer_wheels/
# (git-ignored), so that an offline GPU machine can install them: carry that folder with the device
# tool and benchmarks/gpu_check.sh installs them into a private target directory (no dependencies;
# that image already has numpy, OpenCV, matplotlib, tqdm and torchvision).
set -euo pipefail
cd "$(dirname "$0")"
pip wheel --no-deps "grad-cam==1.5.7" ttach "torchcam==0.5.0" -w peer_wheels
ls -l peer_wheels
