#!/usr/bin/env bash
# The A/B comparisons behind bench/NOTES.md v4 (one GPU call; each line interleaves its
# variants twice in one process). Logs to $OUT/ab.txt when set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
ab() { python3 bench/ab.py "$@" 2>&1 | tee -a "$OUT/ab.txt"; }
# residency: 3 CTAs/SM x 2 stages (v3) against 2 x 3 (v4), one split and split layouts
ab 64,32,8,2048,128 auto ctas=3+stages=2
ab 128,32,8,1024,128 auto ctas=3+stages=2
ab 1,32,8,32768,128 auto ctas=3+stages=2+splits=33
ab 32,16,4,8192,64 auto ctas=4+stages=3
# Q tile: first cp.async group (v4) against plain loads behind the K/V prologue (v3)
ab 1,32,8,4096,128 auto qvec=0 splits=16 splits=16+qvec=0
ab 1,32,8,32768,128 auto qvec=0
# merge: last CTA against the combine kernel, at the same splits
ab 1,32,8,4096,128 splits=32+combine=0 splits=32+combine=1 splits=16+combine=0 splits=16+combine=1 splits=8+combine=0
ab 1,8,1,65536,128 auto splits=128+combine=0 splits=128+combine=1 splits=64+combine=1
ab 1,8,1,262144,128 auto splits=128+combine=0
ab 8,32,8,8192,128 auto combine=1
# head_dim not a multiple of 64: the MMA kernel against the 16-byte SIMT kernel it replaces
ab 1,32,32,8192,96 auto simt=1
ab 1,32,32,8192,80 auto simt=1
ab 1,32,32,4096,160 auto simt=1
ab 1,32,32,8192,96,float8_e4m3fn auto
ab 1,32,32,6144,128 auto
