"""The documentation site and the journal: a real `mkdocs build --strict`, a real run's journal post,
and the built pages read by a real headless Chromium.

Each site is built from copies of the repo's mkdocs.yml, docs/ and the files its pages include, so
that a test never writes into the repo.
"""

import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import fields
from pathlib import Path

import pytest
from pydantic import BaseModel

from diffusion.config import RunConfig
from ops.settings import Settings
from ops.spec import JobSpec
from tests.ops_project import make_project, ops, ops_json

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")


def copy_site_sources(root: Path) -> None:
    """mkdocs.yml, docs/ without the repo's own journal posts, and the files the pages include."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "mkdocs.yml", root)
    shutil.copytree(
        REPO / "docs",
        root / "docs",
        ignore=lambda folder, names: ["posts"] if Path(folder) == REPO / "docs/blog" else [],
    )
    for page in (REPO / "docs").rglob("*.md"):
        for name in re.findall(r'^--8<-- "([^":]+)', page.read_text(), re.M):
            shutil.copy(REPO / name, root / name)


def build(root: Path) -> Path:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", "site"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    return root / "site"


def leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path a YAML file can set in `model`, sections followed down to their leaves."""
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            paths += leaf_paths(nested, path + ".")
        else:
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def docs_site(tmp_path_factory) -> Path:
    """The site as the repo has it, no journal posts."""
    root = tmp_path_factory.mktemp("docs")
    copy_site_sources(root)
    return build(root)


def test_job_spec_reference_lists_every_schema_key(docs_site):
    page = (docs_site / "reference/job-spec/index.html").read_text()
    paths = leaf_paths(JobSpec)
    # The run section is RunConfig itself: its keys must be there, under run.
    assert {f"run.{path}" for path in leaf_paths(RunConfig)} <= set(paths)
    assert {"resources.local.threads", "resources.slurm.partition", "resources.vertex.accelerator_type"} <= set(paths)
    missing = [path for path in paths if f"<code>{path}</code>" not in page]
    assert not missing, f"not in the generated reference: {missing}"
    # Defaults and allowed values come from the schema too.
    row = re.search(r"<code>run.train.ema_decay</code>.*?</tr>", page, re.S).group()
    assert "<code>0.999</code>" in row and "&gt;= 0.0" in row and "&lt; 1.0" in row
    row = re.search(r"<code>run.method.beta_schedule</code>.*?</tr>", page, re.S).group()
    assert "<code>linear</code>" in row and "<code>cosine</code>" in row


def test_settings_reference_lists_every_key_and_its_variable(docs_site):
    page = (docs_site / "reference/settings/index.html").read_text()
    for field in fields(Settings):
        assert f"<code>{field.name}</code>" in page and f"<code>OPS_{field.name.upper()}</code>" in page, field.name
    row = re.search(r"<code>runs_dir</code>.*?</tr>", page, re.S).group()
    assert "<code>runs</code>" in row and "run directories" in row  # the default, and the source's comment


def test_agents_page_is_claude_md(docs_site):
    text = html.unescape(re.sub(r"<[^>]+>", "", (docs_site / "agents/index.html").read_text()))
    headings = re.findall(r"^## (.+)$", (REPO / "CLAUDE.md").read_text(), re.M)
    assert headings
    for heading in headings:
        assert heading.replace("`", "") in text, heading


# A page of our own beside the architecture page: it loads it in a frame, waits for the theme to
# draw its mermaid diagrams and reports each one's size. The theme replaces each <pre class="mermaid">
# source by a <div class="mermaid"> holding the drawing in a closed shadow root (no script, and no
# --dump-dom, can look inside), so what can be seen is the element and the room the drawing takes.
DIAGRAM_PROBE = """<!doctype html>
<html><body>
<iframe id="page" src="/architecture/" width="1280" height="3000"></iframe>
<pre id="report">not drawn</pre>
<script>
function report() {
  const blocks = [...document.getElementById("page").contentDocument.querySelectorAll(".mermaid")];
  const drawn = blocks.map((block) => block.tagName === "DIV" ?
    {width: block.getBoundingClientRect().width, height: block.getBoundingClientRect().height} : null);
  if (blocks.length && drawn.every(Boolean)) document.getElementById("report").textContent = JSON.stringify(drawn);
  else setTimeout(report, 100);
}
window.addEventListener("load", report);
</script>
</body></html>
"""


