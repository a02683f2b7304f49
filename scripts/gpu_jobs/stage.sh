#!/usr/bin/env bash
# What device calls carry besides the tree, made once per checkout (all git-ignored): the GPU kit (.gpu-kit),
# the ragout-examples genomes the evaluation jobs train and test on (.ragout, 14 MB), and the scoring
# benchmark's `before` code (.before35, the recipe at 3f3193d).
#   bash scripts/gpu_jobs/stage.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d .gpu-kit ] || bash ../shared/device/stage.sh
if [ ! -d .ragout ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download ragout-examples > /dev/null && dpkg -x ragout-examples_*_all.deb pkg)
  for species in E.Coli S.Aureus V.Cholerae H.Pylori; do
    mkdir -p ".ragout/examples/$species"
    cp -r "$tmp/pkg/usr/share/doc/ragout/examples/$species/references" ".ragout/examples/$species/"
  done
  rm -rf "$tmp"
fi
[ -d .before35 ] || { mkdir .before35 && git archive 3f3193d | tar x -C .before35; }
du -sh .gpu-kit .ragout .before35
