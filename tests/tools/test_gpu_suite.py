"""make test-gpu and make gpu-wheels (tools/): what can be checked without a GPU.

Without CUDA the command must stop at once with one line and exit 2; the step plan, the verdicts, the
results files and the pinned wheel set are checked here with stand-in steps, so a GPU session only has
to type `make test-gpu`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.test_readme import _fresh_env
from tools import gpu_needs, gpu_runner, gpu_suite
from tools.gpu_runner import Step

ROOT = Path(__file__).resolve().parents[2]


def test_make_test_gpu_stops_at_once_without_cuda():
    """As typed in a fresh shell: python3 has no CUDA torch here (or no torch at all)."""
    probe = "import torch; print(torch.cuda.is_available())"
    sees = subprocess.run(["python3", "-c", probe], env=_fresh_env(), capture_output=True, text=True)
    if sees.stdout.strip() == "True":
        pytest.skip("python3 sees a GPU here: make test-gpu would run the whole GPU suite")
    docs_before = sorted((ROOT / "docs").rglob("*"))
    proc = subprocess.run(
        ["bash", "-c", "make test-gpu"],
        cwd=ROOT,
        env=_fresh_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("make: ***")]
    assert len(ours) == 1 and ours[0].startswith("error: make test-gpu needs a CUDA GPU: "), proc.stderr
    assert proc.stdout == "" and sorted((ROOT / "docs").rglob("*")) == docs_before


def test_the_driver_names_the_torch_that_sees_no_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.gpu_suite"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"error: make test-gpu needs a CUDA GPU: torch {torch.__version__} in python "
        f"{sys.version.split()[0]} at {sys.executable} sees no CUDA device (torch.cuda.is_available() is "
        "False); run it on a GPU machine\n"
    )


def test_gpu_wheels_are_the_pinned_versions_for_the_gpu_python(tmp_path, capsys):
    assert gpu_needs.main(["--dry-run", "--dest", str(tmp_path)]) == 0
    download, build = capsys.readouterr().out.splitlines()
    pinned = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    for dist, _, _ in gpu_needs.SMALL:
        line = build if dist.startswith("antlr4") else download
        assert f" {dist}=={pinned[dist]}" in line, dist
    assert "--no-deps --only-binary=:all:" in download and "--python-version 3.12" in download
    assert "--platform manylinux2014_x86_64" in download and not list(tmp_path.iterdir())  # a dry run
    make = subprocess.run(["make", "-n", "gpu-wheels"], cwd=ROOT, capture_output=True, text=True)
    assert "-m tools.gpu_needs --python-version 3.12" in make.stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/x-1.0-py3-none-any.whl"], cwd=ROOT)
    assert ignored.returncode == 0, ".whl/ must be git-ignored"


def _third_party_imports() -> dict[str, str]:
    found = {}
    for folder in ("syncbn", "launch", "tests", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_module_the_suite_imports_is_a_need_or_the_machines():
    known = {"torch", "syncbn", "launch", "tests", "tools"}
    known |= {module for _, module, _ in gpu_needs.SMALL + gpu_needs.MACHINE + gpu_needs.OPTIONAL}
    unknown = {m: where for m, where in _third_party_imports().items() if m not in known}
    assert not unknown, f"add these to tools/gpu_needs.py (and constraints.txt): {unknown}"


@pytest.mark.parametrize(
    "version, spec, ok",
    [
        ("4.9.3", "==4.9.*", True),
        ("4.13.2", "==4.9.*", False),
        ("1.3.8", ">=1.3,<1.4", True),
        ("1.4", ">=1.3,<1.4", False),
        ("8.0.0rc1", ">=8", True),
        ("2.4.0+cu130", ">=2.4", True),
        ("6.99", ">=6.100", False),
    ],
)
def test_versions_that_will_do(version, spec, ok):
    assert gpu_needs.satisfies(version, spec) is ok


def test_a_need_in_a_version_that_will_not_do_counts_as_missing():
    assert gpu_needs.missing([("pytest", "pytest", ">=1")]) == []
    assert gpu_needs.missing([("pytest", "pytest", ">=1000")]) == ["pytest"]
    assert gpu_needs.missing([("no-such-dist", "no_such_module", ">=1")]) == ["no-such-dist"]


def test_list_names_every_step_and_why_some_skip(monkeypatch, capsys):
    fake_torch = SimpleNamespace(cuda=SimpleNamespace(device_count=lambda: 1))
    monkeypatch.setattr(gpu_suite, "torch_or_exit", lambda: fake_torch)
    assert gpu_suite.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [s.name for s in gpu_suite.plan(1, {})]
    assert "main-job                 python -m launch.run device=cuda backend=gloo" in lines[5]
    with pytest.raises(SystemExit):
        gpu_suite.main(["--only", "no-such-step"])
    assert "unknown step(s) no-such-step" in capsys.readouterr().err


def _by_name(steps: list[Step]) -> dict[str, Step]:
    return {s.name: s for s in steps}


def test_the_plan_on_one_gpu_shares_it_over_gloo_and_skips_what_needs_two():
    steps = _by_name(gpu_suite.plan(1, {"main-job": None, "check-gloo": None}))
    assert gpu_runner.shown(steps["main-job"]) == (
        "python -m launch.run device=cuda backend=gloo launcher.nproc_per_node=2"
    )
    assert gpu_runner.shown(steps["check-gloo"]) == "python -m launch.run task=check device=cuda backend=gloo"
    assert gpu_runner.shown(steps["equivalence-gloo-cuda"]).startswith(
        "SYNCBN_TEST_DEVICE=cuda python -m pytest"
    )
    assert "-m gpu tests" in gpu_runner.shown(steps["gpu-tests"])
    assert "launcher.nproc_per_node=1" in gpu_runner.shown(steps["check-nccl-w1"])
    skipped = {name for name, s in steps.items() if s.skip}
    assert skipped == {
        "equivalence-nccl",
        "main-job-nccl",
        "check-nccl",
        "bench-nccl",
        "main-job-compile",
        "check-gloo-compile",
    }
    assert steps["main-job-compile"].skip == "skipped: this checkout's config has no task.compile key"
    assert gpu_runner.shown(steps["check-gloo-compile"]).endswith("backend=gloo task.compile=true")
    assert all(s.expect for name, s in steps.items() if "launch.run" in s.command)


def test_the_plan_on_two_gpus_adds_nccl_and_compile_when_the_key_exists():
    steps = _by_name(gpu_suite.plan(2, {"main-job": "train.compile", "check-gloo": None}))
    assert not any(steps[n].skip for n in ("equivalence-nccl", "main-job-nccl", "check-nccl", "bench-nccl"))
    assert steps["equivalence-nccl"].env == {"SYNCBN_TEST_DEVICE": "cuda", "SYNCBN_TEST_BACKEND": "nccl"}
    assert gpu_runner.shown(steps["main-job-compile"]).endswith(
        "launcher.nproc_per_node=2 train.compile=true"
    )
    assert steps["check-gloo-compile"].skip == "skipped: this checkout's config has no task.compile key"


def test_compile_key_finds_the_key_wherever_the_config_has_it(monkeypatch):
    import launch.config

    # this checkout: the main job and task=check both have the key, so make test-gpu runs both compiled
    assert gpu_suite.compile_key(["device=cuda"]) == "task.compile"
    assert gpu_suite.compile_key(["task=check", "device=cuda"]) == "task.compile"
    monkeypatch.setattr(launch.config, "compose", lambda job: {"task": {"name": "train", "compile": False}})
    assert gpu_suite.compile_key([]) == "task.compile"
    monkeypatch.setattr(launch.config, "compose", lambda job: {"task": {"name": "check"}})
    assert gpu_suite.compile_key([]) is None


@pytest.fixture
def docs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_runner, "DOCS", tmp_path / "docs")
    return tmp_path / "docs"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_step_passes_fails_or_times_out_with_its_log(docs):
    env = dict(__import__("os").environ)
    ok = gpu_runner.run_step(Step("ok", python("print('3 passed in 1.0s')")), env)
    assert ok["status"] == "passed" and ok["summary"] == "3 passed in 1.0s" and ok["exit_code"] == 0
    bad = gpu_runner.run_step(Step("bad", python("import sys; print('1 failed'); sys.exit(1)")), env)
    assert bad["status"] == "failed" and bad["exit_code"] == 1
    slow = gpu_runner.run_step(Step("slow", python("import time; time.sleep(60)"), timeout=1), env)
    assert slow["status"] == "failed" and slow["exit_code"] is None
    assert "[killed after 1 s]" in (docs / "slow" / "output.log").read_text()
    skipped = gpu_runner.run_step(Step("skip", python(""), skip="skipped: needs 2 GPUs"), env)
    assert skipped == {"command": "python -c ", "status": "skipped", "reason": "skipped: needs 2 GPUs"}


@pytest.mark.parametrize("device, passed", [("cuda", True), ("cpu", False)])
def test_a_launcher_step_passes_only_if_its_run_ran_on_cuda(docs, tmp_path, device, passed):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    check = {"passed": True, "device": device, "max_error": 1e-12, "world_size": 2, "backend": "gloo"}
    (run_dir / "check.json").write_text(json.dumps(check))
    (run_dir / "config.yaml").write_text("task: {name: check}\n")
    step = Step("check", python(f"print('outputs: {run_dir}')"), expect="check.json")
    record = gpu_runner.run_step(step, dict(__import__("os").environ))
    assert record["status"] == ("passed" if passed else "failed")
    assert record["figures"].get("why") == (None if passed else "ran on cpu, not cuda")
    assert record["figures"]["max_error"] == 1e-12 and record["figures"]["backend"] == "gloo"
    assert (docs / "check" / "check.json").is_file() and (docs / "check" / "config.yaml").is_file()
    lost = gpu_runner.run_step(Step("lost", python("print('no outputs line')"), expect="check.json"), {})
    assert lost["status"] == "failed" and "no check.json" in lost["figures"]["why"]


def test_results_add_up_across_runs_and_fail_the_exit_code(docs):
    env = dict(__import__("os").environ)
    machine = {"date": "2026-01-01T00:00:00+00:00", "gpus": ["Test GPU"], "torch": "2.11.0"}
    machine |= {"cuda": "13.0", "cudnn": 91000, "nccl": "2.27.7", "python": "3.12.3"}
    steps = [Step("a", python("print('1 passed')")), Step("b", python(""), skip="skipped: why")]
    assert gpu_runner.run_all(steps, machine, env) == 0
    assert gpu_runner.run_all([Step("c", python("raise SystemExit(4)"))], machine, env) == 1
    results = json.loads((docs / "results.json").read_text())
    assert [results["steps"][n]["status"] for n in "abc"] == ["passed", "skipped", "failed"]
    assert results["passed"] is False and results["environment"]["gpus"] == ["Test GPU"]
    log = (docs / "test-gpu.log").read_text()
    assert log.startswith("make test-gpu on Test GPU: torch 2.11.0, CUDA 13.0") and "skipped: why" in log


def test_the_environment_names_the_gpu_the_versions_and_the_commit(monkeypatch):
    import launch.bench_cuda

    info = {"gpu": "Fake GPU", "cuda": "13.0", "cudnn": 91000, "nccl": "2.27.7"}
    monkeypatch.setattr(launch.bench_cuda, "device_info", lambda device: info)
    cuda = SimpleNamespace(device_count=lambda: 2, get_device_name=lambda i: f"Fake GPU {i}")
    fake_torch = SimpleNamespace(cuda=cuda, device=lambda *a: a, __version__="2.11.0+cu130")
    env = gpu_suite.environment(fake_torch)
    assert env["gpus"] == ["Fake GPU 0", "Fake GPU 1"] and env["torch"] == "2.11.0+cu130"
    assert env["cuda"] == "13.0" and env["nccl"] == "2.27.7" and env["python"] == sys.version.split()[0]
    assert env["date"].endswith("+00:00") and len(env["git_commit"] or "0" * 40) == 40


def test_the_committed_gpu_run_passed_and_the_readme_quotes_its_figures():
    """docs/gpu/ holds a real make test-gpu run; the README's CUDA figures must be that run's."""
    root = Path(__file__).resolve().parents[2]
    results = json.loads((root / "docs/gpu/results.json").read_text())
    readme = (root / "README.md").read_text()
    steps = results["steps"]
    assert results["passed"] is True and "H100" in results["environment"]["gpu"]
    assert {s["status"] for s in steps.values()} <= {"passed", "skipped"}
    for name in ("main-job", "main-job-compile"):
        figures = steps[name]["figures"]
        assert f"{figures['seconds']:.1f} s" in readme and f"{figures['final_accuracy']:.3f}" in readme, name
    assert f"{steps['check-gloo']['figures']['max_error']:.1e}" in readme
    assert steps["bench-gloo"]["figures"]["rows"] == 28 and "28 rows" in readme
    assert results["environment"]["torch"] in readme
