"""Typed configs: validate a dict against a pydantic model, failing with one line naming the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator

from excise.errors import ExciseError

T = TypeVar("T")


SEED_MAX = 2**31 - 1  # numpy takes seeds below 2**32; workflows derive others as seed + offset
DEVICE = re.compile(r"^(cpu|mps|meta|(cuda|xpu|npu|hpu)(:\d+)?)$")


def check_device(device: str) -> str:
    """A device string torch understands (cpu, cuda, cuda:1, mps, ...), checked without importing torch."""
    if not isinstance(device, str) or not DEVICE.match(device.strip()):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps")
    return device.strip()


Device = Annotated[str, AfterValidator(check_device)]


def _check_seeds(data: Any, loc: tuple = ()) -> tuple[tuple, str] | None:
    """(location, message) of the first setting named ``seed``/``seeds`` outside [0, SEED_MAX], else None.

    One rule for every config, so a seed numpy would refuse mid-run is refused before anything starts.
    """
    def bad(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= SEED_MAX

    if isinstance(data, dict):
        for k, v in data.items():
            if str(k).endswith("seed") and bad(v):
                return loc + (k,), f"a seed must be between 0 and {SEED_MAX}, got {v}"
            if str(k).endswith("seeds") and isinstance(v, list):
                for i, x in enumerate(v):
                    if bad(x):
                        return loc + (k, i), f"a seed must be between 0 and {SEED_MAX}, got {x}"
            found = _check_seeds(v, loc + (k,))
            if found:
                return found
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found = _check_seeds(v, loc + (i,))
            if found:
                return found
    return None


def setting_error(source: str | Path, loc: tuple, msg: str) -> ExciseError:
    """An ExciseError naming ``source:line:field`` of a setting (the line when ``source`` is a YAML file), for
    checks a config cannot make alone (e.g. ``select.k`` against the number of heads of the loaded model)."""
    path, prefix = _split_source(source)
    loc = prefix + tuple(loc)
    field = ".".join(str(p) for p in loc) or "?"
    line = _yaml_line(path, loc)
    return ExciseError(msg, where=f"{path}:{line}:{field}" if line else f"{path}:{field}")


def _split_source(source: str | Path) -> tuple[str, tuple]:
    """``recipe.yaml:stages.1.select`` (a YAML file and where inside it) -> (path, ('stages', 1, 'select'))."""
    m = re.match(r"^(.*?\.ya?ml):([A-Za-z_][\w.]*)$", str(source))
    if not m:
        return str(source), ()
    return m.group(1), tuple(int(p) if p.isdigit() else p for p in m.group(2).split("."))


def validate(model_cls: type[T], data: Any, source: str | Path = "config") -> T:
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise ExciseError(f"expected a mapping of settings, got {type(data).__name__}", where=str(source))
    bad_seed = _check_seeds(data)
    if bad_seed:
        raise setting_error(source, *bad_seed)
    try:
        return model_cls.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err.get("loc", ()))
        msg = " ".join(str(err.get("msg", "invalid value")).split())  # one line, whatever the validator wrote
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown setting"
        raise setting_error(source, loc, msg) from None


def _yaml_line(source: str | Path, loc: tuple) -> int | None:
    """1-based line of the setting ``loc`` in a YAML file (None if ``source`` is not one, or it is absent)."""
    p = Path(str(source))
    if p.suffix not in (".yaml", ".yml") or not p.is_file():
        return None
    try:
        import yaml

        node = yaml.compose(p.read_text(encoding="utf-8"))
    except Exception:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def load_yaml(path: str | Path) -> Any:
    """Read YAML; a syntax error becomes a one-line ExciseError naming file and line."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ExciseError("file not found", where=str(path))
    if not path.is_file():
        raise ExciseError("not a file", where=str(path))
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ExciseError("not a UTF-8 text file", where=str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ExciseError(str(problem), where=f"{path}{line}") from None


def apply_overrides(data: Any, overrides: list[str] | tuple[str, ...], source: str = "--set") -> Any:
    """Apply dotted ``key.path=value`` overrides (``finetune.lora.r=16``, ``stages.2.intervene.scale=0.5``).

    Values are parsed as YAML (``16`` is an int, ``[Age, SES]`` a list, ``null`` None); list
    items are addressed by index. A path through a missing mapping key creates it, so an override
    can set a default the recipe leaves out; the typed config then validates the result.
    """
    import copy

    import yaml

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ExciseError(f"expected KEY.PATH=VALUE, got {item!r}", where=source)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ExciseError(f"cannot parse the value of {key!r} as YAML: {raw!r}", where=source) from None
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where_ = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ExciseError(f"{where_}: no list item {part!r} (the list has {len(node)})", where=source)
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ExciseError(f"{where_}: cannot set a key inside a {type(node).__name__}", where=source)
    return data
