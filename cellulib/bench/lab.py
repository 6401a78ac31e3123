"""The chapters in JupyterLab with the project's kernel (``make lab``, ``python -m cellulib.bench.lab``).

``make lab`` installs JupyterLab into the project's environment (the ``book`` extra), registers the
project's kernel in that environment (:func:`install_kernel`, ``--sys-prefix``) and runs::

    python -m cellulib.bench.lab --port 8888

which checks that the port is free before anything starts, prints the URL of the chapter sources
(``notebooks/``) and runs JupyterLab on the loopback address with the repository as its root. This
module is also a small Jupyter server extension that serves the built book (``_build/html``) at
``/cellulib-book/`` to logged-in users, so each chapter page's "Source notebook" button
(``book/_static/source-link.js``) opens the chapter in the same JupyterLab.

Every chapter notebook names the kernel :data:`KERNEL_NAME` in its metadata, so papermill and
JupyterLab run the chapters with the same interpreter.
"""
from __future__ import annotations

import argparse
import errno
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

__all__ = [
    "KERNEL_NAME",
    "KERNEL_DISPLAY_NAME",
    "kernel_spec_dir",
    "install_kernel",
    "port_in_use",
    "lab_command",
    "BOOK_PREFIX",
    "main",
]

#: The kernel every chapter names in its metadata (``kernelspec.name``): the project's interpreter.
KERNEL_NAME = "cellulib"
#: How JupyterLab's launcher and kernel picker show it.
KERNEL_DISPLAY_NAME = "Python (cellulib)"
#: Where ``make lab`` serves the built book (``_build/html`` under the server's root); the book's
#: source-link.js looks for it in the page's address.
BOOK_PREFIX = "cellulib-book"


def kernel_spec_dir(name: str = KERNEL_NAME) -> Path | None:
    """The folder of the kernelspec ``name`` as Jupyter finds it (``JUPYTER_PATH``, the
    environment's ``share/jupyter``, the user's folders); None when it is not registered."""
    from jupyter_client.kernelspec import KernelSpecManager

    found = KernelSpecManager().find_kernel_specs()
    return Path(found[name]) if name in found else None


def install_kernel(prefix: str | os.PathLike | None = None) -> Path:
    """Register this interpreter as the kernel :data:`KERNEL_NAME` under ``prefix``
    (default ``sys.prefix``: the project's environment, as ``ipykernel install --sys-prefix``).

    A test without the kernel registers it under a temporary prefix and adds that prefix's
    ``share/jupyter`` to ``JUPYTER_PATH``. Returns the kernelspec folder.
    """
    from ipykernel.kernelspec import install

    path = install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME,
                   prefix=str(prefix) if prefix is not None else sys.prefix)
    return Path(path)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``host:port`` cannot be bound (another server listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def lab_command(port: int, token: str, root: str | os.PathLike = ".",
                open_path: str = "notebooks", host: str = "127.0.0.1") -> list[str]:
    """The ``jupyter lab`` command line: loopback, ``port``, ``token``, ``root`` as the server's
    root folder, ``open_path`` opened first, no browser; ``--allow-root`` when run as root."""
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.ip={host}", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", "--ServerApp.open_browser=False",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={Path(root).resolve()}",
           f"--LabApp.default_url=/lab/tree/{open_path}",
           "--ServerApp.jpserver_extensions=cellulib.bench.lab=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    return cmd


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """Jupyter server's entry point: this module is the extension that serves the book."""
    return [{"module": "cellulib.bench.lab"}]


def _load_jupyter_server_extension(serverapp) -> None:
    """Serve ``<root>/_build/html`` at ``/cellulib-book/`` to the server's logged-in users.

    jupyter_server's own file handler confines HTML to a sandbox (no cookies, so a page loads
    none of its styles or scripts); the built book is this project's own output, so it is served
    as a site of the server's origin, behind the same login as JupyterLab.
    """
    from jupyter_server.base.handlers import AuthenticatedFileHandler, JupyterHandler
    from jupyter_server.utils import url_path_join

    class BookHandler(AuthenticatedFileHandler):
        @property
        def content_security_policy(self) -> str:
            return JupyterHandler.content_security_policy.fget(self)

    book = Path(serverapp.root_dir) / "_build" / "html"
    route = url_path_join(serverapp.base_url, BOOK_PREFIX, "(.*)")
    serverapp.web_app.add_handlers(".*$", [(route, BookHandler, {"path": str(book),
                                                                 "default_filename": "index.html"})])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cellulib.bench.lab",
        description="Open the chapter sources in JupyterLab with the project's kernel, on the "
        "loopback address.")
    p.add_argument("--port", type=int, default=8888, help="port to serve on (default 8888)")
    p.add_argument("--root", default=".", help="the server's root folder (default: here)")
    p.add_argument("--open", default="notebooks", help="folder opened first (default notebooks)")
    p.add_argument("--check", action="store_true",
                   help="check the port and the kernel, print the URL and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m cellulib.bench.lab [--port N] [--root DIR] [--open PATH] [--check]``."""
    args = _parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"cellulib.bench.lab: port must lie in 1-65535, got {args.port}", file=sys.stderr)
        return 2
    if port_in_use(args.port):
        print(f"cellulib.bench.lab: port {args.port} on 127.0.0.1 is in use; stop what listens there or "
              f"pick another port (make lab PORT={args.port + 1})", file=sys.stderr)
        return 2
    root = Path(args.root)
    if not (root / args.open).is_dir():
        print(f"cellulib.bench.lab: {root / args.open}: no such folder to open", file=sys.stderr)
        return 2
    if kernel_spec_dir() is None:
        print(f"cellulib.bench.lab: registering the kernel {KERNEL_NAME!r} in {sys.prefix}")
        install_kernel()
    token = secrets.token_hex(16)
    base = f"http://127.0.0.1:{args.port}"
    print(f"JupyterLab with the kernel {KERNEL_DISPLAY_NAME!r}:\n"
          f"    {base}/lab/tree/{args.open}?token={token}\n"
          f"the built book (make book): {base}/{BOOK_PREFIX}/book/intro.html\n"
          "Ctrl-C stops the server.", flush=True)
    if args.check:
        return 0
    try:
        return subprocess.call(lab_command(args.port, token, root, args.open))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
