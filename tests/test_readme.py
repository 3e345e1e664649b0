"""README.md as a newcomer meets it: every ```bash``` and ```python``` block runs as pasted.

A bash block runs command by command through bash, in a fresh folder per block, with a HOME of its
own and FASTRESNET_SMOKE=1: the README's switch for a check that a command works end to end (one
optimizer step, one evaluation batch, batches of at most 16 images, a profile of one step). Two
things never run: `pip install` (CI has installed the project; the extras it names are checked) and
the commands of PARSED_ONLY, each with its reason. Those run through bash with the programs that
would start them (python3, torchrun, srun, bash) replaced by a recorder, and what they were given
is parsed here by the real parsers (the command's own, torchrun's), so that a renamed flag fails.
A Python block runs in a namespace of its own, so that a missing import fails.
The map of the code is checked against the tree.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist

# Commands that are parsed, not run (matched on their start), and why.
PARSED_ONLY = {
    'python3 -m pip install -e ".[dev,dali]" && python3 -m pytest -q':
        "the test suite itself, which holds this test; .ci/run runs exactly this line (checked here)",
    "python3 -m fastresnet.train --recipe paper-cifar": "CIFAR-10, which CI does not have (a 170 MB download)",
    "torchrun --nproc_per_node=8 -m fastresnet.train --recipe fast-imagenet": "8 GPUs and ImageNet",
    "python3 -m fastresnet.evaluate --checkpoint runs/rn50-a": "an ImageNet run and ImageNet",
    "torchrun --nnodes=N": "many nodes, each with GPUs, and ImageNet",
    "srun --nodes=$SLURM_NNODES": "a SLURM cluster, GPUs and ImageNet",
    "python3 -m fastresnet.profile --model resnet50": "a GPU: ResNet-50 at batch 256 in bf16, which this CPU "
                                                      "computes about 600x slower than fp32",
    "python3 -m fastresnet.experiments degradation --data ~/data/cifar-10-batches-py": "CIFAR-10, as above",
    "python3 -m fastresnet.experiments depth-sweep --data ~/data/cifar-10-batches-py": "CIFAR-10, as above",
    "python3 -m pytest bench/ --benchmark": "every benchmark takes minutes on a CPU; pytest collects them with "
                                            "these flags instead",
    "bash bench/gpu_check.sh": "a GPU machine; bash checks the script's syntax",
}

RECORDER = """
record() { command python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$README_RECORD"; }
"""
# pip never runs: CI has installed the project (and this folder is not a clean clone).
RUN_PREAMBLE = RECORDER + """
python3() { if [ "${1-} ${2-}" = "-m pip" ]; then record python3 "$@"; else command python3 "$@"; fi; }
set -e -o pipefail
"""
PARSE_PREAMBLE = RECORDER + """
python3() { record python3 "$@"; }
torchrun() { record torchrun "$@"; }
bash() { record bash "$@"; }
srun() { while [ "${1#-}" != "$1" ]; do shift; done; "$@"; }  # srun's options, then what each node runs
scontrol() { echo node0; }  # `scontrol show hostnames`: the first node's name
set -e -o pipefail
"""


@dataclass
class Block:
    language: str
    code: str
    line: int  # of the opening fence in README.md

    @property
    def id(self) -> str:
        return f"{self.language}-line{self.line}"


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^( *)```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        indent, language = len(opening.group(1)), opening.group(2)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = [line[indent:] for line in lines[i + 1:end]]
        blocks.append(Block(language, "\n".join(body) + "\n", i + 1))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comment-only lines left out."""
    joined = code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def why_parsed_only(command: str) -> str | None:
    for start, reason in PARSED_ONLY.items():
        if command.startswith(start):
            return reason
    if "--dataset fashion-mnist" in command and not FASHION_MNIST.is_dir():
        return f"Fashion-MNIST is not installed here ({FASHION_MNIST}; apt-get install dataset-fashion-mnist)"
    return None


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


def run_bash(command: str, preamble: str, cwd: Path, home: Path, record: Path) -> None:
    env = dict(os.environ, HOME=str(home), FASTRESNET_SMOKE="1", README_RECORD=str(record),
               SLURM_NNODES="2", SLURM_NODELIST="node[0-1]", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(["bash", "-c", preamble + command], cwd=cwd, env=env, text=True, capture_output=True,
                          timeout=600)
    assert done.returncode == 0, f"README: `{command}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert not re.search(r"^(ERROR|Traceback)", done.stderr, flags=re.MULTILINE), f"`{command}`:\n{done.stderr}"


def run_block(block: Block, home: Path, folder: Path) -> None:
    """Every command of a bash block, in order, in `folder`; then what the parsed-only ones were given."""
    folder.mkdir()
    record = folder / "recorded.jsonl"
    for command in shell_commands(block.code):
        parsed_only = why_parsed_only(command) is not None
        run_bash(command, PARSE_PREAMBLE if parsed_only else RUN_PREAMBLE, folder, home, record)
    recorded = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    pytest_runs = [argv[3:] for argv in recorded if argv[:3] == ["python3", "-m", "pytest"]]
    for argv in recorded:
        if argv[:3] != ["python3", "-m", "pytest"]:
            check_recorded(argv)
    if pytest_runs:  # one collection with every flag given (collecting the benchmarks takes a while)
        check_pytest(list(dict.fromkeys(arg for args in pytest_runs for arg in args)), folder)


def test_every_bash_block_runs_as_pasted(home, tmp_path):
    """Two blocks at a time (each in its own folder): on a 2-core machine that runs the suite, the
    second core is otherwise idle. Every block's failure is reported, by the line of its fence."""
    blocks = [b for b in BLOCKS if b.language == "bash"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {block.id: pool.submit(run_block, block, home, tmp_path / block.id) for block in blocks}
    failures = [f"README block at line {block_id[len('bash-line'):]}: {future.exception()}"
                for block_id, future in done.items() if future.exception() is not None]
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "python"], ids=lambda b: b.id)
def test_every_python_block_runs_as_pasted(block, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    exec(compile(block.code, f"README.md, block at line {block.line}", "exec"), {"__name__": "__readme__"})


def check_recorded(argv: list[str]) -> None:
    """What a command that was not run was given, parsed by the parser of the program it names."""
    program, *args = argv
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        launch = get_args_parser().parse_args(args)
        assert launch.module, f"torchrun {shlex.join(args)}: the README starts the commands with -m"
        check_module(launch.training_script, launch.training_script_args)
    elif program == "bash":
        script = REPO / args[0]
        assert script.is_file(), f"bash {args[0]}: no such script"
        subprocess.run(["bash", "-n", str(script)], check=True)
    elif args[:3] == ["-m", "pip", "install"]:
        check_extras(args[3:])
    elif args[0] == "-m":
        check_module(args[1], args[2:])
    else:
        assert (REPO / args[0]).is_file(), f"python3 {args[0]}: no such file"


def check_extras(args: list[str]) -> None:
    """`pip install -e ".[a,b]"`: this project, with extras it declares."""
    target = args[-1]
    assert args[0] == "-e" and target.startswith(".["), f"pip install {shlex.join(args)}"
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in target[2:-1].split(","):
        assert extra in declared, f"pip install {target}: pyproject.toml declares no extra {extra!r}"


def check_module(module: str, args: list[str]) -> None:
    from fastresnet import evaluate, profile, tune
    from fastresnet.experiments.__main__ import build_parser as experiments_parser
    from fastresnet.train import parse as parse_train
    from fastresnet.training.config import validate

    parsers = {
        "fastresnet.train": lambda argv: validate(parse_train(argv).config),
        "fastresnet.experiments": experiments_parser().parse_args,
        "fastresnet.tune": tune.parse,
        "fastresnet.profile": profile.parse,
        "fastresnet.evaluate": evaluate.COMMAND.parse,  # its checkpoint is not here: the flags are checked
    }
    assert module in parsers, f"python3 -m {module}: not a command this test knows how to parse"
    parsers[module](args)


def check_pytest(args: list[str], tmp_path: Path) -> None:
    if args == ["-q"]:  # the suite: CI's command
        assert "python3 -m pytest -q\n" in (REPO / ".ci" / "run").read_text()
        return
    # The collection runs in the repository (its pytest settings collect bench/); a file it would write goes here.
    args = [re.sub(r"^(--benchmark-json=)(.*)$", lambda m: m.group(1) + str(tmp_path / m.group(2)), a) for a in args]
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, f"pytest {shlex.join(args)} --collect-only:\n{done.stdout[-3000:]}\n{done.stderr}"


def test_every_parsed_only_command_is_in_the_readme():
    commands = [c for b in BLOCKS if b.language == "bash" for c in shell_commands(b.code)]
    for start in PARSED_ONLY:
        assert any(c.startswith(start) for c in commands), f"PARSED_ONLY names a command the README lacks: {start}"


# --- the map of the code


def code_map() -> list[tuple[str, str]]:
    """(path, its description with continuation lines) of each entry of the README's map."""
    text = README.read_text()
    section = text[text.index("## Map of the code"):]
    block = next(b for b in readme_blocks(section) if b.language == "")
    entries: list[tuple[str, str]] = []
    for line in block.code.splitlines():
        if line.startswith(" "):
            path, description = entries[-1]
            entries[-1] = (path, description + " " + line.strip())
        elif line.strip():
            path, _, description = line.partition(" ")
            entries.append((path, description.strip()))
    return entries


def test_the_map_of_the_code_names_every_package_and_module_once_and_nothing_else():
    entries = code_map()
    paths = [path for path, _ in entries]
    assert len(paths) == len(set(paths)), f"listed twice: {sorted({p for p in paths if paths.count(p) > 1})}"
    for path, description in entries:
        assert (REPO / path).exists(), f"the map lists {path}, which does not exist"
        folder = REPO / path if path.endswith("/") else (REPO / path).parent
        for name in re.findall(r"\b(\w+\.py)\b", description):
            assert (folder / name).is_file(), f"the map's entry {path} names {name}, which is not in {folder}"
    package = REPO / "fastresnet"
    expected = {f"fastresnet/{p.name}/" if p.is_dir() else f"fastresnet/{p.name}" for p in top_level(package)}
    expected |= {"kernels/", "bench/", "tests/", "docs/"}
    missing = sorted(expected - set(paths))
    assert not missing, f"the map of the code lacks {missing}"
    descriptions = dict(entries)
    for folder in ("kernels/", "bench/"):  # one line each, which names every module and package in it
        unnamed = [p.name for p in top_level(REPO / folder) if not names(descriptions[folder], p)]
        assert not unnamed, f"the map's entry {folder} does not name {unnamed}"


def top_level(folder: Path) -> list[Path]:
    """The modules and folders (packages, recipes) in `folder`; its own __init__.py, caches and links left out."""
    return [p for p in sorted(folder.iterdir()) if not p.is_symlink() and not p.name.startswith((".", "__"))
            and (p.suffix == ".py" or p.is_dir())]


def names(description: str, path: Path) -> bool:
    """Whether a map entry's description names `path`: a package as `name/`, a module by its file name or
    stem, or by a pattern such as `bench_<thing>.py`."""
    if path.is_dir():
        return f"{path.name}/" in description
    patterns = [re.escape(p).replace(re.escape("<thing>"), r"\w+")
                for p in re.findall(r"\w*<thing>\w*\.py", description)]
    return (re.search(rf"(?<![\w/<]){re.escape(path.stem)}(\.py)?(?![\w<])", description) is not None
            or any(re.fullmatch(p, path.name) for p in patterns))


def test_the_zoo_options_the_readme_lists_are_get_models():
    from fastresnet.models import model_options

    text = README.read_text()
    for family, model in (("ImageNet", "resnet50"), ("CIFAR-10", "resnet20")):
        item = text[text.index(f"- {family}: `"):]
        listed = re.findall(r"`(\w+)`", item[item.index("Options:"):item.index(".\n", item.index("Options:"))])
        assert sorted(listed) == sorted(model_options(model)), f"{family} options: README {listed}"
