"""The command line, run as a user runs it (subprocess): help without torch, one-line errors, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _cli(args, cwd, timeout=180):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-m", "excise.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_help_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from excise.cli import app, main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "for sub in (['run', '--help'], ['inspect', '--help'], ['models', '--help']):\n"
        "    try:\n"
        "        main(sub)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (sub, e.code)\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('NO-TORCH-OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NO-TORCH-OK" in r.stdout and "inspect" in r.stdout and "run" in r.stdout


def test_models_lists_both_defaults(tmp_path):
    r = _cli(["models"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m-instruct" in r.stdout and "minilm-l6" in r.stdout
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in r.stdout
    assert _listing(tmp_path) == set()


def test_models_piped_is_plain_and_json(tmp_path):
    """Not a terminal: tab-separated, nothing truncated; --json: a list scripts can read."""
    import json

    r = _cli(["models"], tmp_path)
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == ["name", "kind", "hub_id", "status"] and "…" not in r.stdout
    assert {ln.split("\t")[0] for ln in lines[1:]} == {"smollm2-135m-instruct", "minilm-l6"}
    r = _cli(["models", "--json"], tmp_path)
    assert r.returncode == 0 and {m["name"] for m in json.loads(r.stdout)} == {"smollm2-135m-instruct", "minilm-l6"}
    assert r.stderr == ""


def test_unknown_model_offline_writes_nothing(tmp_path):
    r = _cli(["inspect", "--model", "nosuch/model", "--out", "X"], tmp_path)
    _assert_one_line_error(r, "nosuch/model")
    assert _listing(tmp_path) == set()


def _recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_workflow(tmp_path):
    p = _recipe(tmp_path, "workflow: nosuch\nout: out\n")
    line = _assert_one_line_error(_cli(["run", str(p)], tmp_path), "unknown workflow 'nosuch'", "r.yaml:workflow")
    assert "inspect" in line
    assert _listing(tmp_path) == {"r.yaml"}


def test_malformed_yaml(tmp_path):
    p = _recipe(tmp_path, "workflow: inspect\nout: out\ncategories: [Age, SES\nseed: 0\n")
    _assert_one_line_error(_cli(["run", str(p)], tmp_path), f"{p}:")
    assert _listing(tmp_path) == {"r.yaml"}


def test_recipe_not_a_mapping_and_missing(tmp_path):
    p = _recipe(tmp_path, "- just\n- a list\n")
    _assert_one_line_error(_cli(["run", str(p)], tmp_path), "mapping")
    _assert_one_line_error(_cli(["run", "no_such_recipe.yaml"], tmp_path), "recipe not found", "inspect.yaml")
    assert _listing(tmp_path) == {"r.yaml"}


def test_unknown_config_key(tmp_path):
    p = _recipe(tmp_path, "workflow: inspect\nout: out\nmodel: smollm2-135m-instruct\nn_promts: 3\n")
    _assert_one_line_error(_cli(["run", str(p)], tmp_path), f"{p}:4:n_promts", "unknown setting")
    p = _recipe(tmp_path, "workflow: inspect\nout: out\nn_prompts: 0\n")
    _assert_one_line_error(_cli(["run", str(p)], tmp_path), f"{p}:3:n_prompts")
    assert _listing(tmp_path) == {"r.yaml"}


def test_bad_command_line_value(tmp_path):
    r = _cli(["inspect", "--n-prompts", "0", "--out", "X"], tmp_path)
    _assert_one_line_error(r, "n_prompts")
    assert _listing(tmp_path) == set()


def test_corrupt_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{this is not json")
    p = _recipe(tmp_path, f"workflow: inspect\nout: {run}\nn_prompts: 1\n")
    _assert_one_line_error(_cli(["run", str(p)], tmp_path), "corrupt run directory", "--force")
    assert (run / "config.json").read_text() == "{this is not json"
    assert _listing(tmp_path) == {"r.yaml", "run", "run/config.json"}


def test_unsupported_architecture_dir(tmp_path):
    """A model directory of a family excise has no anatomy for (OPT); refused before any weight is read."""
    import json

    d = tmp_path / "opt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "opt", "architectures": ["OPTForCausalLM"],
                                                "hidden_size": 32, "num_hidden_layers": 1}))
    before = _listing(tmp_path)
    r = _cli(["inspect", "--model", str(d), "--out", "X"], tmp_path)
    _assert_one_line_error(r, "unsupported architecture family 'opt'")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("args, needle", [(["nosuchcommand"], "'excise --help'"),
                                          (["inspect", "--nosuchflag"], "'excise inspect --help'")])
def test_usage_errors_exit_2(tmp_path, args, needle):
    _assert_one_line_error(_cli(args, tmp_path), needle)


def test_bbq_bad_split_writes_nothing(tmp_path):
    r = _cli(["bbq", "localize", "--split-by", "sentences", "--out", "X"], tmp_path)
    _assert_one_line_error(r, "split_by")
    assert _listing(tmp_path) == set()


@pytest.mark.parametrize("args, needles", [
    (["run", "fisher_prunes_heads.yaml", "--set", "stages.1.locate.method=nope"], ["unknown localizer 'nope'"]),
    (["run", "fisher_prunes_heads.yaml", "--set", "stages.2.select.k=0"], ["stages.2.select", "k"]),
    (["run", "bbq_debias.yaml", "--set", "finetune.lora.r=0"], ["finetune.lora.r"]),
    (["bbq", "localize", "--set", "finetune.lora.alpha=16"], ["lora_alpha"]),
    (["concept", "unlearn", "--set", "unlearn.stepz=3"], ["unlearn.stepz", "unknown setting"]),
    (["run", "fisher_prunes_heads.yaml", "--set", "nokey"], ["KEY.PATH=VALUE"]),
])
def test_dotted_overrides_are_validated(tmp_path, args, needles):
    r = _cli([*args, "--out", str(tmp_path / "out")], cwd=tmp_path)
    _assert_one_line_error(r, *needles)
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    r = _cli(["inspect", "--n-prompts", "0", "--out", "X", "--debug"], tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ExciseError" in r.stderr
    assert _listing(tmp_path) == set()


def test_interrupt_exits_130(monkeypatch, capsys):
    from excise.cli import main
    from excise.models import defaults

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(defaults, "status", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["models"])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_internal_error_keeps_its_traceback(monkeypatch):
    """A real bug is not dressed up as bad input: it propagates (exit 1, with a traceback)."""
    from excise.cli import main
    from excise.models import defaults

    def bug(name):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(defaults, "status", bug)
    with pytest.raises(ZeroDivisionError):
        main(["models"])
