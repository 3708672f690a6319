"""The HTML report: tiny real runs of four workflows (each writes report.html as its last step), built
runs of two more, compare mode, bad input, and a real headless Chromium (skipped without one)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from excise.errors import ExciseError
from excise.io import atomic_write_json
from excise.report.html import render, write_report
from excise.report.plots import heatmap

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
VOID = {"meta", "link", "img", "br", "hr", "input", "col", "source", "wbr", "area", "base", "embed", "param", "track"}


class Page(HTMLParser):
    """Collects what the checks read, and fails on tags that do not nest."""

    def __init__(self, text: str):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.tables: list[dict] = []
        self._in: list[str] = []
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self.tables.append({"id": a.get("id"), "caption": "", "thead": False, "col_th": 0, "body_rows": 0,
                                "class": a.get("class", "")})
        elif tag in ("thead", "tbody", "tfoot", "caption"):
            if tag == "thead":
                self.tables[-1]["thead"] = True
            self._in.append(tag)
        elif tag == "th" and a.get("scope") == "col":
            self.tables[-1]["col_th"] += 1
        elif tag == "tr" and self._in and self._in[-1] == "tbody":
            self.tables[-1]["body_rows"] += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag in ("thead", "tbody", "tfoot", "caption"):
            self._in.pop()

    def handle_data(self, data):
        if self._in and self._in[-1] == "caption":
            self.tables[-1]["caption"] += data


def check_page(html: str, run_dirs: list[Path]) -> Page:
    """Structure every report must have: valid nesting, semantic tables, inlined images with alt text, no URLs."""
    page = Page(html)
    assert not page.errors, page.errors[:5]
    for t in page.tables:
        assert t["caption"].strip() and t["thead"] and t["col_th"] >= 1, t
    imgs = [a for tag, a in page.tags if tag == "img"]
    n_png = sum(1 for d in run_dirs for p in d.rglob("*.png") if not any(x.startswith(".") for x in p.parts))
    if len(run_dirs) == 1:
        assert len(imgs) == n_png
    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,") and a.get("alt", "").strip()
    for tag, a in page.tags:  # nothing that a browser would fetch
        for k in ("src", "href"):
            if k in a:
                assert a[k].startswith(("data:", "#")), (tag, a[k][:80])
    assert not re.search(r"""(?:src|href|url)\s*[=(]\s*["']?(?:https?:)?//""", html)
    for sec in ("verdict", "groups", "figures", "localized", "stages", "provenance"):
        assert f'<section id="{sec}"' in html
    return page


def table_by_caption(page: Page, text: str) -> dict:
    found = [t for t in page.tables if text in t["caption"]]
    assert found, [t["caption"] for t in page.tables]
    return found[0]


# --- tiny runs ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Real runs of four workflows at tiny sizes (about 40 s in all); each wrote report.html itself."""
    from excise.config import validate
    from excise.intervene.lora import FinetuneConfig
    from excise.locate.heads import HeadAttributionConfig
    from excise.recipes.bbq_debias import BBQDebiasConfig, run_bbq
    from excise.recipes.caption_bias import run_captions
    from excise.recipes.caption_config import CaptionBiasConfig, quick_variant
    from excise.recipes.fair_config import FairEncoderConfig
    from excise.recipes.fair_encoder import run_fair
    from excise.recipes.loader import find_recipe, run_recipe_file
    from excise.testing import save_tiny, tiny_handle

    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("EXCISE_CACHE", str(root / "cache"))
    out, res = {}, {}
    try:
        cfg = BBQDebiasConfig(model="tiny", categories=["Age", "SES"], per_category=8, pairs_per_category=6,
                              finetune_per_category=4, localize=HeadAttributionConfig(n_candidates=2),
                              finetune=FinetuneConfig(steps=2, batch_size=2, lr=1e-3), trace_items=2, n_boot=100)
        res["bbq"] = run_bbq(cfg, root / "bbq", load_base=lambda: tiny_handle("llama"))
        bert = save_tiny("bert", root / "bert")
        fair = {"model": str(bert), "train_limit": 64, "val_limit": 32, "cap_per_class": 40, "n_boot": 20,
                "plain": {"epochs": 1, "patience": 0, "batch_size": 16, "max_length": 32},
                "fair": {"epochs": 2, "patience": 0, "batch_size": 16, "max_length": 32, "lambda_adv": 1.0,
                         "lambda_eo": 1.0}, "baselines": {"eg_eps": [0.05]}}
        res["fair"] = run_fair(validate(FairEncoderConfig, fair), root / "fair")
        llama = save_tiny("llama", root / "llama")
        recipe = yaml.safe_load(find_recipe("fisher_prunes_heads.yaml").read_text())
        recipe.update(model=str(llama))
        recipe["task"].update({"categories": ["Age"], "eval_per_category": 4, "build_per_category": 2, "n_boot": 20})
        (root / "p.yaml").write_text(yaml.safe_dump(recipe))
        res["pipeline"] = run_recipe_file(root / "p.yaml", out=root / "pipeline")
        res["captions"] = run_captions(quick_variant(CaptionBiasConfig(threads=1)), root / "captions")
    finally:
        mp.undo()
    for k in res:
        out[k] = root / k
        assert res[k]["report_html"] == str(root / k / "report.html")
    return out


def _est(v, lo, hi, n=8):
    return {"value": v, "lo": lo, "hi": hi, "n": n, "method": "wilson"}


def _stage(d: Path, name: str, files: dict) -> None:
    (d / name).mkdir(parents=True)
    atomic_write_json(d / name / "stage.json", {"status": "done", "seconds": 1.5, "cpu_seconds": 1.4})
    for f, obj in files.items():
        atomic_write_json(d / name / f, obj)


@pytest.fixture()
def concept_run(tmp_path):
    """A concept run's files as the workflow writes them (the real one needs SmolLM2 to know the concept)."""
    d = tmp_path / "concept"
    d.mkdir()
    atomic_write_json(d / "config.json", {"workflow": "concept", "model": "smollm2-135m-instruct", "concept": "inception",
                                          "units": "neuron", "seed": 0})
    before = {"leak.direct": _est(1.0, 0.6, 1.0), "leak.paraphrase": _est(0.9, 0.5, 1.0),
              "leak.adversarial": _est(0.5, 0.2, 0.8), "leak.adv_roleplay": _est(0.5, 0.2, 0.8),
              "retain_accuracy": _est(1.0, 0.8, 1.0, 14), "neutral_perplexity": _est(20.0, 18.0, 22.0)}
    after = {"leak.direct": _est(0.0, 0.0, 0.08), "leak.paraphrase": _est(0.1, 0.0, 0.4),
             "leak.adversarial": _est(0.0, 0.0, 0.3), "leak.adv_roleplay": _est(0.0, 0.0, 0.3),
             "retain_accuracy": _est(0.71, 0.45, 0.88, 14), "neutral_perplexity": _est(20.2, 18.1, 22.3)}
    _stage(d, "screen", {"kept.json": {}})
    _stage(d, "before", {"metrics.json": before})
    _stage(d, "localize", {"localize.json": {"saliency": {"n_selected": 4, "per_layer": [2, 2], "seconds": 1.0,
                                                          "top_units": [{"layer": 1, "unit": 7, "score": 0.9}]}}})
    heatmap([[0.1, 0.9], [0.4, 0.2]], d / "localize" / "saliency_heads_saliency.png", title="saliency")
    _stage(d, "unlearn", {"after_metrics.json": after, "info.json": {"variant": "masked_saliency", "n_trainable": 100,
                                                                      "n_effective": 40, "delta_outside_mask": 0.0,
                                                                      "base_params_changed": 0, "steps": 4}})
    return d


@pytest.fixture()
def undo_run(tmp_path):
    d = tmp_path / "undo"
    d.mkdir()
    atomic_write_json(d / "config.json", {"workflow": "undo", "seeds": [0], "model": "arith"})

    def row(name, kind, forget, retain):
        return {"model": name, "kind": kind, "n_seeds": 3, "forget": forget, "forget_lo": forget - 0.02,
                "forget_hi": forget + 0.02, "retain": retain, "retain_lo": retain - 0.05, "retain_hi": retain + 0.05,
                "auc": 0.3, "auc_lo": 0.2, "auc_hi": 0.4, "steps_to_50": 5, "steps_to_50_lo": 3, "steps_to_50_hi": 7}
    rows = [row("base", "base", 0.9, 0.95), row("undo-global-a0.5", "undo-global", 0.01, 0.93),
            row("undo-fisher-a0.8", "undo-targeted", 0.3, 0.6)]
    _stage(d, "seed0-undo", {"metrics.json": {"undo-fisher-a0.8": {"kind": "undo-targeted", "alpha": 0.8,
                                                                   "noise": {"localizer": "fisher", "noised_fraction": 0.1},
                                                                   "accuracy": {"add": _est(0.9, 0.7, 1.0),
                                                                                "forget": _est(0.3, 0.1, 0.5)}}}})
    _stage(d, "report", {"comparison.json": {"rows": rows, "base_retain": 0.95, "seeds": [0],
                                             "verdict": {"answer": "no", "rule": "r", "best_global": "undo-global-a0.5",
                                                         "caveats": []}}})
    return d


# --- the builder ---------------------------------------------------------------------------------------

def test_bbq_report(runs):
    d = runs["bbq"]
    html = (d / "report.html").read_text(encoding="utf-8")
    page = check_page(html, [d])
    assert "s_AMB (bias, ambiguous contexts)" in html and "Disambiguated accuracy falls by at most 5 points" in html
    assert html.index('id="verdict"') < html.index('id="groups"') < html.index('id="provenance"')
    t = table_by_caption(page, "eval_before/bias_scores.json")
    assert t["body_rows"] == 2 and "sortable" in t["class"]  # Age and SES
    assert "soft-pruned heads" in html and "Heads ranked by the localizer" in html
    info = json.loads((d / "run.json").read_text())
    assert info["stages"]["localize"]["cpu_seconds"] >= 0 and info["seeds"]["seed"] == 0 and info["torch_threads"] == 1
    assert "commit" in info["git"] and "cpu_seconds" in json.loads((d / "localize" / "stage.json").read_text())
    for fact in ("git commit", "torch threads", "library versions", "transformers", "CPU s", "eval_after"):
        assert fact in html


def test_fair_report(runs):
    d = runs["fair"]
    html = (d / "report.html").read_text(encoding="utf-8")
    page = check_page(html, [d])
    assert "Fair LoRA&#39;s EO difference is at most half of plain LoRA&#39;s" in html
    assert re.search(r'class="status">(met|not met|uncertain)</span> Fair LoRA', html)
    assert table_by_caption(page, "plain/test.json")["body_rows"] == 2  # female, male
    assert table_by_caption(page, "Every method on the test split")["body_rows"] >= 4
    assert "pareto.png" in html and "lower right" in html.lower()


def test_pipeline_report(runs):
    d = runs["pipeline"]
    html = (d / "report.html").read_text(encoding="utf-8")
    page = check_page(html, [d])
    head = table_by_caption(page, "first measurement (base) against the last")
    assert head["col_th"] == 4  # metric, base, localized, random
    assert "No targets are stated for this workflow" in html and "03-select" in html


def test_captions_report(runs):
    d = runs["captions"]
    html = (d / "report.html").read_text(encoding="utf-8")
    page = check_page(html, [d])
    for lang in ("en", "ar"):
        assert f"Gender-swap LoRA at least halves the stereotype gap ({lang})" in html
        assert table_by_caption(page, f"before/gender_{lang}.json")["body_rows"] == 4  # four contexts
    assert "Activation patching" in html and "examples/" in html


def test_concept_and_undo_reports(concept_run, undo_run):
    html = render([concept_run])
    page = check_page(html, [concept_run])
    assert re.search(r'class="status">met</span> Direct probes leak', html)
    assert re.search(r'class="status">not met</span> Retain accuracy falls', html)
    assert table_by_caption(page, "Leak by adversarial probe family")["body_rows"] == 1
    html = render([undo_run])
    page = check_page(html, [undo_run])
    assert re.search(r'class="status">met</span> undo-global-a0.5: forget', html)
    assert re.search(r'class="status">not met</span> undo-fisher-a0.8', html)
    assert table_by_caption(page, "Accuracy by operation")["body_rows"] == 1
    (undo_run / "config.json").write_text(json.dumps({"workflow": "inspect", "model": "m"}))  # no verdict hook
    html = render([undo_run])
    check_page(html, [undo_run])
    assert "No verdict for workflow &#39;inspect&#39;" in html


def test_compare_two_runs(runs, tmp_path):
    a = runs["pipeline"]
    b = tmp_path / "pipeline_b"
    shutil.copytree(a, b)
    cfg = json.loads((b / "config.json").read_text())
    cfg["seed"] = 7
    (b / "config.json").write_text(json.dumps(cfg))
    out = write_report([a, b], tmp_path / "cmp.html")
    html = out.read_text(encoding="utf-8")
    page = check_page(html, [a, b])
    assert "A (pipeline)" in html and "B (pipeline_b)" in html
    diff = table_by_caption(page, "Settings that differ")
    assert diff["body_rows"] == 1 and ">seed<" in html
    cmp_ = table_by_caption(page, "01-measure/base.json: A (pipeline) against B (pipeline_b)")
    assert cmp_["col_th"] == 4 and cmp_["body_rows"] > 0


def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys):
    from excise.cli import main

    cases = [([str(tmp_path)], "is not a run directory"), ([str(tmp_path / "nope")], "is not a directory"),
             ([str(runs["bbq"]), str(runs["fair"])], "cannot compare runs of different workflows"),
             ([str(runs["bbq"])] * 3, "one run directory, or two")]
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(["report", *args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1, err
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ExciseError, match="config.json:1"):
        render([tmp_path])


def test_cli_writes_the_report(runs, tmp_path, capsys):
    from excise.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", str(runs["pipeline"]), "--out", str(tmp_path / "r.html")])
    assert e.value.code == 0
    assert f"report: {tmp_path / 'r.html'}" in capsys.readouterr().out
    assert (tmp_path / "r.html").stat().st_size > 1000


# --- a real browser ------------------------------------------------------------------------------------

CHECK = """<script>window.__errs = [];
window.addEventListener("error", function (e) { __errs.push("error: " + e.message); });
document.addEventListener("securitypolicyviolation", function (e) { __errs.push("csp: " + e.blockedURI); });
["error", "warn"].forEach(function (k) { var f = console[k]; console[k] = function () {
  __errs.push(k + ": " + Array.prototype.join.call(arguments, " ")); f.apply(console, arguments); }; });
</script>"""
REPORT = """<script>window.addEventListener("load", function () {
  var t = document.querySelector("table.sortable"), col = 1, before = [], after = [];
  function vals() { return Array.prototype.map.call(t.tBodies[0].rows, function (r) {
    var c = r.cells[col]; return c.getAttribute("data-v") === null ? null : parseFloat(c.getAttribute("data-v")); }); }
  var b = t.tHead.rows[0].cells[col].querySelector("button");
  before = vals(); b.click(); b.click(); after = vals();
  var out = document.createElement("pre"); out.id = "__check";
  out.textContent = JSON.stringify({errs: __errs, images: Array.prototype.map.call(document.images,
    function (i) { return i.complete ? i.naturalWidth : -1; }), sorted: after, before: before,
    rows: Array.prototype.map.call(document.querySelectorAll("table"), function (x) { return x.tBodies[0].rows.length; }),
    aria: t.tHead.rows[0].cells[col].getAttribute("aria-sort")});
  document.body.appendChild(out); });</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_in_a_headless_browser(runs, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on PATH: install it with `apt-get install -y chromium` (or chromium-browser)")
    src = runs["captions"] / "report.html"
    html = src.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("<head>", "<head>" + CHECK, 1).replace("</body>", REPORT + "</body>", 1),
                     encoding="utf-8")
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    res = subprocess.run(flags + ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                                  probe.as_uri()], capture_output=True, text=True, timeout=60)
    m = re.search(r'<pre id="__check">(.*?)</pre>', res.stdout, re.S)
    assert m, res.stderr[-2000:]
    got = json.loads(unescape(m.group(1)))
    assert got["errs"] == []
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console[:5]  # the page logs nothing: any console line is an error or a warning
    n_png = sum(1 for _ in runs["captions"].rglob("*.png"))
    assert len(got["images"]) == n_png and all(w > 0 for w in got["images"]), got["images"]
    assert got["aria"] == "descending"
    nums = [v for v in got["sorted"] if v is not None]
    assert nums == sorted(nums, reverse=True) and sorted(got["before"], key=str) == sorted(got["sorted"], key=str)
    page = Page(html)
    assert got["rows"] == [t["body_rows"] or 1 for t in page.tables]  # an empty table shows one "none" row
    shot = tmp_path / "report_captions.png"
    subprocess.run(flags + ["--window-size=1280,2400", f"--screenshot={shot}", src.as_uri()], capture_output=True,
                   timeout=60)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("EXCISE_SAVE_SCREENSHOT"):  # refresh the picture in docs/report.md
        shutil.copy(shot, ROOT / "docs" / "img" / "report_captions.png")
