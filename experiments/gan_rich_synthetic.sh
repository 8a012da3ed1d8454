# The shipped GAN recipe on the rich SYNTHETIC house numbers (make-synthetic-svhn --style rich; not
# SVHN), as run on 2026-12-02: the judge of the rich set (models/synthetic_svhn_rich_judge.keras),
# then `train --recipe fast --conditional True` for its 7,500 steps, scored every epoch and at the
# end with N = 10,000. Results: docs/gan.md#the-shipped-recipe-on-the-rich-set.
set -e
PY=.venv/bin/python
D=data/syn_rich
$PY captcha_gan.py make-synthetic-svhn --outfile $D/synthetic_svhn_train_32x32.mat --num_images 40000 --seed 0 --style rich
$PY captcha_gan.py make-synthetic-svhn --outfile $D/synthetic_svhn_test_32x32.mat --num_images 10000 --seed 1 --style rich
$PY -c "
import gan_score, captcha_gan
images, labels = captcha_gan.read_mat('$D/synthetic_svhn_train_32x32.mat')
gan_score.load_or_train_judge('$D/synthetic_svhn_train_32x32.mat', images, labels, seed=0, progress=True)
"
$PY captcha_gan.py train --recipe fast --conditional True --dest_train $D/synthetic_svhn_train_32x32.mat \
  --seed 0 --score_every 1 --sample_every 200 --outdir runs/rich_fast_cond --judge $D/synthetic_svhn_train_32x32.judge.keras
$PY captcha_gan.py score --model_dir runs/rich_fast_cond/best --dest_train $D/synthetic_svhn_train_32x32.mat \
  --num_images 10000 --judge $D/synthetic_svhn_train_32x32.judge.keras --outdir runs/rich_fast_cond/score
