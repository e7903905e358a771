"""`memtrain --version`, `--help` and every `SUBCOMMAND --help` answer without importing torch."""

from __future__ import annotations

import subprocess
import sys

from conftest import cli_env

from memtrain.cli import SUBCOMMANDS


def test_help_and_version_work_with_torch_unimportable(tmp_path):
    # A `torch` package that refuses to import, first on the path: any import of torch fails the command.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch imported while building the command line')\n")
    env = cli_env()
    env["PYTHONPATH"] = str(tmp_path) + ":" + env["PYTHONPATH"]
    script = (
        "import sys, contextlib, io\n"
        "from memtrain.cli import main\n"
        "for argv in sys.argv[1:]:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main(argv.split())\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (argv, e.code)\n"
        "    assert out.getvalue().strip(), argv\n"
        "    print('ok', argv, file=sys.stderr)\n"
        "assert 'torch' not in sys.modules\n"
    )
    argvs = ["--version", "--help", *(f"{name} --help" for name in SUBCOMMANDS)]
    proc = subprocess.run([sys.executable, "-c", script, *argvs], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("ok ") == len(argvs), proc.stderr
    # And the real entry point (a fresh process per call, as a user types it).
    for argv in (["--version"], ["--help"], ["plan", "--help"]):
        p = subprocess.run([sys.executable, "-m", "memtrain", *argv], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.strip() and "Traceback" not in p.stderr, p.stderr
