#!/usr/bin/env bash
# Packs what a GPU machine without this project's packages needs to run
# deepcam-host's CUDA paths and benchmarks (scripts/gpu_check.sh) into one
# folder that git ignores: the programs, plugins, probes and unit-test
# executables of a CUDA build, the shared libraries they load that are not
# LibTorch's, the CUDA libraries torch brings or the C library's (HDF5 and
# what it pulls in, toml++, the CUDA run-time, ...), the mlperf-logging
# wheel, the test vectors of ../shared/testdata and,
# when peers/hpc (or REF) holds a checkout of mlcommons/hpc, the reference's model and
# loss (for the benchmark; never committed). LibTorch itself is not packed:
# the GPU machine's own torch of the same version is used at run time.
#
#   scripts/device_bundle.sh [DIR]        # DIR: default device-bundle/ (git-ignored)
#   REF=PATH scripts/device_bundle.sh     # the reference's checkout elsewhere than peers/hpc
#
# DIR is replaced: it must not exist, be empty, or hold an earlier bundle
# (its MANIFEST); anything else is refused (status 2), so that a mistyped
# DIR never deletes a folder. A relative DIR, like REF, is the caller's.
# The bundle must stay small enough to travel (the device tool's limit is
# 64 MiB with the working tree): the script fails when it is over 56 MiB.
set -euo pipefail
usage="usage: scripts/device_bundle.sh [DIR]   (REF=PATH for the reference's checkout)"
case "${1:-}" in
  -h|--help) echo "$usage"; exit 0 ;;
  -*) echo "device_bundle: unknown option $1; $usage" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then echo "device_bundle: one DIR at most; $usage" >&2; exit 2; fi
top=$(cd "$(dirname "$0")/.." && pwd)
# Before the cd: a relative REF or DIR is the caller's.
ref_root=$(realpath -m "${REF:-$top/peers/hpc}")
bundle=$(realpath -m "${1:-$top/device-bundle}")
if [ -e "$bundle" ] && { [ ! -d "$bundle" ] || { [ -n "$(ls -A "$bundle")" ] && [ ! -f "$bundle/MANIFEST" ]; }; }; then
  echo "device_bundle: $bundle is not an earlier bundle (no MANIFEST) and not empty: it would be replaced; name" \
    "another DIR" >&2
  exit 2
fi
cd "$top"
limit_mib=56

scripts/setup.sh
build="$top/build"
if ! grep -q '^#define DEEPCAM_WITH_CUDA 1' "$build/deepcam_build_config.h"; then
  echo "device_bundle: $build was configured without CUDA (nvcc or a CUDA torch missing); rebuild with CUDA=enabled scripts/setup.sh" >&2
  exit 1
fi

rm -rf "$bundle"
mkdir -p "$bundle/build" "$bundle/lib" "$bundle/wheels"

# An ELF file begins with 7f 'E' 'L' 'F'.
is_elf() { [ "$(od -An -tx1 -N4 "$1" | tr -d ' \n')" = 7f454c46 ]; }

# The build tree's programs and libraries at the same relative places, so
# that their $ORIGIN run paths still find libdeepcam_core.so and the plugins.
(cd "$build" && find . \( -name '*.p' -o -name meson-private -o -name meson-info -o -name meson-logs \) -prune -o \
  -type f \( -name '*.so' -o -perm -u+x \) -print) | while IFS= read -r f; do
  is_elf "$build/$f" || continue
  mkdir -p "$bundle/build/$(dirname "$f")"
  cp -p "$build/$f" "$bundle/build/$f"
done
cp -p "$build/deepcam_build_config.h" "$bundle/build/"

# The libraries they load, but those that every CUDA machine with this torch
# has: LibTorch's (torch/lib), the driver's, the CUDA libraries torch brings,
# and glibc's and the compiler's run-time. The CUDA run-time (libcudart,
# small) is packed: our programs link it from the toolkit, which a machine
# may lack. gpu_check.sh puts on the loader's path only those the machine
# lacks.
torch_lib=$("$top/.venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
system_libs=(linux-vdso ld-linux-x86-64 libc libm libdl libpthread librt libresolv libutil libgcc_s 'libstdc\+\+'
             libcuda libnccl libcudnn libcublas libcublasLt libnvrtc libnvJitLink libcufft libcurand libcusparse
             libcusolver)
system="^($(IFS='|'; echo "${system_libs[*]}"))\.so"
find "$bundle/build" -type f | while IFS= read -r elf; do
  if is_elf "$elf"; then ldd "$elf" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'; fi
done | sort -u | while read -r name path; do
  [[ "$name" =~ $system ]] && continue
  [[ "$path" == "$torch_lib"/* || "$path" == "$build"/* || "$path" == "$bundle"/* ]] && continue
  [ -e "$bundle/lib/$name" ] || cp -L "$path" "$bundle/lib/$name"
done

# The official checker for the logs (pure Python; its numpy, pandas, pyyaml
# and scipy are on the GPU image).
"$top/.venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  -d "$bundle/wheels" "$(grep '^mlperf-logging==' scripts/requirements.txt)"

# The test vectors (gpu_check.sh names them in DEEPCAM_TESTDATA for the unit
# tests and links them at ../shared/testdata for the integration tests).
cp -r "$top/../shared/testdata" "$bundle/testdata"
chmod -R u+w "$bundle/testdata"  # a read-only source stays removable by the next run

# The MLCommons reference's model and loss, for the benchmark's peer.
ref="$ref_root/deepcam/src/deepCam"
if [ -f "$ref/architecture/deeplab_xception.py" ]; then
  for d in architecture utils; do
    mkdir -p "$bundle/ref/deepcam/src/deepCam/$d"
    cp "$ref/$d"/*.py "$bundle/ref/deepcam/src/deepCam/$d/"
  done
  # Its commit as scripts/bench_common.py's commit() finds it: a COMMIT file
  # (a copy made with git archive), else the checkout's own git, never ours.
  PYTHONPATH="$top/scripts" "$top/.venv/bin/python" -c 'import sys, bench_common; print(bench_common.commit(sys.argv[1]))' \
    "$ref_root" >"$bundle/ref/COMMIT"
else
  echo "device_bundle: no reference at $ref_root (git clone https://github.com/mlcommons/hpc peers/hpc): the bundle's benchmark part will have no peer" >&2
fi

{
  echo "commit $(git -C "$top" rev-parse --short HEAD)$(git -C "$top" diff --quiet HEAD -- core plugins tests || echo ' (with uncommitted changes)')"
  echo "made $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -n)"
  echo "torch $("$top/.venv/bin/python" -c 'import torch; print(torch.__version__)')"
  echo "libraries: $(cd "$bundle/lib" && shopt -s nullglob && files=(*) && echo "${files[*]:-none}")"
} >"$bundle/MANIFEST"

size_kib=$(du -sk "$bundle" | cut -f1)
echo "device_bundle: $bundle, $((size_kib / 1024)) MiB"
cat "$bundle/MANIFEST"
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
  echo "device_bundle: $bundle is over $limit_mib MiB: it would not travel with the working tree" >&2
  exit 1
fi
