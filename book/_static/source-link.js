// The "source notebook" button of a chapter page (see book/_ext/source_link.py): JupyterLab's
// editor of the notebook when the book is served by `make lab` (at /cellulib-book/, see
// cellulib/bench/lab.py), the repository file otherwise.
function cellulibSourceLink() {
  const source = document.querySelector('meta[name="cellulib-source"]');
  const fallback = document.querySelector('meta[name="cellulib-source-href"]');
  if (!source || !fallback || document.getElementById("cellulib-source-link")) return;
  let href = fallback.content;
  let title = "The chapter's source notebook in the repository";
  const at = window.location.pathname.indexOf("/cellulib-book/");
  if (window.location.protocol.startsWith("http") && at >= 0) {
    href = window.location.pathname.slice(0, at) + "/lab/tree/" + source.content;
    title = "Open the chapter's source notebook in JupyterLab";
  }
  const link = document.createElement("a");
  link.id = "cellulib-source-link";
  link.href = href;
  link.title = title;
  link.className = "btn btn-sm";
  link.textContent = "Source notebook";
  link.style.fontSize = "0.85rem";
  const bar = document.querySelector(".article-header-buttons");
  if (bar) bar.prepend(link); else document.body.prepend(link);
}
if (document.readyState === "loading") {
  document.addEventListener("DOMContentLoaded", cellulibSourceLink);
} else {
  cellulibSourceLink();
}
