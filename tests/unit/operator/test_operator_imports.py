"""The operator runs without the model, the engine and the serve plane: a controller image carries
no torch and no Ray, and a missing operator dependency is one line saying what to install."""

import subprocess
import sys

HEAVY = ("torch", "ray", "zmq", "fastapi")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_operator_and_the_plugin_import_no_torch_ray_zmq_or_fastapi():
    done = run_python(
        "import sys\n"
        "import expertmesh_operator.main, expertmesh_operator.plugin, expertmesh_operator.handlers\n"
        "import expertmesh_operator.prometheus\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_package_root_loads_the_engine_only_when_asked():
    done = run_python(
        "import sys, expertmesh, expertmesh.errors\n"
        "before = 'torch' in sys.modules\n"
        "expertmesh.LLM\n"
        "print(before, 'torch' in sys.modules)"
    )
    assert done.stdout.strip() == "False True", done.stderr


def test_without_the_operator_extra_the_operator_says_what_to_install_in_one_line():
    done = run_python(
        "import sys\n"
        "sys.modules['kopf'] = None  # as if not installed\n"
        "from expertmesh_operator.main import main\n"
        "sys.exit(main(['--once']))"
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "expertmesh-operator: missing kopf; install the operator's dependencies: pip install 'expertmesh[operator]'"
    )
