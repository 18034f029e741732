"""MkDocs hooks: the benchmark figures, and MathJax shipped with the site.

The figures that ``make bench`` writes to ``benchmarks/results/*.png`` are
added to the site as ``assets/results/*.png`` (one copy in the repository,
where the scripts write it). MathJax: no network needed to read the site.

MathJax comes from the ``django-static-mathjax`` wheel (a data-only package,
pinned in ``constraints.txt``); its ``es5`` TeX-to-SVG bundle is copied to
``site/assets/mathjax`` after each build.
"""

from __future__ import annotations

import pathlib
import shutil


def on_files(files, config, **kwargs):  # noqa: D103
    from mkdocs.structure.files import File

    root = pathlib.Path(config["config_file_path"]).parent
    for png in sorted((root / "benchmarks" / "results").glob("*.png")):
        files.append(File.generated(config, f"assets/results/{png.name}",
                                    abs_src_path=str(png)))
    return files


def on_post_build(config, **kwargs):  # noqa: D103
    import mathjax  # django-static-mathjax

    src = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    dst = pathlib.Path(config["site_dir"]) / "assets" / "mathjax"
    # The TeX-to-SVG bundle alone: it draws glyphs as paths, so it needs
    # no web fonts (nothing to fetch, the same picture in every browser).
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "tex-svg.js", dst / "tex-svg.js")
