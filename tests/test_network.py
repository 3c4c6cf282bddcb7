"""No network: importing every flaxlm module and training the quickstart config (shrunk to two steps of a tiny
model) succeed in a process where every way of reaching the network raises, and none of them is attempted."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

OFFLINE_TRAIN = textwrap.dedent("""\
    import importlib, json, pkgutil, socket, sys
    attempts = []
    BLOCKED = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
               "socket.getnameinfo", "socket.sendto", "socket.sendmsg", "urllib.Request", "http.client.connect",
               "ftplib.connect", "smtplib.connect"}
    def audit(event, args):
        if event in BLOCKED:
            attempts.append(f"{event} {args[1:2]!r}")
            raise OSError(f"network access blocked by the test: {event}")
    sys.addaudithook(audit)
    def refuse(name):
        def refused(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"network access blocked by the test: {name}")
        return refused
    socket.socket.connect = refuse("socket.socket.connect")
    socket.socket.connect_ex = refuse("socket.socket.connect_ex")
    socket.create_connection = refuse("socket.create_connection")
    socket.getaddrinfo = refuse("socket.getaddrinfo")
    import flaxlm
    modules = [m.name for m in pkgutil.walk_packages(flaxlm.__path__, "flaxlm.") if m.name != "flaxlm.__main__"]
    for name in modules:
        importlib.import_module(name)
    from flaxlm import cli
    rc = cli.main(sys.argv[1:])
    print("RESULT" + json.dumps({"attempts": attempts, "modules": len(modules)}))
    sys.exit(rc)
""")


def test_import_and_quickstart_training_never_touch_the_network(tmp_path):
    workdir = tmp_path / "run"
    overrides = ["train.steps=2", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
                 "train.checkpoint_every=2", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
                 "data.batch_size=4", "data.block_size=16", "data.eval_batch_size=16"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_TRAIN, "train", str(REPO / "configs" / "quickstart.yaml"),
         "--workdir", str(workdir), "--no-progress", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.split("RESULT", 1)[1])
    assert outcome["attempts"] == []
    assert outcome["modules"] > 30
    assert json.loads(result.stdout.split("RESULT", 1)[0].strip().splitlines()[-1])["eval/loss"] > 0
    assert (workdir / "checkpoints" / "2").is_dir()
