"""Every example in README.md works as written: the Python blocks run, each fenced shell command runs at a
smoke size (or, for torchrun, parses and passes the checks a launch would make), and the command-line synopsis
names only flags the commands have."""

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
SMOKE = ["--steps", "1", "--frames", "5", "--height", "32", "--width", "32"]  # later flags win in argparse
TUNE_SMOKE = ["--steps", "2", "--frames", "25", "--height", "64", "--width", "64"]  # enough tokens for a density grid


def shell_commands() -> list[list[str]]:
    """Each command of the ```bash blocks: lines joined at backslashes, split at &&."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            out += [argv for part in line.split("&&") if (argv := shlex.split(part, comments=True))]
    return out


COMMANDS = shell_commands()


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})


def test_readme_has_exactly_one_marked_test_command():
    assert README.count("<!-- test-command -->") == 1


def test_the_readme_shows_the_commands_a_newcomer_needs():
    tools = [argv[0] for argv in COMMANDS]
    assert {"pip", "vdit-sparse", "torchrun", "python"} <= set(tools)


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_shell_command_works_as_written(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VDIT_SPARSE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VDIT_SPARSE_CACHE", str(tmp_path / "cache"))
    tool, rest = argv[0], argv[1:]
    if tool == "pip":
        check_pip(rest)
    elif tool == "python":  # the test command: pytest over this suite
        assert rest[:2] == ["-m", "pytest"]
        assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    elif tool == "vdit-sparse":
        run_smoke(rest, tmp_path)
    elif tool == "torchrun":
        check_torchrun(rest)
    else:
        raise AssertionError(f"README runs {tool!r}, which this test does not know how to check")


def check_pip(rest: list[str]) -> None:
    """``pip install`` of the checkout (extras that pyproject defines) or of torch from a named index."""
    assert rest[0] == "install"
    targets = [a for a in rest[1:] if not a.startswith("-") and not a.startswith("http")]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for target in targets:
        if target == "torch":
            assert "--index-url" in rest  # the CPU-only wheel
            continue
        match = re.fullmatch(r"\.(?:\[(\w+)\])?", target)
        assert match, f"pip install {target!r}: expected the checkout ('.' or '.[extra]') or torch"
        assert match.group(1) is None or match.group(1) in extras


def run_smoke(rest: list[str], tmp_path: Path) -> None:
    import json

    from vdit_sparse.cli import main

    assert main(rest + (TUNE_SMOKE if rest[0] == "tune" else SMOKE)) == 0, rest
    if rest[0] == "generate":
        from vdit_sparse.flags import default_out

        attention = rest[rest.index("--attention") + 1] if "--attention" in rest else "dense"
        out = tmp_path / (rest[rest.index("--out") + 1] if "--out" in rest else default_out(rest[1], attention))
        sidecar = json.loads(out.with_suffix(".json").read_text())
        assert out.stat().st_size > 0 and sidecar["weights"]["trained"] is True
    elif rest[0] == "tune":
        name = rest[rest.index("--out") + 1]
        assert (tmp_path / "home" / "tuned" / f"{name}.yaml").is_file()
    elif rest[0] == "compare":
        metrics = json.loads((tmp_path / rest[rest.index("--report") + 1] / "metrics.json").read_text())
        assert metrics["prompts"] and (tmp_path / rest[rest.index("--report") + 1] / "report.html").is_file()


def check_torchrun(rest: list[str]) -> None:
    """What a launch checks before any work: the degree equals the process count, the embedded model's heads
    can be shared that way, and the command's own flags parse."""
    from vdit_sparse import compare
    from vdit_sparse.cli import build_parser
    from vdit_sparse.flags import parse_generation_args
    from vdit_sparse.parallel import check_degree
    from vdit_sparse.pipelines.tiny import TRANSFORMER_CONFIG

    nproc = int(rest[rest.index("--nproc-per-node") + 1])
    command = rest[rest.index("-m") + 1:]
    assert command[0] == "vdit_sparse"
    degree = int(command[command.index("--ulysses-degree") + 1])
    assert degree == nproc
    check_degree(TRANSFORMER_CONFIG["num_attention_heads"], degree)
    if command[1] == "compare":
        compare.parse_args(command[2:])
    else:
        parse_generation_args(build_parser(), command[1:])


def synopsis() -> dict[str, set[str]]:
    """The flags the README's command-line synopsis names, per command."""
    block = re.search(r"`vdit-sparse` \(also `python -m vdit_sparse`\):\n\n```\n(.*?)```", README, flags=re.S).group(1)
    flags: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        if line.startswith("vdit-sparse "):
            command = line.split()[1]
        flags.setdefault(command, set()).update(re.findall(r"(--[a-z][a-z-]*)", line))
    return flags


@pytest.mark.parametrize("command", ["generate", "compare", "tune", "bench"])
def test_the_synopsis_names_only_flags_the_command_has(command, capsys):
    from vdit_sparse.cli import main

    named = synopsis()[command]
    assert named
    argv = [command, "--kernels", "--help"] if command == "bench" else [command, "--help"]
    with pytest.raises(SystemExit):
        main(argv)
    helptext = capsys.readouterr().out
    if command == "bench":
        helptext += " --kernels --e2e --cost-model"
    missing = sorted(f for f in named if f not in helptext)
    assert not missing, f"README's synopsis of {command} names flags it does not have: {missing}"


def test_the_plugin_entry_points_shown_are_the_groups_we_read():
    from vdit_sparse.registry import CACHES_GROUP, METHODS_GROUP

    (block,) = re.findall(r"```toml\n(.*?)```", README, flags=re.S)
    groups = tomllib.loads(block)["project"]["entry-points"]
    assert set(groups) == {METHODS_GROUP, CACHES_GROUP}
    shipped = tomllib.loads((ROOT / "tests" / "plugins" / "window" / "pyproject.toml").read_text())
    assert set(shipped["project"]["entry-points"]) == set(groups)
