#!/usr/bin/env bash
# Make the checkout ready to run: .venv with requirements.txt, and the DancingScript font.
# scripts/setup.sh test installs requirements-test.txt instead, which adds what the tests need, and
# Debian's postgresql, chromium and chromium-driver for the labeller's database and browser tests.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else return 1
  fi
}

apt_install() {
  command -v apt-get >/dev/null || return 1
  echo "setup: installing Debian packages: $*"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  if ! python3 -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv || { echo "setup: python3 -m venv failed; install your distribution's python3-venv package" >&2; exit 1; }
    python3 -m venv .venv
  fi
fi

requirements=requirements.txt
if [ "${1:-}" = test ]; then requirements=requirements-test.txt; fi
stamp=.venv/.$requirements.installed
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ "$requirements" -nt "$stamp" ]; then
  echo "setup: installing $requirements into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
  touch "$stamp"
fi

# GPU=1 scripts/setup.sh [test]: CUDA builds as well, never by default. TensorFlow's and-cuda extra
# brings its CUDA libraries from PyPI, JAX's cuda12 extra its own; the driver is the machine's.
gpu_stamp=.venv/.gpu.installed
if [ "${GPU:-0}" = 1 ] && { [ ! -f "$gpu_stamp" ] || [ requirements.txt -nt "$gpu_stamp" ]; }; then
  echo "setup: installing TensorFlow's and JAX's CUDA builds into .venv (GPU=1)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    "tensorflow[and-cuda]>=2.16,<3" "jax[cuda12]>=0.4.30,<1"
  touch "$gpu_stamp"
fi

font_found() { .venv/bin/python -c 'import captcha_common; captcha_common.find_font()' 2>/dev/null; }
if ! font_found; then
  apt_install fonts-dancingscript || true
  font_found || {
    echo "setup: the font DancingScript-Regular is missing. Install Debian's fonts-dancingscript" >&2
    echo "       (sudo apt-get install fonts-dancingscript), or set CAPTCHA_FONT=/path/to/DancingScript-Regular.ttf" >&2
    exit 1
  }
fi

# make-synthetic-svhn's rich house numbers draw in Debian's Liberation fonts as well (its line
# says how many fonts it found): without them the same seed draws another set.
[ -d /usr/share/fonts/truetype/liberation ] || apt_install fonts-liberation || true

if [ "${1:-}" = test ]; then
  missing=()
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing+=(postgresql)
  command -v chromium >/dev/null || missing+=(chromium)
  [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}" || {
      echo "setup: the labeller's tests need Debian's ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
      exit 1
    }
  fi
fi
