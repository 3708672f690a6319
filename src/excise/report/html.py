"""One self-contained HTML report for any run directory (``excise report RUN [RUN_B]``).

Built from the run directory alone: ``config.json``, ``run.json``, each stage's ``stage.json`` and
``metrics.json``, every grouped result (a JSON with ``overall`` and ``by_group``), every PNG
(inlined as a data URI) and the workflow's verdict hook (:mod:`excise.report.verdicts`). Nothing is
fetched from the network (a Content-Security-Policy says so), and the page reads without JavaScript;
a few lines of inline script only make the tables sortable. Two runs of one workflow are compared
side by side.
"""

from __future__ import annotations

import base64
import json
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import jinja2

from excise.errors import ExciseError
from excise.io import atomic_write_text, read_json
from excise.report.blocks import STATUSES, cell, change, figure_caption, is_est, num, table
from excise.report.verdicts import verdict
from excise.run import is_main_process

TEMPLATE = "report.html.j2"
MAX_JSON_BYTES = 5_000_000  # larger JSON files (traces, item dumps) are never grouped results
# config keys that say which data a run used
DATA_KEYS = ("task", "data", "concept", "categories", "langs", "user_data", "forget_file", "retain_file", "binary")


class RunView:
    """A finished (or partial) run directory, read once."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise ExciseError(f"{self.dir} is not a directory; pass a run directory (the --out of a run)")
        if not (self.dir / "config.json").is_file():
            raise ExciseError(f"{self.dir} is not a run directory: it has no config.json")
        cfg = read_json(self.dir / "config.json")
        if not isinstance(cfg, dict):
            raise ExciseError("config.json is not a mapping", where=str(self.dir / "config.json"))
        self.config: dict[str, Any] = cfg
        self.workflow = str(cfg.get("workflow", "unknown"))
        info = read_json(self.dir / "run.json") if (self.dir / "run.json").is_file() else {}
        self.info: dict[str, Any] = info if isinstance(info, dict) else {}
        found = [(p, read_json(p / "stage.json")) for p in self.dir.iterdir()
                 if p.is_dir() and not p.name.startswith(".") and (p / "stage.json").is_file()]
        order = list(self.info.get("stages") or {})
        # completion order: run.json's record where it has one, else when stage.json was written
        found.sort(key=lambda x: (order.index(x[0].name) if x[0].name in order else len(order),
                                  (x[0] / "stage.json").stat().st_mtime))
        self.stages: list[tuple[str, dict]] = [(p.name, s if isinstance(s, dict) else {}) for p, s in found]

    def files(self, pattern: str) -> list[Path]:
        """Files of the stages (in stage order), never from hidden or temporary folders."""
        out = []
        for name, _ in self.stages:
            out += sorted(p for p in (self.dir / name).rglob(pattern)
                          if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.dir).parts))
        return out

    def grouped(self) -> dict[str, dict]:
        """Every grouped result of the run by relative path, in the one shape the tables read."""
        out = {}
        for p in self.files("*.json"):
            if p.stat().st_size > MAX_JSON_BYTES or p.name in ("stage.json", "metrics.json"):
                continue
            try:
                d = read_json(p)
            except ExciseError:
                continue
            g = as_grouped(d)
            if g is not None:
                out[str(p.relative_to(self.dir))] = g
        return out


def as_grouped(d: Any) -> dict | None:
    """A GroupedResult JSON (``overall``, ``by_group``, ``differences``), or BBQ's bias scores
    (``overall``, ``groups``), as {group_by, overall, by_group, differences} of estimates; else None."""
    if not isinstance(d, dict) or not isinstance(d.get("overall"), dict):
        return None
    groups = d.get("by_group") if isinstance(d.get("by_group"), dict) else d.get("groups")
    if not isinstance(groups, dict) or ("by_group" not in d and "differences" not in d and "groups" not in d):
        return None

    def ests(m: Any) -> dict:
        return {k: v for k, v in (m or {}).items() if is_est(v)} if isinstance(m, dict) else {}

    overall = ests(d["overall"])
    if not overall:
        return None
    return {"group_by": d.get("group_by", "group"), "overall": overall,
            "by_group": {str(g): ests(m) for g, m in groups.items()}, "differences": ests(d.get("differences")),
            "method": (d.get("meta") or {}).get("method", "")}


def grouped_table(rel: str, g: dict) -> dict:
    """One grouped result: a row per group, a column per metric; overall and between-group gaps in the footer."""
    metrics = list(g["overall"])
    rows = [(grp, *(ms.get(m) for m in metrics)) for grp, ms in g["by_group"].items()]
    foot = [("overall", *(g["overall"].get(m) for m in metrics))]
    if g["differences"]:
        foot.append(("largest gap between groups", *(g["differences"].get(m, "") for m in metrics)))
    what = f" ({g['method']})" if g["method"] else ""
    return table(f"{rel}{what}: metrics by {g['group_by']} (95% CI)", [g["group_by"], *metrics], rows, foot=foot)


def compare_table(rel: str, a: dict, b: dict, labels: Sequence[str]) -> dict:
    """The same grouped result from two runs: a row per (scope, metric), with B - A."""
    rows = []
    for scope, ga, gb in [("overall", a["overall"], b["overall"])] + \
            [(f"{a['group_by']}={k}", a["by_group"][k], b["by_group"].get(k, {})) for k in a["by_group"]] + \
            [("largest gap", a["differences"], b["differences"])]:
        for m, e in ga.items():
            rows.append((f"{scope} / {m}", cell(e), cell(gb.get(m)), change(e, gb.get(m))))
    return table(f"{rel}: {labels[0]} against {labels[1]} (95% CI)", ["scope / metric", *labels, f"{labels[1]} - {labels[0]}"],
                 rows)


def _png(p: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def figures(runs: Sequence[RunView], labels: Sequence[str]) -> list[dict]:
    """Every PNG of every run, matched by path across runs, with what to look for."""
    by_rel: dict[str, list[Any]] = {}
    for i, r in enumerate(runs):
        for p in r.files("*.png"):
            by_rel.setdefault(str(p.relative_to(r.dir)), [None] * len(runs))[i] = p
    out = []
    for rel, ps in by_rel.items():
        what = figure_caption(rel)
        items = [{"label": lab, "src": _png(p) if p else None,
                  "alt": f"{rel}{' (' + lab + ')' if lab else ''}: {what}"} for lab, p in zip(labels, ps)]
        out.append({"rel": rel, "caption": what, "items": items})
    return out


def provenance(r: RunView) -> dict:
    """Config, seeds, model, data, versions, commit, threads, and wall and CPU seconds per stage."""
    info, cfg = r.info, r.config
    git = info.get("git") or {}
    commit = git.get("commit") or "n/a (not recorded, or not a git checkout)"
    facts = [("run directory", str(r.dir.resolve())), ("workflow", r.workflow), ("created", info.get("created", "n/a")),
             ("model", str(cfg.get("model", "n/a"))),
             ("data", "; ".join(f"{k}: {json.dumps(cfg[k])}" for k in DATA_KEYS if cfg.get(k) not in (None, [], {})) or "n/a"),
             ("seeds", ", ".join(f"{k} = {v}" for k, v in (info.get("seeds") or {}).items()) or
              str(cfg.get("seed", cfg.get("seeds", "n/a")))),
             ("git commit", commit + (" (uncommitted changes)" if git.get("dirty") else "")),
             ("torch threads", str(info.get("torch_threads", "n/a"))),
             ("platform", ", ".join(f"{k} {v}" for k, v in (info.get("platform") or {}).items()) or "n/a"),
             ("library versions", ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items()) or "n/a")]
    rows, wall, cpu = [], 0.0, 0.0
    for name, st in r.stages:
        w, c = st.get("seconds"), st.get("cpu_seconds")
        wall += w or 0.0
        cpu += c or 0.0
        rows.append((name, st.get("status", "n/a"), w, c, None if not w or c is None else c / w))
    timings = table("Wall and CPU time per stage, in completion order (a resumed stage keeps the time it took "
                    "when it ran)", ["stage", "status", "wall s", "CPU s", "CPU / wall"], rows,
                    foot=[("total", "", wall, cpu if any(s.get("cpu_seconds") is not None for _, s in r.stages) else None,
                           cpu / wall if wall and cpu else None)])
    return {"facts": facts, "timings": timings, "config": json.dumps(cfg, indent=2, ensure_ascii=False)}


def stage_metrics(r: RunView) -> list[dict]:
    """Each stage's metrics.json as key/value rows (nested keys dotted, long values cut)."""
    out = []
    for name, _ in r.stages:
        p = r.dir / name / "metrics.json"
        if not p.is_file():
            continue
        rows = _flat(read_json(p))
        out.append(table(f"{name}/metrics.json", ["key", "value"], rows[:400],
                         note=f"{len(rows) - 400} more rows in the file" if len(rows) > 400 else ""))
    return out


