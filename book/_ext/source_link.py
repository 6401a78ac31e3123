"""A "source notebook" button in each chapter page's header (a local Sphinx extension of the book).

Each chapter page (``book/chapters/NAME``) gets two meta tags: ``cellulib-source``, the chapter's
source in the repository (``notebooks/NAME.ipynb``), and ``cellulib-source-href``, where the button
points when the page is read outside JupyterLab: the file in the repository when a repository URL
is configured (``repository.url`` and ``repository.branch`` in ``_config.yml``, or the
``CELLULIB_REPOSITORY_URL`` and ``CELLULIB_REPOSITORY_REF`` variables that the deploy workflow
sets from the repository it runs in), the file beside the built book otherwise (``_build/html``
sits two folders below the repository root). ``source-link.js`` adds the button, and when the page
is served by ``make lab`` (at ``/cellulib-book/``, cellulib.bench.lab) points it at JupyterLab's editor
of the notebook instead. No URL is ever made up: without one the link stays inside the checkout.
"""
from __future__ import annotations

import html
import os
from pathlib import PurePosixPath

CHAPTERS = "book/chapters/"
# Jupyter Book fills repository.url with its own repository when _config.yml gives none; that is
# not this book's repository.
_JUPYTER_BOOK_DEFAULT = "https://github.com/executablebooks/jupyter-book"


def _href(app, pagename: str, source: str) -> str:
    options = app.config.html_theme_options or {}
    configured = (options.get("repository_url") or "").rstrip("/")
    if configured == _JUPYTER_BOOK_DEFAULT:
        configured = ""
    if configured:
        return f"{configured}/blob/{options.get('repository_branch') or 'main'}/{source}"
    url = (os.environ.get("CELLULIB_REPOSITORY_URL") or "").rstrip("/")
    if url:
        return f"{url}/blob/{os.environ.get('CELLULIB_REPOSITORY_REF') or 'main'}/{source}"
    depth = len(PurePosixPath(pagename).parts) - 1 + 2  # the page's folders, then _build/html
    return "../" * depth + source


def _add_meta(app, pagename, templatename, context, doctree):
    if not pagename.startswith(CHAPTERS) or doctree is None:
        return
    name = pagename[len(CHAPTERS):]
    if "/" in name or not name[:2].isdigit():
        return
    source = f"notebooks/{name}.ipynb"
    context["metatags"] = context.get("metatags", "") + (
        f'\n<meta name="cellulib-source" content="{html.escape(source)}">'
        f'\n<meta name="cellulib-source-href" content="{html.escape(_href(app, pagename, source))}">')


def setup(app):
    app.connect("html-page-context", _add_meta)
    app.connect("builder-inited", lambda a: a.add_js_file("source-link.js"))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
