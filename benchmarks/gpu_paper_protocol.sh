#!/usr/bin/env bash
# The paper's speed protocol on one GPU, for a session that is lent one (issue 20, item 5):
#   sampling: batch 32, length 1024, 32 / 128 / 1024 steps, bf16 autocast, random weights; PGM 8/8
#     (hidden 768) beside MDLM (12 blocks of 768) and PGM 6/6 at hidden 1024, eager and compiled
#     (reduce-overhead: inductor plus CUDA graphs);
#   training: the paper's shapes at batch 32, dense, grouped and jagged attention, beside MDLM;
#   images: the released ImageNet shapes;
#   correctness: what only a GPU runs, checked beside the timings (issue 32, class 11): compiled
#     sampling with CUDA graphs gives eager's tokens and logits, a replayed graph returns each input's
#     own output, bf16 autocast training tracks float32, peak memory (benchmarks/gpu_correctness.py;
#     OUT_DIR/correctness.json). A failed check does not stop the timings: the script exits 1 at the end.
# Usage: [PARTS="sampling training images correctness"] benchmarks/gpu_paper_protocol.sh OUT_DIR [--quick]
#   --quick runs the same commands at toy shapes on the CPU: a dry run that the script works.
#   PARTS picks what runs (all four by default): the sampling tables alone may take most of a
#   10-minute device command, so a short lease runs PARTS=sampling, then PARTS="training images",
#   then PARTS=correctness.
# It uses the machine's own python3 and torch, with this checkout's src on the path.
set -euo pipefail
out=$(realpath -m "${1:?give an output directory}")
quick=${2:-}
parts=${PARTS:-sampling training images correctness}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
pgm() { python3 -m pgm "$@"; }
if [ "$quick" = "--quick" ]; then
    device=cpu
    sampling=(--lengths 32 --steps 4 8 --batch-size 2 --vocab 64 --repeats 1 --warmup 1)
    wide=(--hidden 32 --heads 2 --pgm-blocks 1 1 --baseline-blocks 2)
    wider=(--hidden 48 --heads 2 --pgm-blocks 1 1)
    training=(--presets text-tiny mdlm-tiny --lengths 16 --batch-size 2 --repeats 1 --warmup 0
              --attention dense grouped jagged)
    images=(--presets image-pgm-tiny maskgit-tiny --steps 4 --batch-size 2 --repeats 1 --warmup 0)
    compiled=(--compile eager default)
    correctness=(--quick)
else
    device=cuda
    sampling=(--lengths 1024 --steps 32 128 1024 --batch-size 32 --repeats 1 --warmup 1)
    wide=(--hidden 768 --heads 12 --pgm-blocks 8 8 --baseline-blocks 12)
    wider=(--hidden 1024 --heads 16 --pgm-blocks 6 6)
    training=(--presets pgm-owt-8-8 pgm-owt-6-6-1024 mdlm-owt --batch-size 32 --repeats 3 --warmup 1
              --attention dense grouped jagged)
    images=(--shape imagenet-12-12 imagenet-maskgit --steps 32 --batch-size 32 --repeats 1 --warmup 1)
    compiled=(--compile eager reduce-overhead)
    correctness=()
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
[ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
failed=0
for part in $parts; do
    case $part in
        sampling)
            pgm bench sampling --device "$device" "${sampling[@]}" "${wide[@]}" --models pgm mdlm "${compiled[@]}" \
                --out-dir "$out/sampling-8-8"
            pgm bench sampling --device "$device" "${sampling[@]}" "${wider[@]}" --models pgm "${compiled[@]}" \
                --out-dir "$out/sampling-6-6-1024" ;;
        training) pgm bench training --device "$device" "${training[@]}" --out-dir "$out/training" ;;
        images) pgm bench images --device "$device" "${images[@]}" --out-dir "$out/images" ;;
        correctness)
            python3 benchmarks/gpu_correctness.py --device "$device" "${correctness[@]}" --out "$out/correctness.json" \
                || failed=1 ;;
        *) echo "unknown part $part: the parts are sampling, training, images, correctness" >&2; exit 2 ;;
    esac
done
exit $failed
