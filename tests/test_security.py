"""Security: no unsafe deserialization of user files anywhere in the package (checked over its source, and by feeding
booby-trapped YAML and pickles to the loaders), and `flaxlm train` writes nowhere but its workdir whatever paths the
config names (checked with an audit hook on every file-system write of a real training run)."""

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import yaml

import flaxlm.config
from flaxlm.errors import ConfigError
from flaxlm.experiment import load_experiment

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "flaxlm"
SOURCES = sorted(PACKAGE.rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_YAML = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "load_all", "UnsafeLoader",
               "FullLoader", "Loader", "CLoader", "CFullLoader", "CUnsafeLoader"}


def dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain ('' for anything else)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings() -> list[str]:
    """Every unsafe deserialization or code-execution construct in the package source, as 'file:line: what'."""
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = lambda node: f"{path.relative_to(REPO)}:{node.lineno:05d}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in UNSAFE_MODULES for n in names):
                    found.append(f"{where(node)}: imports {names}")
            elif isinstance(node, ast.Attribute) and dotted(node.value) == "yaml" and node.attr in UNSAFE_YAML:
                found.append(f"{where(node)}: yaml.{node.attr}")
            elif isinstance(node, ast.Call):
                name = dotted(node.func)
                if name == "torch.load" and not is_true(keyword(node, "weights_only")):
                    found.append(f"{where(node)}: torch.load without weights_only=True")
                if name in ("np.load", "numpy.load", "jnp.load") and is_true(keyword(node, "allow_pickle")):
                    found.append(f"{where(node)}: {name} with allow_pickle=True")
                if name == "yaml.load" and dotted(keyword(node, "Loader") or ast.Constant(None)) not in (
                        "_StrictSafeLoader", "yaml.SafeLoader", "yaml.CSafeLoader"):
                    found.append(f"{where(node)}: yaml.load without a safe Loader")
                if name in ("eval", "exec", "os.system", "os.popen", "pickle.loads", "__import__"):
                    found.append(f"{where(node)}: {name}()")
                if name.startswith("subprocess.") and is_true(keyword(node, "shell")):
                    found.append(f"{where(node)}: {name}(shell=True)")
    return sorted(found)


def test_package_source_has_no_unsafe_deserialization():
    assert len(SOURCES) > 30
    assert findings() == []


def test_the_scanner_catches_what_it_looks_for(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""\
        import pickle
        import yaml, torch, numpy as np
        yaml.load(text, Loader=yaml.Loader)
        yaml.unsafe_load(text)
        torch.load(path)
        torch.load(path, weights_only=False)
        np.load(path, allow_pickle=True)
        eval("1")
        yaml.load(text, Loader=_StrictSafeLoader)
        torch.load(path, weights_only=True)
    """))
    monkeypatch.setattr(sys.modules[__name__], "SOURCES", [bad])
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert [f.split(": ", 1)[0] for f in findings()] == [f"bad.py:{n:05d}" for n in (1, 3, 3, 4, 5, 6, 7, 8)]


def test_yaml_configs_are_read_with_a_safe_loader(tmp_path):
    assert issubclass(flaxlm.config._StrictSafeLoader, yaml.SafeLoader)
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'task: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_experiment(config)
    assert not marker.exists()


def test_nanogpt_checkpoints_are_loaded_without_running_pickled_code(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")
    from flaxlm.interop.nanogpt import load_nanogpt

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_args": Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights only|unpickl"):
        load_nanogpt(path)
    assert not marker.exists()


# An audit hook records every file-system write of `flaxlm train` that is not under one of the allowed roots.
AUDITED_TRAIN = textwrap.dedent("""\
    import json, os, sys
    allowed = [os.path.realpath(p) for p in json.loads(os.environ["FLAXLM_TEST_ALLOWED"])]
    outside = []
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    PATH_EVENTS = {"os.mkdir": 1, "os.rename": 2, "os.replace": 2, "os.remove": 1, "os.rmdir": 1, "os.truncate": 1,
                   "os.symlink": 2, "os.link": 2, "os.chmod": 1, "os.chown": 1, "os.utime": 1, "shutil.rmtree": 1,
                   "shutil.move": 2, "shutil.copyfile": 2}
    def check(event, path):
        if isinstance(path, int) or path is None:
            return
        real = os.path.realpath(os.fsdecode(path))
        if real != os.devnull and not any(real == root or real.startswith(root + os.sep) for root in allowed):
            outside.append(f"{event} {real}")
    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
                check(event, path)
        elif event in PATH_EVENTS:
            for path in args[:PATH_EVENTS[event]]:
                check(event, path)
    sys.addaudithook(audit)
    from flaxlm import cli
    rc = cli.main(sys.argv[1:])
    print("OUTSIDE" + json.dumps(sorted(set(outside))))
    sys.exit(rc)
""")


def test_training_writes_only_inside_its_workdir(tmp_path):
    from flaxlm.data.default_corpus import default_corpus_text

    data, workdir, caches, cwd = (tmp_path / name for name in ("data", "run", "caches", "cwd"))
    for directory in (data, caches, cwd):
        directory.mkdir()
    (data / "corpus.txt").write_text(default_corpus_text()[:3000])
    (data / "test.txt").write_text(default_corpus_text()[3000:3600])
    config = data / "tiny.yaml"
    # Every path the config names points outside the workdir (and climbs out of the working directory).
    config.write_text(f"""\
task: lm
model: {{n_layer: 1, n_head: 2, n_embd: 32}}
data: {{train: ../data/corpus.txt, valid: {data / 'test.txt'}, tokenizer: char, batch_size: 4, block_size: 16}}
train: {{steps: 2, log_every: 1, eval_every: 2, checkpoint_every: 1, progress: false}}
""")
    before = {p: p.stat().st_mtime_ns for p in data.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HOME": str(caches), "TMPDIR": str(caches),
           "MPLCONFIGDIR": str(caches), "XDG_CACHE_HOME": str(caches), "FLAXLM_TEST_ALLOWED": json.dumps(
               [str(workdir), str(caches)])}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    result = subprocess.run([sys.executable, "-c", AUDITED_TRAIN, "train", str(config), "--workdir", str(workdir)],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outside = json.loads(result.stdout.split("OUTSIDE", 1)[1])
    assert outside == []
    assert {p: p.stat().st_mtime_ns for p in data.iterdir()} == before and list(cwd.iterdir()) == []
    assert {p.name for p in workdir.iterdir()} >= {"checkpoints", "metrics.jsonl", "config.yaml", "tokenizer.json"}
