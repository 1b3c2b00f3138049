#!/usr/bin/env bash
# Build llama.cpp's command-line tools and its shared libraries from the llama-cpp-python source distribution,
# once per version and CPU, and lay out llama-cpp-python's pure-Python package beside them (its ctypes bindings
# load this build's libllama.so), so that neither needs the wheel's own ~10-minute build.
#
#   bash scripts/build_llama_cpp.sh [extra cmake targets, e.g. llama-server]   build if needed; print the bin folder
#   bash scripts/build_llama_cpp.sh --check                                   print the bin folder, or exit 1 if unbuilt
#
# Cache: ${OPTIMUM_SUPERWEIGHT_CACHE:-${XDG_CACHE_HOME:-~/.cache}/optimum_superweight}/llama.cpp-<version>/
#   src/llama_cpp_python-<version>/            the unpacked sdist (vendor/llama.cpp holds convert_hf_to_gguf.py)
#   cpu-<hash of CPU flags + compiler>/build   the cmake build; build/bin holds the tools and the .so files
#   cpu-<hash>/python/llama_cpp                the bindings, whose lib/ links to build/bin (put python/ on sys.path)
# Idempotent (a finished build is reused; a requested target it lacks is built incrementally) and safe to
# run concurrently: callers serialise on flock(1), which the kernel releases when a holder dies, so a killed
# build leaves no stale lock, and the next caller resumes it. The last line printed is the bin folder.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
PY=${PYTHON:-python3}
CHECK=0
if [ "${1:-}" = "--check" ]; then
  CHECK=1
  shift
fi
TARGETS=(llama-perplexity llama-quantize llama-imatrix llama-bench llama-tokenize llama "$@")

cache=${OPTIMUM_SUPERWEIGHT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/optimum_superweight}
root="$cache/llama.cpp-$VERSION"
# -DGGML_NATIVE=ON compiles for this CPU's instruction set: a build is valid only on a CPU with the same
# flags (and the same compiler), so both are part of the key.
cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)
compiler=$( (c++ --version 2>/dev/null || echo none) | head -1)
key=$(printf '%s\n%s\n' "$cpu_flags" "$compiler" | sha256sum | cut -c1-12)
src="$root/src/llama_cpp_python-$VERSION"
build="$root/cpu-$key/build"
bin="$build/bin"

have_all() {
  [ -f "$root/cpu-$key/complete" ] && [ -e "$root/cpu-$key/python/llama_cpp/lib/libllama.so" ] || return 1
  for t in "${TARGETS[@]}"; do
    case "$t" in
      llama) [ -e "$bin/libllama.so" ] || return 1 ;;
      *) [ -x "$bin/$t" ] || return 1 ;;
    esac
  done
}

if have_all; then
  echo "$bin"
  exit 0
fi
if [ "$CHECK" = 1 ]; then
  echo "build_llama_cpp.sh: llama.cpp $VERSION is not built for this CPU under $root (run scripts/build_llama_cpp.sh)" >&2
  exit 1
fi

mkdir -p "$root"
exec 9>"$root/.lock"
if ! flock -n 9; then
  echo "build_llama_cpp.sh: another process is building llama.cpp $VERSION; waiting for it" >&2
  flock 9
fi
if have_all; then
  echo "$bin"
  exit 0
fi

command -v cmake >/dev/null || {
  echo "build_llama_cpp.sh: cmake is missing (Debian: apt-get install -y cmake)" >&2
  exit 1
}

if [ ! -f "$src/.unpacked" ]; then
  download="$root/download"
  rm -rf "$download" "$src"
  mkdir -p "$download" "$root/src"
  # --no-binary on this package only: ":all:" would also build its build backend's own dependencies from
  # source (minutes), although pip needs them only to read the sdist's metadata.
  "$PY" -m pip download -q --disable-pip-version-check --no-binary llama-cpp-python --no-deps \
    "llama-cpp-python==$VERSION" -d "$download"
  tar xzf "$download/llama_cpp_python-$VERSION.tar.gz" -C "$root/src"
  touch "$src/.unpacked"
  rm -rf "$download"
fi

start=$(date +%s)
mkdir -p "$root/cpu-$key"
rm -f "$root/cpu-$key/complete"
# Shared libraries (the default) so that llama-cpp-python's bindings can load this build's libllama.so;
# binaries find them through the build tree's RPATH. Tests, examples and the server are built only on request.
cmake -S "$src/vendor/llama.cpp" -B "$build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF >"$root/cpu-$key/cmake.log" 2>&1 || {
  tail -30 "$root/cpu-$key/cmake.log" >&2
  exit 1
}
cmake --build "$build" -j"$JOBS" --target "${TARGETS[@]}" >"$root/cpu-$key/build.log" 2>&1 || {
  tail -40 "$root/cpu-$key/build.log" >&2
  exit 1
}
python="$root/cpu-$key/python"
rm -rf "$python"
mkdir -p "$python"
cp -r "$src/llama_cpp" "$python/llama_cpp"
ln -s "$bin" "$python/llama_cpp/lib"
printf '%s\n' "${TARGETS[@]}" >"$root/cpu-$key/complete"
echo "build_llama_cpp.sh: built llama.cpp $VERSION (${TARGETS[*]}) in $(($(date +%s) - start)) s" >&2
echo "$bin"
