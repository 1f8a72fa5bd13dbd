"""The bundled samples: listed, loadable, accurate as the manifest says, and evaluated exactly at BER 0."""
import json

import numpy as np
import pytest

import onnxft.api as ft
from onnxft.cli.main import main
from onnxft.runtime.session import make_session
from onnxft.samples import manifest


@pytest.fixture(scope="module")
def info():
    return manifest()


@pytest.fixture(scope="module")
def data(info):
    with np.load(info["dataset"]["path"]) as z:
        return z["x"], z["y"]


def test_samples_lists_models_and_data(capsys, info):
    with pytest.raises(SystemExit) as exc:
        main(["samples", "--json"])
    assert exc.value.code == 0
    listed = json.loads(capsys.readouterr().out)
    names = {m["name"] for m in listed["models"]}
    assert {"vit", "vit_int8", "resnet", "resnet_int8"} <= names
    for m in listed["models"]:
        assert m["format"] in ("fp32", "int8") and 0.0 < m["clean_top1"] <= 1.0
    assert listed["dataset"]["n"] >= 2000


def test_manifest_accuracies_are_measured(info, data):
    x, y = data
    assert len(x) >= 2000 and x.dtype == np.float32 and y.dtype == np.int64
    for m in info["models"]:
        sess = make_session(m["path"], "cpu", level="basic")
        pred = np.concatenate([np.argmax(sess.run(None, {"x": x[i:i + 500]})[0], axis=1)
                               for i in range(0, len(x), 500)])
        assert np.mean(pred == y) == pytest.approx(m["clean_top1"], abs=1e-12), m["name"]
        if m["format"] == "fp32":
            assert m["clean_top1"] > 0.8


@pytest.mark.parametrize("name", ["vit", "vit_int8", "resnet_int8"])
def test_eval_ber0_reproduces_clean_accuracy_exactly(info, name):
    entry = next(m for m in info["models"] if m["name"] == name)
    r = ft.evaluate(name, bers=[0.0], trials=1, batch=250, provider="cpu")
    assert r.items == info["dataset"]["n"]
    assert r.clean == entry["clean_top1"]
    assert r.points[0].value == r.clean
    assert r.points[0].faults_per_item == 0


def test_faults_cost_accuracy_on_the_sample_vit():
    r = ft.evaluate("vit", bers=[0.0, 3e-6], trials=1, batch=64, limit=128, provider="cpu")
    clean, faulty = r.points
    assert faulty.faults_per_item > 10
    assert faulty.value < clean.value - 0.2
