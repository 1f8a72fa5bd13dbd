"""harden / compare / bench --baseline / eval --inject-protection end to end, and their user mistakes."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import labelled_data, tiny_transformer, run_cli


run = run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("harden")
    m = tiny_transformer(seed=4)
    onnx.save(m, d / "tf.onnx")
    x, y = labelled_data(m, 64)
    np.savez(d / "tf.npz", x=x, y=y)
    return {"model": d / "tf.onnx", "data": d / "tf.npz", "dir": d, "x": x}


def _outputs(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize("abft,rng", [("lb", "clamp"), ("standard", "zero"), ("none", "clamp"), ("lb", "none")])
def test_harden_writes_model_and_plan(files, capsys, abft, rng):
    out = files["dir"] / f"h_{abft}_{rng}.onnx"
    code, text, err = run(["harden", str(files["model"]), "--abft", abft, "--range", rng, "--calib", str(files["data"]),
                           "-o", str(out)], capsys)
    assert code == 0, err
    plan = json.loads((files["dir"] / f"h_{abft}_{rng}.plan.json").read_text())
    hardened = onnx.load(str(out))
    onnx.checker.check_model(hardened, full_check=True)
    assert hardened.opset_import[0].version == 17  # never upgraded
    if abft != "none":
        assert len(plan["gemms"]) >= 7 and all(g["scheme"] in ("lb", "standard") for g in plan["gemms"])
        assert plan["abft_totals"]["detection_ops_per_item"] > 0
    if rng != "none":
        kinds = {r["kind"] for r in plan["ranges"]}
        assert kinds == {"softmax", "gelu"}
    assert plan["verification"]["max_rel_diff"] <= 1e-5
    np.testing.assert_allclose(_outputs(out, files["x"]), _outputs(files["model"], files["x"]), rtol=1e-5, atol=1e-6)


def test_harden_dmr_duplicates_layernorms(files, capsys):
    out = files["dir"] / "h_dmr.onnx"
    code, _, err = run(["harden", str(files["model"]), "--abft", "none", "--range", "none", "--dmr", "layernorm",
                        "-o", str(out)], capsys)
    assert code == 0, err
    plan = json.loads((files["dir"] / "h_dmr.plan.json").read_text())
    assert plan["dmr"]["op_types"] == ["LayerNormalization"] and plan["dmr"]["nodes"]
    assert plan["verification"]["bit_identical"]


def test_eval_of_hardened_model_faults_only_its_own_computation(files, capsys):
    out = files["dir"] / "h_eval.onnx"
    assert run(["harden", str(files["model"]), "--calib", str(files["data"]), "-o", str(out)], capsys)[0] == 0
    base = ["eval", str(out), "--data", str(files["data"]), "--ber", "1e-4", "--trials", "1", "--quiet"]
    code, text, _ = run(base, capsys)
    assert code == 0
    code, text_p, _ = run(base + ["--inject-protection"], capsys)
    assert code == 0
    sites = lambda t: int(t.split(" sites")[0].rsplit(",", 1)[1])  # noqa: E731  "(64 items, N sites, ..."
    assert sites(text_p) > sites(text)


def test_bench_baseline_json(files, capsys):
    out = files["dir"] / "h_bench.onnx"
    assert run(["harden", str(files["model"]), "-o", str(out), "--range", "none"], capsys)[0] == 0
    code, text, _ = run(["bench", str(out), "--baseline", str(files["model"]), "--repeats", "3", "--json",
                         "--provider", "cpu"], capsys)
    assert code == 0
    info = json.loads(text)
    assert info["baseline_ms"] > 0 and info["model_ms"] > 0 and info["ratio"] > 0


def test_compare_writes_tables_and_plots(files, capsys):
    d = files["dir"] / "cmp"
    code, text, err = run(["compare", str(files["model"]), "--data", str(files["data"]), "--schemes", "none,lb,tmr",
                           "--ber", "1e-4", "--trials", "1", "--batch", "32", "--provider", "cpu", "--out", str(d)],
                          capsys)
    assert code == 0, err
    result = json.loads((d / "compare.json").read_text())
    rows = {r["scheme"]: r for r in result["schemes"]}
    assert set(rows) == {"none", "lb", "tmr"}
    assert rows["none"]["points"][0]["overhead_ops"] == 0
    assert 1.5 < rows["tmr"]["points"][0]["overhead_ops"] < 2.5  # two extra copies of the layer's operations
    assert rows["lb"]["points"][0]["accuracy"] >= rows["none"]["points"][0]["accuracy"]
    for f in ("compare.csv", "accuracy_vs_ber.png", "outcomes_vs_ber.png", "overhead.png"):
        assert (d / f).stat().st_size > 0
    for row in rows.values():  # outcome rates beside accuracy (docs/outcomes.md)
        p = row["points"][0]
        assert abs(p["sdc"] + p["due"] + p["masked"] - 1) < 1e-12 and p["sdc_ci"][0] <= p["sdc"] <= p["sdc_ci"][1]
        assert p["accuracy"] <= 1 - p["due"] + 1e-12
    assert result["spec"]["schemes"] == ["none", "lb", "tmr"] and result["spec"]["bers"] == [1e-4]
    assert "sdc_ci_lo" in (d / "compare.csv").read_text().splitlines()[0]


def test_compare_sec_baseline_and_range_options(files, capsys):
    """``sec`` (single-error correction only) recovers no more than ``standard`` on the same faults
    and costs less; ``--range/--range-ops/--alpha`` reach the range schemes."""
    code, text, err = run(["compare", str(files["model"]), "--data", str(files["data"]), "--schemes",
                           "standard,sec,range,lb+range+dmr", "--range", "zero", "--range-ops", "softmax,gelu", "--alpha", "0.25",
                           "--ber", "3e-4", "--trials", "1", "--batch", "32", "--provider", "cpu", "--json"], capsys)
    assert code == 0, err
    result = json.loads(text)
    assert result["range"] == {"mode": "zero", "ops": ["softmax", "gelu"], "alpha": 0.25}
    rows = {r["scheme"]: r["points"][0] for r in result["schemes"]}
    assert rows["sec"]["accuracy"] <= rows["standard"]["accuracy"]
    assert 0 < rows["sec"]["overhead_ops"] < rows["standard"]["overhead_ops"]
    assert rows["range"]["overhead_ops"] > 0
    assert rows["lb+range+dmr"]["overhead_ops"] > rows["range"]["overhead_ops"]  # + ABFT + LayerNorm copies
    assert result["dmr"] == ["LayerNormalization"]


def test_compare_inject_protection_faults_recovery_too(files, capsys):
    """``compare --inject-protection`` (and ``api.compare(inject_protection=True)``) evaluates each
    scheme with its protection faulted: every recovery recompute is a site sampled like its GEMM,
    so about twice the flips are drawn (the GEMMs are most of this model's operations)."""
    from onnxft import api

    runs = {flag: api.compare(str(files["model"]), ["standard"], [1e-4], str(files["data"]), trials=1, batch=32,
                              provider="cpu", inject_protection=flag) for flag in (False, True)}
    assert runs[True]["inject_protection"] and not runs[False]["inject_protection"]
    ev = {flag: r["eval_results"][0] for flag, r in runs.items()}
    assert ev[True]["sites"] > ev[False]["sites"]
    assert ev[True]["points"][0]["faults_per_item"] > 1.8 * ev[False]["points"][0]["faults_per_item"]
    code, text, err = run(["compare", str(files["model"]), "--data", str(files["data"]), "--schemes", "lb",
                           "--ber", "1e-4", "--trials", "1", "--batch", "32", "--provider", "cpu",
                           "--inject-protection"], capsys)
    assert code == 0 and "protection faulted too" in text, err


@pytest.mark.parametrize("argv,needle", [
    (["--abft", "none", "--range", "none"], "nothing to do"),
    (["--abft", "none", "--range", "none", "--dmr", "Foo"], "nothing to protect"),
    (["--abft", "none", "--range-ops", "quantized"], "nothing to protect"),  # not a QDQ model
    (["--block-size", "0"], "block-size"),
    (["--block-size", "x"], "block-size"),
    (["--ber", "2"], "outside [0, 1]"),
    (["--select", "auto", "--gemms", "fc1"], "--gemms and --select auto"),
    (["--autotune"], "--autotune chooses per GEMM"),
    (["--abft-impl", "ig", "--ridge", "-1"], "--ridge must be a positive"),
])
def test_harden_user_mistakes(files, capsys, argv, needle):
    out = files["dir"] / "bad.onnx"
    code, _, err = run(["harden", str(files["model"]), "-o", str(out)] + argv, capsys)
    assert code != 0 and needle in err and err.count("\n") == 1 and err.startswith("onnxft: error:")
    assert not out.exists()


def test_harden_bad_files(files, capsys, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    code, _, err = run(["harden", str(junk), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code != 0 and err.startswith("onnxft: error:") and err.count("\n") == 1
    code, _, err = run(["harden", str(files["model"]), "-o", str(tmp_path / "nodir" / "o.onnx")], capsys)
    assert code != 0 and "does not exist" in err
    assert not (tmp_path / "o.onnx").exists()


def test_harden_fixed_batch_writes_static_inputs(files, capsys):
    out = files["dir"] / "h_b4.onnx"
    code, _, err = run(["harden", str(files["model"]), "--calib", str(files["data"]), "--batch", "4", "-o", str(out)],
                       capsys)
    assert code == 0, err
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    x = files["x"][:4]
    np.testing.assert_allclose(_outputs(out, x), _outputs(files["model"], x), rtol=1e-5, atol=1e-6)
    assert json.loads((files["dir"] / "h_b4.plan.json").read_text())["batch"] == 4
