"""Never waiting on a network that is not there: an architecture needs no weights, weights in the local hub cache
load without a network call, and weights that are neither local nor reachable fail with one line naming the
way out, after one question to the hub instead of a minute of retries.

The steps run in one fresh interpreter (torch loads once) with huggingface_hub's offline switch off and its
endpoint on a closed port of 127.0.0.1; an audit hook records every connection each step makes, and each
step's output is caught at the file descriptors, so huggingface_hub's own handler is caught too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import make_folder

_STEPS = textwrap.dedent("""
    import json, os, sys, tempfile
    calls = []
    sys.addaudithook(lambda event, args: calls.append(str(args[1])) if event == "socket.connect" else None)
    from headstart.cli import main

    def step(name, run):
        del calls[:]
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        saved = os.dup(1), os.dup(2)
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            code = run()
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        out.seek(0); err.seek(0)
        return {"code": code, "out": out.read().decode(), "err": err.read().decode(), "calls": list(calls)}

    def cached():
        from headstart import create_backbone
        bb = create_backbone("timm:test_efficientnet")
        print(bb.weights_source, float(bb.body.model.conv_stem.weight.sum()))
        return 0

    def hub_line():
        import logging
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        return 0

    data, work = sys.argv[1], sys.argv[2]
    tiny = ["--input-size", "32", "--engine", "torch"]
    results = {
        "summary": step("summary", lambda: main(["summary", "vgg16", "--input-size", "32", "--frozen"])),
        "vgg16": step("vgg16", lambda: main(["train", data, "--out", work + "/a", "--backbone", "vgg16", *tiny])),
        "timm": step("timm", lambda: main(["train", data, "--out", work + "/b", "--backbone", "timm:resnet18", *tiny])),
        "cached": step("cached", cached),
        "hub line": step("hub line", hub_line),
    }
    with open(os.environ["RESULTS_FILE"], "w") as f:
        json.dump(results, f)
""")


def _hub_cache_with_test_efficientnet(hf_home: Path) -> float:
    """A hub cache as huggingface_hub leaves it (refs/main names the snapshot holding the file); returns a sum
    of the stored stem weights, to recognise them after loading."""
    import timm
    from safetensors.torch import save_file

    hf_id = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id
    repo = hf_home / "hub" / f"models--{hf_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    state = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    state = {k: v.contiguous() + 0.5 for k, v in state.items() if v.dtype.is_floating_point}
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    return float(state["conv_stem.weight"].sum())


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    work = tmp_path_factory.mktemp("offline")
    expected = _hub_cache_with_test_efficientnet(work / "hf-home")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(work / "hf-home"), RESULTS_FILE=str(work / "results"),
               HEADSTART_CACHE=str(work / "cache"), PYTHONPATH=os.pathsep.join(sys.path))
    data = make_folder(work / "data")
    done = subprocess.run([sys.executable, "-c", _STEPS, str(data), str(work)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    results = json.loads((work / "results").read_text())
    results["cached"]["expected"] = expected
    return results


def test_a_summary_makes_no_network_call(steps):
    s = steps["summary"]
    assert s["code"] == 0, s["err"]
    assert "Total params: 14,714,688" in s["out"] and "Trainable params: 0" in s["out"]
    assert s["calls"] == [] and "random weights" not in s["err"] and "Retrying" not in s["err"]


@pytest.mark.parametrize("name", ["vgg16", "timm"])
def test_weights_neither_local_nor_reachable_fail_at_once_naming_the_way_out(steps, name):
    s = steps[name]
    assert s["code"] == 1
    errors = [line for line in s["err"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, s["err"]
    assert "--weights FILE" in errors[0] and "--random-init" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
    assert "cannot be reached" in errors[0] and "127.0.0.1:9" in errors[0]
    assert "Retrying" not in s["err"] and "thrown while requesting" not in s["err"]
    assert len(s["calls"]) <= 1, s["calls"]  # at most one question to the hub, not a retry loop per file


def test_weights_in_the_local_hub_cache_load_without_a_network_call(steps):
    s = steps["cached"]
    assert s["code"] == 0, s["err"]
    source, total = s["out"].split()
    assert source == "hub:test_efficientnet" and abs(float(total) - s["expected"]) < 1e-3 * abs(s["expected"])
    assert s["calls"] == [] and "Retrying" not in s["err"]


def test_a_hub_log_line_is_printed_once(steps):
    # huggingface_hub has a handler of its own; the CLI's must not print its lines a second time
    assert steps["hub line"]["err"].count("Retrying in 1s") == 1, steps["hub line"]["err"]
