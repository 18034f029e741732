"""MkDocs hooks: ship MathJax with the site (no network needed to read it).

MathJax comes from the ``django-static-mathjax`` wheel (a data-only package,
pinned in ``constraints.txt``); its ``es5`` TeX-to-SVG bundle is copied to
``site/assets/mathjax`` after each build.
"""

from __future__ import annotations

import pathlib
import shutil


def on_post_build(config, **kwargs):  # noqa: D103
    import mathjax  # django-static-mathjax

    src = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    dst = pathlib.Path(config["site_dir"]) / "assets" / "mathjax"
    # The TeX-to-SVG bundle alone: it draws glyphs as paths, so it needs
    # no web fonts (nothing to fetch, the same picture in every browser).
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "tex-svg.js", dst / "tex-svg.js")
