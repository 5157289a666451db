"""Every CLI error path exits with status 2 and one line, never a traceback, and touches nothing (issue 15).

The bad inputs are generated from the argparse parser itself: for every command, a valid command line
(`BASE`) is broken in one place at a time, by each flag's kind: integers and floats get text, fractions
and values below their minimum (`nestlm.cli.MINIMUM`); choices get an unknown one; switches get a value;
required arguments go missing; input folders become a missing path, a file, an empty folder, a folder with
a broken or foreign config.json; text files become missing, empty, binary or a folder; config files become
missing, not YAML, or hold a value it can't read; outputs become an existing folder, the input itself or a
folder inside it; budgets become names and numbers no checkpoint has. Plus an unknown flag per command.
The world (cli_world) is byte for byte unchanged after each case."""

from __future__ import annotations

import argparse
import json

import pytest
from cli_world import run, snapshot

from nestlm.cli import MAXIMUM, MINIMUM, build_parser

pytestmark = pytest.mark.usefixtures("one_thread")

# a valid command line per command ({name}: a folder of the world); a case breaks one argument of it
BASE = {
    "demo": ["demo", "--quick", "--out", "{scratch}/demo"],
    "importance": ["importance", "{hf}", "--text", "{text}", "--out", "{scratch}/s.safetensors"],
    "elastify": ["elastify", "{yaml}", "--model", "{hf}", "--text", "{text}", "--out", "{scratch}/e"],
    "slice": ["slice", "{elastic}", "--budget", "60%", "-o", "{scratch}/x"],
    "info": ["info", "{hf}"],
    "eval": ["eval", "{elastic}", "--text", "{text}", "--seq-len", "16", "--max-windows", "2"],
    "quantize": ["quantize", "{slice}", "-o", "{scratch}/q", "--calib-tokens", "32", "--seq-len", "16",
                 "--text", "{text}"],
    "convert": ["convert", "{hf}", "{scratch}/c"],
    "generate": ["generate", "{hf}", "--prompt", "In", "--max-new-tokens", "2"],
}
THINK = ["generate", "{elastic}", "--prompt", "In", "--think-budget", "60%", "--max-think", "2",
         "--max-new-tokens", "2"]  # budget flags are read in think mode
# what each argument is (its argparse dest)
INPUT_DIRS = {"hf_dir", "model", "elastic_dir", "path", "src"}
OUTPUTS = {"out", "sort_out", "dst"}
BUDGETS = {"budget", "think_budget", "answer_budget"}
BAD_FOLDERS = ("{scratch}/missing", "{text}", "{empty_dir}", "{broken_config}", "{foreign_config}")
BAD_TEXTS = ("{scratch}/missing.txt", "{empty_txt}", "{binary_txt}", "{empty_dir}")
BAD_YAMLS = ("{scratch}/missing.yaml", "{not_yaml}", "{bad_steps_yaml}", "{unknown_key_yaml}", "{negative_budget_yaml}")
BAD_BUDGETS = ("huge", "-5%", "75", "0", "1.5", "", "150%")


def _actions(command: str) -> list[argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if not isinstance(a, argparse._HelpAction)]


def _replace(argv: list[str], action: argparse.Action, value: str | None) -> list[str]:
    """argv with the argument of `action` set to value (None: left out); an option not in argv is added."""
    argv = list(argv)
    if not action.option_strings:  # positional k: argv[1 + k] (BASE puts positionals first)
        i = 1 + [a.dest for a in _actions(argv[0]) if not a.option_strings].index(action.dest)
        return argv[:i] + argv[i + 1:] if value is None else argv[:i] + [value] + argv[i + 1:]
    flags = [i for i, a in enumerate(argv) if a in action.option_strings]
    if flags:
        i = flags[0]
        n = 1 if action.nargs == 0 else 2
        argv = argv[:i] + argv[i + n:]
    if value is None:
        return argv
    return argv + ([value] if action.nargs == 0 else [action.option_strings[-1], value])


