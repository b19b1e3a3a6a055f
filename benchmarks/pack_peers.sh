#!/usr/bin/env bash
# Rebuild .benchwheels/ (git-ignored): the peers' wheels for the GPU machine (Python 3.12, x86-64, CUDA 13) packed
# as one tarball under the 64 MiB a device call carries, and copies of ../shared/bench's peer scripts (../shared
# does not travel there). Recipe: ../shared/bench/README.md. Usage, from the repo root: bash benchmarks/pack_peers.sh
# Then: run(carry=[".benchwheels"], command="mkdir -p /tmp/peers && tar xzf .benchwheels/peers.tar.gz -C /tmp/peers
# && export PYTHONPATH=/tmp/peers && python3 benchmarks/memory_budget.py --peer-scripts .benchwheels/bench ...").
set -euo pipefail
cd "$(dirname "$0")/.."
out=.benchwheels
exclude=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree
mkdir -p "$(dirname "$exclude")"
grep -qx '/.benchwheels/' "$exclude" 2>/dev/null || echo '/.benchwheels/' >> "$exclude"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$work/wheels" \
  liger-kernel==0.8.5 bitsandbytes==0.50.2 trl==1.16.0 "datasets<5" tyro docstring-parser shtab typeguard xxhash \
  gguf torchao cut_cross_entropy msgspec multiprocess "dill<0.4.2" structlog json5 nest-asyncio \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9
mkdir -p "$work/site"
for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
rm -rf "$work/site/studio" "$work/site/unsloth/studio" "$work/site/torchao/test"
find "$work/site/bitsandbytes" -name 'libbitsandbytes_cuda*' ! -name 'libbitsandbytes_cuda130*' -delete
mkdir -p "$out/bench"
tar czf "$out/peers.tar.gz" -C "$work/site" .
cp ../shared/bench/hf_baseline.py ../shared/bench/unsloth_bench.py "$out/bench/"
du -h "$out/peers.tar.gz"
