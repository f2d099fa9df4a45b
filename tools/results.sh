#!/usr/bin/env bash
# Rebuild the README's results tables and curves from the run logs in docs/results/ alone.
# Prints the five tables (markdown) in README order and redraws docs/pictures/curves*.png.
#   bash tools/results.sh [--tables-only]   (with the project's .venv, or any Python where capsnet imports)
set -euo pipefail
cd "$(dirname "$0")/.."
capsnet=(python3 -m capsnet)
[ -x .venv/bin/capsnet ] && capsnet=(.venv/bin/capsnet)
R=docs/results
default=("$R"/default-h200-s*)
# the runs of today's recipes, and of variants tried on several seeds (fast-s789/s790: the fast
# recipe before its learning rate was doubled; default-rw10, default-erase4: the authors' loss balance
# and a blanked square at 50 epochs; default-affr32: rotations, scaling and float32 routing at 50; default-elastic: elastic distortion, 50 epochs on the CPU; fast-fz2: conv1 frozen after 2 epochs, fast-fz2e12:
# the same for 12 epochs; fast-r32: u_hat and the routing in float32; fast-clean1: its last epoch unshifted;
# fast-e13: 13 epochs on the Intel VM; fast-intel: the fast recipe as it is, on the Intel VM;
# fashion-fast: the fast recipe on Fashion-MNIST; multimnist-fast-e6: six epochs of it on MultiMNIST,
# multimnist-fast-e6-r1: the same with one routing iteration; multimnist-fast: its own nine epochs)
recipes=("${default[@]}" "$R/default-s789" "$R/default-s790" "$R/default-r32-s789" "$R/default-elastic-s789" "$R"/default-val0-h200-s* "$R"/default-aff-h100-s* "$R/default-leaky-h200-s792"
         "$R"/default-rw10-h200-s* "$R"/default-erase4-h200-s* "$R"/default-affr32-h200-s*
         "$R"/fast-lr2-s* "$R/fast-s789" "$R/fast-s790" "$R"/fast-fz2-s* "$R"/fast-fz2e12-s*
         "$R"/fast-r32-s* "$R"/fast-clean1-s* "$R"/fast-e13-s* "$R"/fast-intel-s*
         "$R"/fashion-fast-s* "$R"/multimnist-fast-e6-s* "$R"/multimnist-fast-e6-r1-s* "$R"/multimnist-fast-s*)
echo "## pooled over seeds"
"${capsnet[@]}" report --seeds "${recipes[@]}"
echo
echo "## every run"
"${capsnet[@]}" report "${recipes[@]}" "$R/e1-bf16" "$R/e1-fp32"
echo
echo "## changes tried, each beside its twins"
"${capsnet[@]}" report --paired "$R/tried.json"
echo
echo "## ablation"
"${capsnet[@]}" report --ablation --seeds "$R"/ablation/abl-{r3-recon,r1-recon,r3-norecon,r1-norecon,shared,leaky}{,-s790,-s791}
echo
echo "## ablation at the fast recipe's 9 epochs (fast-r32: the fast recipe as it is)"
"${capsnet[@]}" report --ablation --seeds "$R"/fast-r32-s{789,790,791} "$R"/ablation/fast-norecon-s{789,790,791} \
    "$R"/ablation/fast-r1-s{789,790,791} "$R"/ablation/fast-r1-norecon-s{789,790,791} \
    "$R"/ablation/fast-shared-s{789,790,791} "$R"/ablation/fast-leaky-s{789,790,791}
[ "${1:-}" = --tables-only ] && exit 0
"${capsnet[@]}" report --curves docs/pictures/curves.png "$R"/default-h200-s79{2,3,4} > /dev/null
"${capsnet[@]}" report --curves docs/pictures/curves_fast.png "$R"/fast-r32-s{789,790,791} > /dev/null
echo
echo "(curves redrawn: docs/pictures/curves.png, docs/pictures/curves_fast.png)"
