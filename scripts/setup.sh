#!/usr/bin/env bash
# Installs every dependency from the package registries and builds deepcam-host.
# Idempotent: a second run checks what is there and rebuilds only what changed.
# Options: CUDA=enabled|disabled|auto (default auto: on when nvcc is present);
# given, it also reconfigures a build/ set up before (meson configure).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

# slurmctld, slurmd, slurm-client and munge: tests/integration/test_slurm.py
# starts its own one-node Slurm from them (no system service is used).
# libgoogle-perftools-dev: tcmalloc, deepcam-host's malloc (meson.build).
# lld: the linker of build/ and build-asan/ (below, and scripts/test.sh).
debs=(g++ pkg-config libhdf5-dev zlib1g-dev libboost-dev libtomlplusplus-dev doctest-dev libgloo-dev openmpi-bin
      libgoogle-perftools-dev lld
      slurmctld slurmd slurm-client munge)
missing=()
for d in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "install ok installed" || missing+=("$d")
done

# The Python packages are installed while apt installs the Debian ones:
# neither needs the other, and on a fresh machine both spend most of their
# time downloading. pip's output is shown if it fails.
venv="$top/.venv"
stamp="$venv/.requirements.sha"
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
pip_pid=""
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages (torch is large; first run takes minutes)"
  pip_log=$(mktemp)
  ( [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/requirements.txt ) >"$pip_log" 2>&1 &
  pip_pid=$!
fi

if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -n "$pip_pid" ]; then
  if ! wait "$pip_pid"; then
    cat "$pip_log" >&2
    echo "setup: installing the Python packages (scripts/requirements.txt) failed" >&2
    exit 1
  fi
  rm -f "$pip_log"
  echo "$want" > "$stamp"
fi

cuda=${CUDA:-auto}
build="$top/build"
if [ ! -f "$build/build.ninja" ]; then
  # LLVM's lld links the 78 programs and libraries, each against LibTorch,
  # in a tenth of GNU ld's time: about a minute and a half of CPU less.
  CXX_LD=lld PATH="$venv/bin:$PATH" meson setup "$build" -Dcuda="$cuda" --buildtype=release >/dev/null
elif [ -n "${CUDA:-}" ]; then
  # Asked for by name (device_bundle.sh's advice for a build without CUDA):
  # the option set up before would otherwise stay.
  PATH="$venv/bin:$PATH" meson configure "$build" -Dcuda="$CUDA" >/dev/null
fi
PATH="$venv/bin:$PATH" ninja -C "$build" | tail -n 1