def _flat(m: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(m, list):
        return [(prefix.rstrip(".") or "value", json.dumps(m)[:200])]
    if not isinstance(m, dict):
        return [(prefix.rstrip(".") or "value", m)]
    out: list[tuple[str, Any]] = []
    for k, v in m.items():
        if isinstance(v, dict) and not is_est(v):
            out += _flat(v, f"{prefix}{k}.")
        elif isinstance(v, list):
            out.append((f"{prefix}{k}", json.dumps(v)[:200]))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def config_diff(runs: Sequence[RunView], labels: Sequence[str]) -> dict:
    fa, fb = dict(_flat(runs[0].config)), dict(_flat(runs[1].config))
    rows = [(k, str(fa.get(k, "absent")), str(fb.get(k, "absent"))) for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k)]
    return table("Settings that differ between the runs", ["setting", *labels], rows,
                 note="" if rows else "The two runs have the same settings.")


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("excise.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["num"] = num
    return env


def render(paths: Sequence[str | Path]) -> str:
    """The report's HTML for one run, or two runs of the same workflow side by side."""
    if not 1 <= len(paths) <= 2:
        raise ExciseError(f"excise report takes one run directory, or two to compare; got {len(paths)}")
    runs = [RunView(p) for p in paths]
    if len(runs) == 2 and runs[0].workflow != runs[1].workflow:
        raise ExciseError(f"cannot compare runs of different workflows: {runs[0].dir} is '{runs[0].workflow}', "
                          f"{runs[1].dir} is '{runs[1].workflow}'")
    labels = [""] if len(runs) == 1 else [f"A ({runs[0].dir.name})", f"B ({runs[1].dir.name})"]
    if len(runs) == 2 and labels[0] == labels[1]:
        labels = ["A", "B"]
    grouped = [r.grouped() for r in runs]
    if len(runs) == 1:
        tables = [grouped_table(rel, g) for rel, g in grouped[0].items()]
    else:
        tables = [compare_table(rel, g, grouped[1][rel], labels) if rel in grouped[1]
                  else grouped_table(f"{rel} (only in {labels[0]})", g) for rel, g in grouped[0].items()]
        tables += [grouped_table(f"{rel} (only in {labels[1]})", g) for rel, g in grouped[1].items() if rel not in grouped[0]]
    views = [{"label": lab, "dir": str(r.dir), "verdict": verdict(r.dir, r.config), "provenance": provenance(r),
              "metrics": stage_metrics(r)} for lab, r in zip(labels, runs)]
    for v in views:
        v["counts"] = {s: sum(t["status"] == s for t in v["verdict"]["targets"]) for s in STATUSES}
        for t in v["verdict"]["groups"] if v["label"] else []:  # compare mode shows both runs' tables in one list
            t["caption"] = f"{v['label']}: {t['caption']}"
    for i, t in enumerate([t for v in views for t in v["verdict"]["headline"] + v["verdict"]["groups"]
                           + v["verdict"]["localized"] + v["metrics"] + [v["provenance"]["timings"]]] + tables):
        t["id"] = f"t{i}"
    try:
        ver = version("excise")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        ver = "unknown"
    title = (f"excise report: {runs[0].workflow} workflow, run '{runs[0].dir.name}'" if len(runs) == 1 else
             f"excise report: {runs[0].workflow} workflow, runs '{runs[0].dir.name}' and '{runs[1].dir.name}' compared")
    diff = config_diff(runs, labels) if len(runs) == 2 else None
    if diff is not None:
        diff["id"] = "tdiff"
    return _env().get_template(TEMPLATE).render(
        title=title, workflow=runs[0].workflow, runs=views, compare=len(runs) == 2, tables=tables,
        figures=figures(runs, labels), config_diff=diff, built=time.strftime("%Y-%m-%d %H:%M:%S"), version=ver)


def write_report(paths: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write the report (default: ``<run>/report.html``, or ``<run A>/compare_<run B name>.html``); returns its path."""
    paths = [Path(p) for p in paths]
    html = render(paths)
    if out is None:
        out = paths[0] / ("report.html" if len(paths) == 1 else f"compare_{paths[1].name}.html")
    return atomic_write_text(Path(out), html)


def end_of_run(run_dir: str | Path, console: Any = None) -> str:
    """The last step of every workflow: write ``<run>/report.html`` and print where it is ("" when no
    stage ever started, so there is no run to report on)."""
    if not (Path(run_dir) / "config.json").is_file() or not is_main_process():
        return ""
    path = write_report([run_dir])
    if console is not None:
        console.print(f"report: {path}", markup=False, highlight=False)
    return str(path)
