"""The ``saeflow`` command line."""

from __future__ import annotations

import subprocess

import pytest

from flows.cli import build_parser, main


def test_help_exits_zero_and_prints_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: saeflow" in out
    for command in ("gradcheck", "exercise", "--version"):
        assert command in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: saeflow" in capsys.readouterr().out


def test_unknown_command_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code != 0
    assert "invalid choice" in capsys.readouterr().err


def test_version(capsys):
    import sae_core

    with pytest.raises(SystemExit) as info:
        main(["--version"])  # argparse's own version action
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"saeflow {sae_core.__version__}"


def test_gradcheck_passes(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "gradient check passed" in out
    for line in ("kl    autograd", "kl    fused", "l1    autograd", "topk  autograd"):
        assert line in out


def test_error_reported_without_traceback(capsys):
    # a patch larger than every built-in image: a ValueError, reported as one line
    assert main(["gradcheck", "--patch", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saeflow: error:")
    assert "Traceback" not in err


def test_debug_flag_reraises():
    with pytest.raises(ValueError, match="smaller than"):
        main(["--debug", "gradcheck", "--patch", "1000"])


def test_parser_defaults():
    args = build_parser().parse_args(["exercise"])
    assert (args.n_patches, args.patches, args.iterations, args.seed) == (10_000, None, 400, 0)
    args = build_parser().parse_args(["gradcheck"])
    assert (args.samples, args.patch, args.hidden) == (50, 4, 6)


def test_module_help_in_subprocess(python, subprocess_env, repo_root):
    proc = subprocess.run([python, "-m", "flows.cli", "--help"], cwd=repo_root,
                          env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: saeflow" in proc.stdout


HEAVY = ("torch", "sklearn", "prefect", "mlflow", "dvc", "numpy", "pandas")


def test_import_does_not_load_torch(python, subprocess_env, repo_root):
    """`saeflow --help` and the client side of `saeflow stage` (argument parsing) stay
    instant: they import none of the heavy libraries."""
    code = ("import flows.cli, sys; p = flows.cli.build_parser(); p.format_help(); "
            "p.parse_args(['stage', 'train', '--patches', 'a', '--model', 'b', "
            "'--train-metrics', 'c', '--loss-csv', 'd', '--dynamics', 'e']); "
            f"print(*[m in sys.modules for m in {HEAVY!r}])")
    proc = subprocess.run([python, "-c", code], cwd=repo_root, env=subprocess_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"] * len(HEAVY)
    # and the check itself can see torch when it is imported
    proc = subprocess.run([python, "-c", "import torch, sys; print('torch' in sys.modules)"],
                          cwd=repo_root, env=subprocess_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "True"


@pytest.mark.parametrize("argv, status", [(["gradcheck", "--samples", "5"], 0),
                                          (["summary", "--dvc-yaml", "/nonexistent.yaml"], 2)])
def test_console_script_freezes_the_heap_before_shutdown(python, subprocess_env, argv, status):
    """Interpreter shutdown collects every object the libraries made at import (1.6-2.0 s
    of each stage process here): the console script freezes them first. atexit handlers
    still run and the exit status is kept."""
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
            f"sys.argv = ['saeflow', *{argv!r}]\n"
            "from flows.cli import entry\nentry()\n")
    done = subprocess.run([python, "-c", code], env=subprocess_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == status, done.stderr
    assert "frozen at exit: True" in done.stdout