def bad_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for command, base in BASE.items():
        def add(argv, command=command):
            cases.append((command, argv))

        add(base + ["--frobnicate"])
        if any(a.required for a in _actions(command)):
            add(base[:1])  # nothing but the command
        for a in _actions(command):
            d = a.dest
            start = THINK if d in BUDGETS and command == "generate" else base
            if a.required and a.option_strings:
                add(_replace(start, a, None))  # a required option missing
            if not a.option_strings:
                add(_replace(start, a, None))  # a positional missing
            if a.nargs == 0:  # a switch given a value
                add([x for x in start] + [f"{a.option_strings[-1]}=yes"])
                continue
            values: list[str] = []
            if a.type is int:
                values += ["x", "1.5"] + ([str(MINIMUM[d] - 1)] if d in MINIMUM else [])
            elif a.type is float:
                values += ["x"] + (["-1", "nan"] if d in MINIMUM else []) + (["1.5"] if d in MAXIMUM else [])
            if a.choices:
                values.append("bogus")
            if d in INPUT_DIRS and command != "generate" or (command == "generate" and d == "path"):
                values += BAD_FOLDERS
            if d == "text":
                values += BAD_TEXTS
            if d == "config":
                values += BAD_YAMLS
            if d in BUDGETS:
                values += BAD_BUDGETS
            if d in OUTPUTS and command != "demo":
                src = next((x for x in start[1:] if x.startswith("{") and not x.startswith("{scratch")), None)
                values += ["{slice}", src, f"{src}/inside"]  # exists; the input itself; inside the input
            if command == "demo" and d == "out":
                values += ["{text}", "{foreign_dir}"]
            for v in values:
                add(_replace(start, a, v))
            if d in OUTPUTS and "--overwrite" in {o for x in _actions(command) for o in x.option_strings}:
                src = next(x for x in start[1:] if x.startswith("{") and not x.startswith("{scratch"))
                add(_replace(start, a, src) + ["--overwrite"])  # overwrite never replaces an input
    return [c for i, c in enumerate(cases) if c not in cases[:i]]  # once each


CASES = bad_cases()


@pytest.fixture(scope="module")
def world(cli_world):
    w = cli_world  # shared with test_careless.py: the bad folders below are added beside the world's
    root = w["root"]
    bad = {"scratch": root / "scratch", "empty_dir": root / "empty_dir", "foreign_dir": root / "foreign_dir",
           "broken_config": root / "broken_config", "foreign_config": root / "foreign_config",
           "empty_txt": root / "empty.txt", "binary_txt": root / "binary.txt", "not_yaml": root / "not.yaml",
           "bad_steps_yaml": root / "steps.yaml", "unknown_key_yaml": root / "key.yaml",
           "negative_budget_yaml": root / "budget.yaml"}
    for k in ("scratch", "empty_dir", "foreign_dir", "broken_config", "foreign_config"):
        bad[k].mkdir(exist_ok=True)
    (bad["foreign_dir"] / "notes.txt").write_text("not the demo's")
    (bad["broken_config"] / "config.json").write_text("{not json")
    (bad["foreign_config"] / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    bad["empty_txt"].write_text("")
    bad["binary_txt"].write_bytes(bytes(range(256)) * 8)
    bad["not_yaml"].write_text("budgets: [1.0, 0.5\n")
    yaml = w["yaml"].read_text()
    bad["bad_steps_yaml"].write_text(yaml.replace("steps: 6", "steps: 2OO"))
    bad["unknown_key_yaml"].write_text(yaml + "stepz: 3\n")
    bad["negative_budget_yaml"].write_text(yaml.replace("[1.0, 0.75, 0.6]", "[1.0, -5%]"))
    return {**w, **bad}


def test_every_command_is_broken_in_many_ways():
    counts = {c: sum(1 for k, _ in CASES if k == c) for c in BASE}
    assert all(n >= 8 for n in counts.values()), counts


@pytest.mark.parametrize("command,argv", CASES, ids=[f"{c}:{' '.join(a[1:])}" for c, a in CASES])
def test_a_bad_command_line_exits_2_with_one_line(world, command, argv):
    argv = [a.format(**{k: str(v) for k, v in world.items()}) for a in argv]
    before = snapshot(world["root"])
    code, out, err = run(argv)
    assert code == 2, (argv, out, err)
    assert err.count("\n") == 1 and err.startswith("nestlm") and ": error: " in err, err
    assert "Traceback" not in err and out == "", (out, err)
    assert snapshot(world["root"]) == before, "a bad command line changed the files"
