"""The CLI verbs end to end on tiny models, and the user mistakes they must answer in one line."""
import json

import numpy as np
import onnx
import pytest

from models import labelled_data, tiny_cnn, tiny_transformer, run_cli


run = run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    paths = {}
    for name, build in (("tf", tiny_transformer), ("cnn", tiny_cnn)):
        m = build()
        onnx.save(m, d / f"{name}.onnx")
        x, y = labelled_data(m, 24)
        np.savez(d / f"{name}.npz", x=x, y=y)
        paths[name] = d / f"{name}.onnx"
        paths[name + "_data"] = d / f"{name}.npz"
    paths["dir"] = d
    return paths


def test_inspect_json_counts_operations(files, capsys):
    code, out, _ = run(["inspect", str(files["cnn"]), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    conv1 = info["sites"][0]
    # Conv 1->4 channels, 3x3, pad 1 on 8x8: 256 outputs x (2*9-1 + 1 bias) operations
    assert conv1["kind"] == "conv" and conv1["operations"] == 4 * 8 * 8 * (2 * 9 - 1 + 1)
    assert info["totals"]["operations_per_item"] == sum(s["operations"] for s in info["sites"])
    origins = {s["origin"] for s in info["sites"]}
    assert {"BatchNormalization", "Gemm", "Conv"} <= origins


def test_inject_writes_checked_graph(files, capsys, tmp_path):
    out_path = tmp_path / "inj.onnx"
    code, out, _ = run(["inject", str(files["tf"]), "-o", str(out_path)], capsys)
    assert code == 0 and "fault sites" in out
    model = onnx.load(out_path)
    onnx.checker.check_model(model, full_check=True)
    assert any(f.domain == "ai.onnxft" for f in model.functions)


def test_eval_ber0_equals_clean_and_writes_outputs(files, capsys, tmp_path):
    out_dir = tmp_path / "res"
    code, out, _ = run(["eval", str(files["tf"]), "--data", str(files["tf_data"]), "--ber", "0,1e-3",
                        "--trials", "2", "--batch", "8", "--quiet", "--out", str(out_dir)], capsys)
    assert code == 0
    res = json.loads((out_dir / "results.json").read_text())
    assert res["metric"] == "top1" and res["clean"] == 1.0
    p0, p1 = res["points"]
    assert p0["ber"] == 0 and p0["value"] == res["clean"] and p0["trials"] == 2
    assert p1["value"] < 1.0 and p1["ci"][0] <= p1["value"] <= p1["ci"][1]
    assert (out_dir / "results.csv").read_text().startswith("model,metric,ber")
    assert (out_dir / "accuracy_vs_ber.png").read_bytes()[:4] == b"\x89PNG"


def test_sdc_metric_needs_no_labels(files, capsys, tmp_path):
    x = np.load(files["cnn_data"])["x"]
    p = tmp_path / "nolabels.npz"
    np.savez(p, x=x)
    code, out, _ = run(["eval", str(files["cnn"]), "--data", str(p), "--metric", "sdc", "--ber", "0,1e-3",
                        "--trials", "1", "--quiet"], capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "0.001"))]
    assert rows[0][1] == "0.0000"


def test_fault_log_replays_exactly(files, capsys, tmp_path):
    log = tmp_path / "faults.jsonl"
    code, _, _ = run(["eval", str(files["cnn"]), "--data", str(files["cnn_data"]), "--ber", "1e-4", "--trials", "2",
                      "--batch", "12", "--quiet", "--fault-log", str(log)], capsys)
    assert code == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 4 and all(r["faults"] for r in records)
    f = records[0]["faults"][0]
    assert {"site", "element", "step", "bits", "original", "faulty"} <= set(f)
    code, out, _ = run(["replay", str(log), "--record", "3"], capsys)
    assert code == 0 and "reproduced exactly" in out


def test_seed_reproduces_results(files, capsys):
    args = ["eval", str(files["tf"]), "--data", str(files["tf_data"]), "--ber", "3e-4", "--trials", "2", "--quiet"]
    a = run(args + ["--seed", "7"], capsys)[1]
    b = run(args + ["--seed", "7"], capsys)[1]
    assert a == b


@pytest.mark.parametrize("argv,needle", [
    (["eval", "{tf}", "--data", "{tf_data}", "--ber", "2"], "outside [0, 1]"),
    (["eval", "{tf}", "--data", "{tf_data}", "--ber", "nan"], "outside [0, 1]"),
    (["eval", "{tf}", "--data", "{tf_data}", "--ber", "abc"], "not a number"),
    (["inspect", "{dir}/garbage.onnx"], "not a readable ONNX model"),
    (["inspect", "{dir}/missing.onnx"], "not found"),
    (["inject", "{tf}", "-o", "/nonexistent-dir/x.onnx"], "does not exist"),
    (["inject", "{tf}", "-o", "{dir}/never.onnx", "--sites", "no-such-node"], "no fault sites"),
    (["eval", "{tf}", "--data", "{dir}/wrong.npz", "--ber", "0"], "expects"),
    (["eval", "{tf}", "--data", "{dir}/garbage.onnx", "--ber", "0"], "not a readable .npz"),
    (["eval", "{tf}", "--data", "{dir}/nolabel.npz", "--ber", "0"], "no labels"),
    (["inject", "{tf}", "-o", "{dir}/never.onnx", "--format", "fp8"], "unknown format"),
    (["eval", "{tf}", "--data", "{tf_data}", "--ber", "0", "--out", "{dir}/garbage.onnx"], "is a file"),
    (["eval", "{tf}", "--data", "{tf_data}", "--ber", "0", "--out", "{dir}/garbage.onnx/sub"],
     "cannot create the folder"),
])
def test_user_mistakes_get_one_line(files, capsys, argv, needle):
    d = files["dir"]
    (d / "garbage.onnx").write_bytes(b"this is not onnx")
    np.savez(d / "wrong.npz", x=np.zeros((2, 3, 3), np.float32), y=np.zeros(2, np.int64))
    np.savez(d / "nolabel.npz", x=np.zeros((2, 6, 8), np.float32))
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    code, out, err = run(argv, capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnxft: error:") and needle in lines[0], err
    assert "Traceback" not in err
    assert not (d / "never.onnx").exists()


def test_inject_with_ber_writes_fault_set_for_plain_onnxruntime(files, capsys, tmp_path):
    import onnxruntime as ort

    out_path = tmp_path / "inj.onnx"
    code, out, _ = run(["inject", str(files["cnn"]), "-o", str(out_path), "--ber", "1e-3", "--batch", "4",
                        "--seed", "1"], capsys)
    assert code == 0
    faults = dict(np.load(str(out_path) + ".faults.npz"))
    assert faults and all(k.startswith("onnxft.") for k in faults)
    x = np.load(files["cnn_data"])["x"][:4]
    sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(files["cnn"]), providers=["CPUExecutionProvider"])
    clean = sess.run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(clean, plain.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    faulty = sess.run(["logits"], {"x": x, **faults})[0]
    assert not np.array_equal(np.nan_to_num(faulty), clean)
    # the same seed gives the same fault set
    code, _, _ = run(["inject", str(files["cnn"]), "-o", str(tmp_path / "b.onnx"), "--ber", "1e-3", "--batch", "4",
                      "--seed", "1"], capsys)
    again = dict(np.load(str(tmp_path / "b.onnx") + ".faults.npz"))
    assert all(np.array_equal(again[k], v) for k, v in faults.items())
