#!/usr/bin/env bash
# ./run.sh demo   set up (.venv, requirements, font), then run the chapter on built-in defaults
# ./run.sh test   set up, then run the linter (ruff, rules in pyproject.toml) and the tests
# ./run.sh bench  set up, then run the speed benchmarks against the book's code
# ./run.sh serve  serve the demo's labelling database (made by ./run.sh demo) at http://127.0.0.1:8000/
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh "${1:-}"
PY=.venv/bin/python
DEMO=data/demo
LABELS=$DEMO/labels.sqlite
SERVE="$PY captcha_labeler.py serve --db $LABELS --host 127.0.0.1 --port 8000"

demo() {
  rm -rf "$DEMO"
  echo "== 1. Generate CAPTCHAs"
  $PY CaptchaGenerator.py --outdir_train "$DEMO/train" --num_captchas_train 2000 \
    --outdir_val "$DEMO/val" --num_captchas_val 500 \
    --outdir_test "$DEMO/test" --num_captchas_test 500 --seed 2024
  echo "== 2. Train the book's solver briefly, so that the training path runs"
  $PY captcha_solver.py train --dest_train "$DEMO/train" --dest_val "$DEMO/val" --outdir "$DEMO/solver" \
    --batch_size 16 --lr 1e-3 --epochs 3 --seed 0
  $PY captcha_solver.py evaluate --model_path "$DEMO/solver/captcha_breaker.keras" \
    --eval_dest "$DEMO/test" --outdir "$DEMO/solver"
  echo "== 3. Read the same CAPTCHAs with the shipped models: the book's network, then the whole-image CNN"
  $PY captcha_solver.py evaluate --model_path models/captcha_breaker.keras \
    --eval_dest "$DEMO/test" --outdir "$DEMO/shipped_book"
  $PY captcha_solver.py evaluate --model_path models/whole_image_cnn.keras \
    --eval_dest "$DEMO/test" --outdir "$DEMO/shipped_whole"
  $PY captcha_solver.py predict "$DEMO/test/$(ls "$DEMO/test" | head -1)"
  echo "== 4. The GAN: a few training steps on offline SYNTHETIC house numbers (not SVHN), so that the"
  echo "      training path runs; then CAPTCHAs from the shipped conditional generator, trained on the same"
  echo "      stand-in: 64 single digits, and 4-digit house numbers named by their answers"
  $PY captcha_gan.py make-synthetic-svhn --outfile "$DEMO/synthetic_svhn/synthetic_svhn_train_32x32.mat" \
    --num_images 5000 --seed 0
  $PY captcha_gan.py make-synthetic-svhn --outfile "$DEMO/synthetic_svhn/synthetic_svhn_test_32x32.mat" \
    --num_images 2000 --seed 1 --png_dir "$DEMO/house_numbers"
  $PY captcha_gan.py train --dest_train "$DEMO/synthetic_svhn/synthetic_svhn_train_32x32.mat" \
    --outdir "$DEMO/gan" --arch sn --conditional True --average_decay 0.999 --batch_size 64 \
    --gen_lr 0.0002 --dis_lr 0.0002 --epochs 1 --seed 0
  $PY captcha_gan.py generate-captcha --num_images 64 --outdir "$DEMO/gan/captcha_for_use" --seed 0
  $PY captcha_gan.py generate-captcha --conditional True --length 4 --num_images 200 \
    --outdir "$DEMO/gan/house_numbers" --seed 0
  $PY captcha_gan.py generate-captcha --conditional True --length 4 --num_images 50 \
    --outdir "$DEMO/gan/house_numbers_to_label" --seed 1
  echo "== 5. Score the shipped generator's samples against real ones (the shipped judge reads them)"
  $PY captcha_gan.py score --model_dir models/gan_synthetic_svhn \
    --dest_train "$DEMO/synthetic_svhn/synthetic_svhn_train_32x32.mat" --num_images 2000 --outdir "$DEMO/gan/score"
  echo "== 6. A labelling database: GAN house numbers to label beside GAN house numbers of known answers,"
  echo "      4 digits each, and the test CAPTCHAs (labelled)"
  $PY captcha_labeler.py init --db "$LABELS" --labelled "$DEMO/gan/house_numbers" \
    --unlabelled "$DEMO/gan/house_numbers_to_label" --unlabelled_glob "*.png"
  $PY captcha_labeler.py init --db "$LABELS" --labelled "$DEMO/test"
  echo "demo: everything is under $DEMO: CAPTCHAs in train/ val/ test/; solver/, shipped_book/ and"
  echo "      shipped_whole/ hold evaluation.csv, failures.png and confusions.csv; gan/ the few-step"
  echo "      run, gan/captcha_for_use/ the shipped generator's CAPTCHAs and contact_sheet.png,"
  echo "      gan/house_numbers/ its 4-digit house numbers (LABEL.png; house_numbers_contact_sheet.png),"
  echo "      gan/score/ their scores; labels.sqlite the labelling database."
  echo "To label the GAN's samples in a browser, serve it (./run.sh serve does) and open http://127.0.0.1:8000/"
  echo "  $SERVE"
}

case "${1:-}" in
  demo) demo ;;
  test) shift
        started=$SECONDS
        echo "== on $($PY -c 'import captcha_common; print(captcha_common.cpu_line())')"
        echo "== ruff check ."; $PY -m ruff check .
        # Three pytest processes share the two cores: one process alone leaves them idle a third of
        # the time, mostly while it imports TensorFlow or JAX (docs/testing.md measures it). With the
        # cores full, TensorFlow's second thread per operation spent more CPU than it saved.
        export TF_NUM_INTRAOP_THREADS=1
        jax_run=$(mktemp -d)
        # The GAN's tests on JAX build the same networks again and again, in one process and in the
        # subprocesses it waits for: a compilation cache of this run's own compiles, written by one
        # process at a time (so without JAX's file lock), spares 4-15% of their CPU time.
        KERAS_BACKEND=jax JAX_COMPILATION_CACHE_DIR="$jax_run/compiled" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
          $PY -m pytest -q --basetemp "$jax_run/tmp" tests/test_captcha_gan.py "$@" >"$jax_run/log" 2>&1 & jax_pid=$!
        # An interrupted run stops both. The kill fails once the JAX run has ended, and set -e would
        # then turn a passing run's exit status into 1.
        trap 'kill "$jax_pid" 2>/dev/null || true; rm -rf "$jax_run"' EXIT
        status=0
        $PY -m pytest -q -n 2 --dist loadfile tests "$@" || status=$?
        wait "$jax_pid" || status=$?
        echo "== the GAN again, on JAX"; cat "$jax_run/log"
        echo "== ./run.sh test took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s, set-up excluded"
        exit "$status" ;;
  bench) for b in bench/bench_*.py; do $PY "$b"; done ;;
  serve) $SERVE ;;
  *) echo "usage: ./run.sh demo|test|bench|serve" >&2; exit 2 ;;
esac
