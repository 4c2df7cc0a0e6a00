#!/usr/bin/env bash
# Bundles, for a CUDA machine without internet, the packages of the lock's `gpu` extra that its image lacks.
#
#   benchmarks/gpu/pack.sh            # here, with PyPI reachable: writes .gpu/site312.tgz (git-ignored)
#   # there (Python 3.12, x86_64):
#   mkdir -p /tmp/site && tar xzf .gpu/site312.tgz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#
# What goes in is derived from uv.lock, nothing is pinned here:
#   1. `uv export --frozen --extra gpu --no-dev --no-hashes` lists the locked versions of the gpu extra;
#   2. every package the machine's image already holds (benchmarks/gpu/machine-packages.txt) is dropped, so
#      its own torch, triton, transformers, ... builds are the ones used there;
#   3. `pip install --no-deps --target` unpacks the CPython 3.12 manylinux x86_64 wheels of the rest, except
#      xformers: its binary is built for the lock's torch, not the image's, and Unsloth runs without it.
# Then files no import needs are removed (Prefect's web UI bundles, bitsandbytes' libraries for other CUDA
# versions, caches) to stay well under the 64 MiB a device call carries.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
uv=${UV:-$(command -v uv || echo .venv/bin/uv)}
py=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$uv" export --frozen --extra gpu --no-dev --no-hashes --no-emit-project --quiet -o "$work/locked.txt"
# Names compare in PEP 503 form (lower case, runs of -_. as one -).
norm() { tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g'; }
{ grep -v '^#' benchmarks/gpu/machine-packages.txt | grep .; echo xformers; } | norm | sort -u > "$work/have.txt"
while IFS= read -r line; do
  [[ $line =~ ^[A-Za-z0-9] ]] || continue
  name=$(echo "${line%%[=;<> ]*}" | norm)
  grep -qx "$name" "$work/have.txt" || echo "$line"
done < "$work/locked.txt" > "$work/wanted.txt"
echo "$(grep -c . "$work/wanted.txt") of $(grep -c '^[A-Za-z0-9]' "$work/locked.txt") locked packages are not on the machine (xformers left out)"

plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
      --platform any)
"$py" -m pip install -q --no-deps --no-compile "${plat[@]}" --target "$work/site" -r "$work/wanted.txt"

site=$work/site
rm -rf "$site"/bin "$site"/studio "$site"/test "$site"/unsloth_cli
rm -rf "$site"/prefect/server/ui "$site"/prefect/server/ui-v2 "$site"/apprise "$site"/apprise-*.dist-info
find "$site"/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' -delete 2>/dev/null || true
find "$site" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .gpu
tar czf .gpu/site312.tgz -C "$site" .
ls -la .gpu/site312.tgz
