"""`import incrementer_fast` is light, and INCREMENTER_FAST_BACKEND is read at import.

Each case is a fresh interpreter (subprocess): what an import pulls in, and what the environment sets at
import, can only be seen there.
"""
import os
import subprocess
import sys
import textwrap

HEAVY = ("timm", "torchvision", "matplotlib")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("INCREMENTER_FAST_BACKEND", "TRITON_INTERPRET")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                          text=True, timeout=120)


def test_import_is_light_and_the_environment_sets_the_backend():
    result = _python(f"""
        import sys
        import incrementer_fast as inc
        import incrementer_fast.nn
        heavy = {HEAVY!r}
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
        assert "incrementer_fast.model" not in sys.modules and "incrementer_fast.continual" not in sys.modules
        # INCREMENTER_FAST_BACKEND=reference beats the interpreter's default for CPU tensors ...
        assert inc.backend("cpu") == "reference", inc.backend("cpu")
        with inc.use_backend("auto"):
            assert inc.backend("cpu") == "triton"  # ... and "auto" gives the interpreter back
        # The model loads on first use, with timm.
        assert inc.Incrementer.__module__ == "incrementer_fast.model" and "timm" in sys.modules
        assert "Incrementer" in dir(inc) and "continual" in dir(inc)
        print("ok")
    """, INCREMENTER_FAST_BACKEND="reference", TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_bad_backend_variable_fails_the_import_naming_it():
    result = _python("import incrementer_fast", INCREMENTER_FAST_BACKEND="cuda")
    assert result.returncode != 0
    assert "INCREMENTER_FAST_BACKEND must be one of 'auto', 'reference', 'triton', got 'cuda'" in result.stderr