def serve(site: Path):
    """`site` on 127.0.0.1 in a thread; returns (base URL, server)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=site))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def test_architecture_diagrams_are_drawn_offline(docs_site):
    """The layer diagrams are mermaid blocks that the theme draws with the repo's own mermaid.js (no
    CDN: Chromium here has no network)."""
    (docs_site / "diagram-probe.html").write_text(DIAGRAM_PROBE)
    url, server = serve(docs_site)
    try:
        dom = dump_dom(f"{url}/diagram-probe.html", wait_ms=20000)
    finally:
        server.shutdown()
        server.server_close()
    report = html.unescape(re.search(r'<pre id="report">(.*?)</pre>', dom, re.S).group(1))
    assert report != "not drawn", "the mermaid diagrams were not drawn"
    diffusion_layers, ops_layers = json.loads(report)
    # Drawn, not left as source: seven layers of boxes stand far taller than a line of text.
    assert diffusion_layers["height"] > 600 and diffusion_layers["width"] > 300, diffusion_layers
    assert ops_layers["height"] > 300, ops_layers


# ---------------------------------------------------------------------------------------------
# The journal: a real run, its post, the site built with it, read by Chromium


@pytest.fixture(scope="module")
def journal_site(tmp_path_factory):
    """A project with the real site sources, one tiny run to SUCCEEDED, its post, the built site.
    Returns (site dir, ops id)."""
    data_root = os.environ.get("DIFFUSION_DATA_ROOT")
    if not data_root or not (Path(data_root) / "MNIST/raw/train-images-idx3-ubyte").is_file():
        pytest.skip("set DIFFUSION_DATA_ROOT to a folder holding MNIST/raw/ (see README)")
    root = tmp_path_factory.mktemp("journal") / "project"
    copy_site_sources(root)
    make_project(root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DIFFUSION_DATA_ROOT", str(Path(data_root).resolve()))  # the run inherits it
        [run] = ops_json(root, "submit", "tiny")["runs"]
        waited = ops(root, "wait", run["ops_id"], "--interval", "0.3")
        assert waited.returncode == 0, waited.stdout + waited.stderr
        synced = ops(root, "sync")
        assert synced.returncode == 0, synced.stderr
    # The run's end wrote its post (a follow-up of `ops wait` / `ops sync`) and recorded where.
    ops_id = run["ops_id"]
    posts = sorted((root / "docs/blog/posts").glob(f"*-{ops_id}.md"))
    assert len(posts) == 1, posts
    assert ops_json(root, "monitor", ops_id)["journal_post"] == str(posts[0])
    return build(root), ops_id


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(journal_site):
    """The built journal site on 127.0.0.1; yields (base URL, site dir, ops id)."""
    site, ops_id = journal_site
    url, server = serve(site)
    yield url, site, ops_id
    server.shutdown()
    server.server_close()


def dump_dom(url: str, wait_ms: int | None = None) -> str:
    """The page's DOM after it loaded (scripts run; with `wait_ms`, for up to that much virtual
    time after), from a headless Chromium with a fresh profile."""
    if not CHROMIUM:
        pytest.skip("chromium not installed: apt-get install -y chromium (.ci/run installs it)")
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--window-size=1280,900",
                *([f"--virtual-time-budget={wait_ms}"] if wait_ms else []),
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_site_with_a_post_builds_strict(journal_site):
    site, ops_id = journal_site
    assert (site / "blog" / ops_id / "index.html").is_file()  # post_url_format "{slug}": blog/OPS_ID/
    # Posts are tagged with their engine and final state, and listed under each tag.
    tags = (site / "tags/index.html").read_text()
    for tag in ("local", "succeeded"):
        listed = re.search(rf'id="tag:{tag}".*?</ul>', tags, re.S)
        assert listed and f'href="../blog/{ops_id}/"' in listed.group(), f"{ops_id} not listed under the tag {tag}"


def test_journal_index_lists_the_post(served):
    url, site, ops_id = served
    dom = dump_dom(f"{url}/blog/")
    # The post's title, linking to the post.
    assert re.search(rf'<a [^>]*href="{ops_id}/"[^>]*>\s*{ops_id}:', dom), f"no link to {ops_id} on the journal index"


def test_post_page_shows_its_title_and_metrics(served):
    url, site, ops_id = served
    dom = dump_dom(f"{url}/blog/{ops_id}/")
    title = re.search(r"<h1[^>]*>(.*?)</h1>", dom, re.S)
    assert title and f"{ops_id}:" in re.sub(r"<[^>]+>", "", title.group(1))
    tables = re.findall(r"<table>.*?</table>", dom, re.S)
    assert any("<td>loss</td>" in table for table in tables), "no metrics table with the loss on the post page"


# A page of our own in the served site: it loads the post in a frame and reports, for each image of
# the post, whether it loaded, its size and how many grey levels it has (blank: one).
IMAGE_PROBE = """<!doctype html>
<html><body>
<iframe id="post" src="/blog/OPS_ID/" width="1280" height="6000"></iframe>
<pre id="report">not loaded</pre>
<script>
window.addEventListener("load", () => {
  const images = [...document.getElementById("post").contentDocument.querySelectorAll("img")];
  const report = images.map((img) => {
    const levels = new Set();
    if (img.naturalWidth > 0) {
      const canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      const context = canvas.getContext("2d");
      context.drawImage(img, 0, 0);
      const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 0; i < pixels.length; i += 4) levels.add(pixels[i] + "," + pixels[i + 1] + "," + pixels[i + 2]);
    }
    return {src: img.currentSrc, complete: img.complete, width: img.naturalWidth, levels: levels.size};
  });
  document.getElementById("report").textContent = JSON.stringify(report);
});
</script>
</body></html>
"""


def test_post_images_load_and_are_not_blank(served):
    url, site, ops_id = served
    (site / "image-probe.html").write_text(IMAGE_PROBE.replace("OPS_ID", ops_id))
    dom = dump_dom(f"{url}/image-probe.html")
    report = json.loads(html.unescape(re.search(r'<pre id="report">(.*?)</pre>', dom, re.S).group(1)))
    images = {Path(image["src"]).name: image for image in report}
    for name in ("samples.png", "loss.png"):
        assert name in images, f"{name} not on the post page: {report}"
        image = images[name]
        assert image["complete"] and image["width"] > 0, f"{name} did not load: {image}"
        assert image["levels"] > 8, f"{name} is blank: {image}"
