#!/usr/bin/env bash
# Reproduce Tables 1-6 and Figures 1-5, 7 of "Training Confidence-calibrated Classifiers for Detecting
# Out-of-Distribution Samples" (Lee, Lee, Lee & Shin, ICLR 2018). Everything lands in results/ (README.md there).
#
#   bash reproduce.sh               full: the paper's settings. One CUDA GPU (A100/H100 class); roughly a day
#                                   (3 seeds x {ce, conf, conf-gan, joint, joint-pt, kplus1} VGG-13 + AlexNet
#                                   runs of 100 epochs on svhn and cifar10; a joint run costs ~4x a ce run).
#                                   Data: svhn, cifar10, tinyimagenet, lsun, mnist under ./data (checked first;
#                                   each is downloaded when missing and the network allows, tinyimagenet / lsun
#                                   from the ODIN authors' archives).
#   bash reproduce.sh --quick       offline CPU analogue, 18-25 min on 2 cores: fashion-mnist <-> mnist in the
#                                   roles of svhn <-> cifar10; photos, uniform, gaussian as unseen OOD. Its `all`
#                                   leaves out table4, table5, table6 and figure2 (about 23 min more; each runs
#                                   alone).
#   bash reproduce.sh --gpu         the quick mode's sets at the paper's scale (full width, lr 2e-4, beta 1, batch
#                                   128, 3 seeds, 3 epochs) on one GPU, into results/gpu/. Three stages, each
#                                   training its runs and then rendering every table and figure they complete:
#                                   gpu1 (ce, conf, K+1), gpu2 (conf-gan, joint), gpu3 (joint-pt);
#                                   one alone: bash reproduce.sh --gpu gpu2.
#                                   On a GPU several runs train at once; how many is measured first (packing.json).
#   bash reproduce.sh table1        one stage (table1..table6, figure1..figure5, figure7; also check-data, render);
#   bash reproduce.sh --quick figure1   stages take --quick / --gpu / --tiny too. Finished runs are never recomputed.
#   bash reproduce.sh --tiny --results out/tiny  a one-epoch slice of the quick pipeline (what the test runs).
#   bash reproduce.sh --quick --seeds 0-11   any mode, more seeds: every regime runs the same seeds (paired);
#                                   finished runs are kept, so it resumes, and the tables and verdicts use every
#                                   seed that has finished. Defaults: quick 0, gpu and full 0-2. Verdicts need
#                                   paired seeds: one seed is always "inconclusive (n = 1)" (results/README.md).
#
# Environment: DATA_ROOT (default ./data) is where the data sets are looked for. A dress rehearsal of the full
# mode on small stand-in files (tests/test_rehearsal.py): REPRODUCE_SIZES=tiny runs any mode's own roles, stages,
# tables, figures and README at the tiny mode's sizes, downloads off (refused for ./results); REPRODUCE_VERIFY=0
# skips the md5 checks of data files (the default checks them). E.g.
#   DATA_ROOT=stand-ins REPRODUCE_SIZES=tiny REPRODUCE_VERIFY=0 bash reproduce.sh --results out/rehearsal
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python}
MODE=full
STAGE=all
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --tiny) MODE=tiny ;;
    --gpu) MODE=gpu ;;
    --results) EXTRA+=(--results "$2"); shift ;;
    --results=*) EXTRA+=(--results "${1#*=}") ;;
    --jobs) EXTRA+=(--jobs "$2"); shift ;;
    --seeds) EXTRA+=(--seeds "$2"); shift ;;
    --seeds=*) EXTRA+=(--seeds "${1#*=}") ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p;}' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) STAGE=$1 ;;
  esac
  shift
done

stage() { "$PY" reproduce.py "$1" --mode "$MODE" ${EXTRA[@]+"${EXTRA[@]}"}; }

check_data() { stage check-data; }   # says which files are missing, where they go and how to get them
table1() { stage table1; }   # baseline detector, VGG-13: cross entropy vs confidence loss (seen OOD)
table2() { stage table2; }   # accuracy per regime: ce, conf-gan, joint, conf
table3() { stage table3; }   # ECE with / without temperature scaling: ce vs joint
table4() { stage table4; }   # AlexNet, baseline + ODIN: ce vs conf
table5() { stage table5; }   # joint without / with the pull-away term
table6() { stage table6; }   # K+1 class loss vs confidence loss, baseline + ODIN
figure1() { stage figure1; } # 2-D: confidence loss with OOD from [-50,50]^2 vs [-20,20]^2
figure2() { stage figure2; } # max-softmax histograms (ce vs conf) and ROC curves per training OOD set
figure3() { stage figure3; } # original vs proposed GAN: 2-D mixture (a,b) and mnist DCGAN (c,d)
figure4() { stage figure4; } # baseline detector per regime on unseen OOD sets
figure5() { stage figure5; } # guided-backprop maps per loss, in- and out-of-distribution inputs
figure7() { stage figure7; } # baseline vs ODIN, ce vs joint
gpu1() { stage gpu1; }       # --gpu: the ce, conf and K+1 runs, then every table / figure they finish
gpu2() { stage gpu2; }       # --gpu: the conf-gan and joint runs, the same
gpu3() { stage gpu3; }       # --gpu: the joint-pt runs, the same
all() { stage all; }         # every run in one pool, then every table and figure, then results/README.md

case "$STAGE" in
  all|check_data|table1|table2|table3|table4|table5|table6|figure1|figure2|figure3|figure4|figure5|figure7|gpu1|gpu2|gpu3) "$STAGE" ;;
  check-data) check_data ;;
  render) stage render ;;
  *) echo "unknown stage $STAGE (all, check-data, render, table1..table6, figure1..figure5, figure7, gpu1..gpu3)" >&2; exit 2 ;;
esac
