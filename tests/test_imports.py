"""Test of the stage order: a module may import only earlier stages (read from the source with `ast`).

Order: config_keys → config → data → anchor → mix → model → train → generate → metrics → halu_targets → tasks →
embed → select → evaluate → report (sweep_report: the report stage for sweeps; embed runs the model and select
reads built-in task pools, so they come after tasks, while the chosen rows flow into anchor and mix through the
experiments), then experiment, resume and compare (experiments built on experiment.py), sweep (its store,
status and checkpoint packing first) and probe (experiments built on compare) and cli. config_keys and config may
import data, because TellInputError lives in data.py, and data may import sharegpt, the reader it hands the
built-in name `sharegpt` to. A new module must be given its place in ORDER.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tell

SRC = Path(tell.__file__).parent
ORDER = ["config_keys", "config", "hardware", "data", "sharegpt", "anchor", "mix", "model", "checkpoint", "packing",
         "fused_lora", "cpu_decode", "trackers", "train", "vllm_backend", "generate", "export", "metrics",
         "diagnostics", "halu_targets", "task_files", "tasks", "embed", "select", "evaluate", "report", "sweep_stats",
         "sweep_report", "experiment", "resume", "compare", "sweep_store", "sweep_eta", "sweep_pack", "sweep", "probe",
         "cli"]
ALLOWED = {("config_keys", "data"), ("config", "data"), ("data", "sharegpt")}


def tell_imports(path: Path) -> set[str]:
    """Return the tell modules imported anywhere in a file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("tell.")}
    return found & set(ORDER)


def test_every_module_has_a_place_in_the_order():
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert modules <= set(ORDER), f"add {sorted(modules - set(ORDER))} to ORDER"


@pytest.mark.parametrize("module", ORDER)
def test_stage_imports_only_earlier_stages(module):
    path = SRC / f"{module}.py"
    if not path.is_file():
        pytest.skip(f"{module}.py does not exist yet")
    later = [name for name in tell_imports(path)
             if ORDER.index(name) >= ORDER.index(module) and (module, name) not in ALLOWED and name != module]
    assert not later, f"tell.{module} imports later stage(s) {sorted(later)}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from tell import experiment\n    import tell.cli\n", encoding="utf-8")
    assert tell_imports(sample) == {"experiment", "cli"}
