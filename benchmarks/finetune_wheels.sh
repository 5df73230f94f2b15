#!/usr/bin/env bash
# Wheels for the long-context fine-tuning runners on the GPU machine, which has no network.
# Run here (where pip reaches PyPI), in the repository root, with a python that has torch (deepspeed's sdist
# reads it to write its metadata):  PYTHON=.venv/bin/python bash benchmarks/finetune_wheels.sh ours|alst
# then on the GPU:  python3 -m pip install --no-deps .whl/*.whl  (alst: and the deepspeed sdist, see below).
# Two sets, one per device call: together they are over the 64 MiB a call may carry
# (bitsandbytes 43 MB, wandb 20 MB, which arctic-training imports at start).
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p .whl
get() {
  "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
}
case "${1:-}" in
  ours)   # runners 'ours' and 'hf': 8-bit AdamW / nf4, Liger kernels, TRL's activation offloading
    get bitsandbytes==0.50.2 liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 ;;
  alst)   # runner 'alst': arctic-training and what it imports; deepspeed has no wheel on PyPI, only an sdist:
          # on the GPU  python3 -m pip install --no-deps --no-build-isolation .whl/deepspeed-0.19.8.tar.gz
          # (its CPU Adam and fused Adam ops then build at first use with the machine's nvcc and ninja)
    get arctic-training==0.8.0 liger-kernel==0.8.5 datasets==5.2.0 wandb hjson msgpack py-cpuinfo devtools \
        jsonlines loguru yq
    "${PYTHON:-python3}" -m pip download --no-deps --no-binary=:all: --no-build-isolation -d .whl deepspeed==0.19.8 ;;
  *) echo "usage: $0 ours|alst" >&2; exit 2 ;;
esac
du -sh .whl
