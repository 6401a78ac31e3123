"""`make lab` for real: JupyterLab on a loopback port with the project's kernel, a chapter opened in
headless Chromium, and the chapter's first code cells run through the server's REST and kernel
websocket API. Also: a busy port is refused before anything starts, naming the port."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from cellulib.bench import lab

REPO = Path(__file__).resolve().parents[1]
CHAPTER = "notebooks/01_data_exploration.ipynb"
BUDGET_S = 90.0  # the whole JupyterLab test, server start to shutdown
# papermill-style values for the chapter's parameters: a tiny synthetic set (tests/test_book.py)
TINY = 'n_train = 24\nn_val = 8\nn_cells = 6\nsize = 128\nn_examples = 4\n'


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Clock:
    def __init__(self, budget: float):
        self.end = time.monotonic() + budget

    def left(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            pytest.fail(f"the JupyterLab test ran over its {BUDGET_S:.0f} s budget while {what}")
        return left


def _request(base: str, token: str, path: str, body: dict | None = None, method: str = "GET"):
    req = urllib.request.Request(
        f"{base}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return json.loads(text) if text else None


def _execute(ws, session: str, code: str, clock: _Clock) -> dict:
    """Run ``code`` on the kernel behind the websocket ``ws``; its outputs as lists by kind."""
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": session,
                   "username": "test", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    out = {"stream": [], "data": [], "error": [], "reply": None}
    idle = False
    while out["reply"] is None or not idle:
        ws.settimeout(min(30.0, clock.left("waiting for the kernel")))
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out["stream"].append(content["text"])
        elif kind in ("execute_result", "display_data"):
            out["data"].append(content["data"])
        elif kind == "error":
            out["error"].append(f"{content['ename']}: {content['evalue']}")
        elif kind == "execute_reply":
            out["reply"] = content
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
    return out


PAGE = """<!DOCTYPE html><html><head>
<meta name="cellulib-source" content="notebooks/01_data_exploration.ipynb">
<meta name="cellulib-source-href" content="../../../../notebooks/01_data_exploration.ipynb">
<script src="../../_static/source-link.js"></script></head>
<body><div class="article-header-buttons"></div><p>chapter 1</p></body></html>
"""


@pytest.fixture
def lab_server(project_kernel, tmp_path):
    """JupyterLab as `make lab` starts it (cellulib.bench.lab.lab_command), on a free loopback port with
    a token, rooted at a copy of the repository's chapters with a built chapter page beside them
    (its head as the book's source_link extension writes it); always stopped, kernels included."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    html = root / "_build" / "html"
    (html / "book" / "chapters").mkdir(parents=True)
    (html / "book" / "chapters" / "01_data_exploration.html").write_text(PAGE)
    shutil.copytree(REPO / "book" / "_static", html / "_static")
    port, token = _free_port(), uuid.uuid4().hex
    env = dict(os.environ, CELLULIB_HOME=str(tmp_path / "home"), MPLBACKEND="Agg",
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_DATA_DIR=str(tmp_path / "data"))
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(lab.lab_command(port, token, root, "notebooks"), cwd=root, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, token, proc, tmp_path
    finally:
        proc.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=5)
        log.close()


def test_lab_opens_a_chapter_and_runs_its_first_cells(lab_server):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    import websocket  # websocket-client, a dependency of jupyter_server

    base, token, proc, tmp = lab_server
    clock = _Clock(BUDGET_S)
    while True:  # the server is up when its status answers
        try:
            _request(base, token, "/api/status")
            break
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            clock.left("waiting for JupyterLab to start")
            time.sleep(0.5)
    specs = _request(base, token, "/api/kernelspecs")["kernelspecs"]
    assert lab.KERNEL_NAME in specs, f"JupyterLab does not see the kernel {lab.KERNEL_NAME!r}"

    # the chapter's session, with the kernel its metadata names (what the UI starts as well)
    nb = json.loads((REPO / CHAPTER).read_text())
    assert nb["metadata"]["kernelspec"]["name"] == lab.KERNEL_NAME
    session = _request(base, token, "/api/sessions", method="POST", body={
        "path": CHAPTER, "type": "notebook", "name": Path(CHAPTER).name,
        "kernel": {"name": nb["metadata"]["kernelspec"]["name"]}})
    assert session["kernel"]["name"] == lab.KERNEL_NAME

    def dom(url: str, budget_ms: int) -> str:
        return subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={tmp / 'chromium'}",
             f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            capture_output=True, text=True, timeout=min(45.0, clock.left("running Chromium"))).stdout

    # a chapter page of the book served by the same server (cellulib.bench.lab's extension, with its
    # styles and scripts: no sandbox): its source button opens the notebook in JupyterLab
    page = dom(f"{base}/{lab.BOOK_PREFIX}/book/chapters/01_data_exploration.html?token={token}",
               3000)
    assert 'id="cellulib-source-link"' in page, page[:1000]
    assert f'href="/lab/tree/{CHAPTER}"' in page.split('id="cellulib-source-link"')[1].split(">")[0]

    # only behind the server's login
    with urllib.request.urlopen(f"{base}/{lab.BOOK_PREFIX}/book/chapters/01_data_exploration.html",
                                timeout=10) as resp:
        assert "/login" in resp.geturl() and "chapter 1" not in resp.read().decode()

    # the chapter in JupyterLab's interface, rendered by headless Chromium
    html = dom(f"{base}/lab/tree/{CHAPTER}?token={token}", 15000)
    assert "jp-NotebookPanel" in html, "JupyterLab showed no notebook"
    title = nb["cells"][0]["source"][0].lstrip("# ").strip()
    assert title in html, f"the chapter's title {title!r} is not on the page"
    assert lab.KERNEL_DISPLAY_NAME in html, "JupyterLab does not show the project's kernel"

    # its first code cells through the kernel's websocket: parameters, tiny values, set-up, a table
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"]["tags"]
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{base.rsplit(':', 1)[1]}/api/kernels/{session['kernel']['id']}/channels",
        header=[f"Authorization: token {token}"], timeout=min(30.0, clock.left("connecting")))
    try:
        sid = uuid.uuid4().hex
        for source in ("".join(code[0]["source"]), TINY, "".join(code[1]["source"])):
            out = _execute(ws, sid, source, clock)
            assert out["reply"]["status"] == "ok" and not out["error"], out["error"]
        # then the cells up to the first one a reader sees after the set-up (hidden ones run too)
        for cell in code[2:]:
            out = _execute(ws, sid, "".join(cell["source"]), clock)
            assert out["reply"]["status"] == "ok" and not out["error"], out["error"]
            if "remove-cell" not in cell["metadata"].get("tags", []):
                break
        check = _execute(ws, sid, "import sys, cellulib; print(len(patches), sys.executable, "
                                  "cellulib.__file__)", clock)
    finally:
        ws.close()
    # the layout table printed, the patches table shown as HTML; the tiny set (24 + 8 patches);
    # the kernel is this interpreter, running this checkout's library
    printed = "".join(out["stream"])
    assert "datasets/train/" in printed and "training patches" in printed, printed[:500]
    assert any("text/html" in d and "cellularity" in d["text/html"] for d in out["data"])
    n, executable, module = "".join(check["stream"]).split()
    assert int(n) == 32
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(module).resolve().parent == REPO / "cellulib"


def test_lab_refuses_a_busy_port_naming_it():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        assert lab.port_in_use(port)
        out = subprocess.run([sys.executable, "-m", "cellulib.bench.lab", "--port", str(port), "--check"],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in out.stderr and "PORT=" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_lab_check_prints_the_url_of_a_free_port(project_kernel):
    port = _free_port()
    out = subprocess.run([sys.executable, "-m", "cellulib.bench.lab", "--port", str(port), "--check"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"http://127.0.0.1:{port}/lab/tree/notebooks?token=" in out.stdout
    assert not lab.port_in_use(port), "--check must not leave a server behind"
