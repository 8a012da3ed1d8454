#!/usr/bin/env bash
# ./run.sh demo   set up (.venv, requirements, font), then run the chapter on built-in defaults
# ./run.sh test   set up, then run the tests
# ./run.sh bench  set up, then run the speed benchmarks against the book's code
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
PY=.venv/bin/python
DEMO=data/demo

demo() {
  rm -rf "$DEMO"
  $PY CaptchaGenerator.py --outdir_train "$DEMO/train" --num_captchas_train 2000 \
    --outdir_val "$DEMO/val" --num_captchas_val 500 \
    --outdir_test "$DEMO/test" --num_captchas_test 500 --seed 2024
  echo "demo: CAPTCHAs are in $DEMO/train, $DEMO/val and $DEMO/test"
}

case "${1:-}" in
  demo) demo ;;
  test) shift; $PY -m pytest -q tests "$@" ;;
  bench) for b in bench/bench_*.py; do $PY "$b"; done ;;
  *) echo "usage: ./run.sh demo|test|bench" >&2; exit 2 ;;
esac
