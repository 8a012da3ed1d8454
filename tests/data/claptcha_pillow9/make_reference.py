"""How the reference PNGs here were made: claptcha 0.3.3 itself on Pillow 9.5.0 (the last Pillow
with FreeTypeFont.getsize), FreeType 2.13.0, Debian's fonts-dancingscript 1.2-2.

    python3 -m venv /tmp/oldpil && /tmp/oldpil/bin/pip install pillow==9.5.0 claptcha==0.3.3
    /tmp/oldpil/bin/python tests/data/claptcha_pillow9/make_reference.py tests/data/claptcha_pillow9
"""
import random
import sys

from claptcha import Claptcha

FONT = "/usr/share/fonts/opentype/dancingscript/DancingScript-Regular.otf"
TEXTS = ["26UR", "0O1I", "WXYZ", "8B3M"]

if __name__ == "__main__":
    random.seed(7)
    for text in TEXTS:
        _, image = Claptcha(text, FONT).image
        image.save(f"{sys.argv[1]}/{text}.png")
