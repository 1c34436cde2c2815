#!/bin/sh
# Concurrent requests in one batch on a GPU: 4 clients posting at once (drawn as one batch) against the same 4
# requests one after another, interleaved, SD1.5 architecture with random weights at 512x512 in float16 (bench.py
# builds the checkpoint, 2 GB, where none is given). Run from the repository root on a machine with an NVIDIA GPU:
#
#     sh bench/gpu_batching.sh [CHECKPOINT]
#
# FLUX.2 klein at 1024x1024 is not measured: the flow-matching families encode their own prompts inside their
# pipelines, and Imagine draws their requests one at a time (engine/batching.py, may_join), so there is no batch of
# theirs to time yet.
set -e
checkpoint=${1:+--checkpoint $1}
python bench/bench.py --device cuda --concurrent --size 512 --steps 20 --repeats 5 $checkpoint
python bench/bench.py --device cuda --concurrent --size 1024 --steps 20 --repeats 3 $checkpoint
