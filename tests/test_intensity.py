"""Arithmetic intensity on hand-computed shapes, the seed's choice rule, the ridge-point cache and
the per-layer split of a hardened graph's time."""
import json

import numpy as np
import onnx
import pytest

from onnxft.analysis.intensity import choose_impl, gemm_ai, gemm_intensities, regime
from onnxft.campaigns.harden import HardenOptions, harden
from onnxft.campaigns.overhead import per_layer_overhead, protection_units
from onnxft.runtime import ridge as ridge_mod
from tests.models import run_cli, tiny_cnn, tiny_transformer


def test_gemm_ai_by_hand():
    # [50, 128] @ [128, 512], 8 items sharing the weight: 2*50*512*128*8 operations;
    # bytes 4 * (8*50*128 + 128*512 + 8*50*512)
    flops, nbytes, ai = gemm_ai(50, 512, 128, gemms=8)
    assert flops == 52_428_800
    assert nbytes == 4 * (51_200 + 65_536 + 204_800)
    assert ai == pytest.approx(52_428_800 / 1_286_144)
    # activation x activation (attention): B is per GEMM, so it is read per GEMM too
    assert gemm_ai(50, 50, 32, gemms=32, shared_b=False)[1] == 4 * 32 * (50 * 32 + 32 * 50 + 50 * 50)
    # a GEMV is memory-bound anywhere: AI below 0.5 FLOP/byte in fp32
    assert gemm_ai(1, 10, 128)[2] < 0.5
    with pytest.raises(ValueError):
        gemm_ai(0, 1, 1)


def test_choice_rule():
    assert regime(10.0, 5.0) == "compute" and choose_impl(10.0, 5.0) == "global"
    assert regime(5.0, 5.0) == "compute"  # at the ridge: compute-bound (the seed's >=)
    assert regime(4.99, 5.0) == "memory" and choose_impl(4.99, 5.0) == "dup"
    assert choose_impl(4.99, 5.0, memory_impl="fused") == "fused"
    with pytest.raises(ValueError):
        regime(1.0, 0.0)


def test_intensities_from_a_run():
    m = tiny_transformer(tokens=6, dim=8, classes=4)
    x = np.zeros((3, 6, 8), np.float32)
    calls = {c.name: c for c in gemm_intensities(m, {"x": x})}
    q = calls["/blocks.0/attn/q/MatMul"]  # [3, 6, 8] @ [8, 8]
    assert (q.M, q.N, q.K, q.gemms) == (6, 8, 8, 3)
    assert q.flops == 2 * 6 * 8 * 8 * 3 and q.bytes == 4 * (3 * 6 * 8 + 8 * 8 + 3 * 6 * 8)
    qk = calls["/blocks.0/attn/MatMul"]  # [3, 6, 8] @ [3, 8, 6]: B per item
    assert (qk.M, qk.N, qk.K, qk.gemms) == (6, 6, 8, 3) and qk.bytes == 4 * 3 * (48 + 48 + 36)
    head = calls["/head/Gemm"]  # [3, 8] @ [8, 4]^T
    assert (head.M, head.N, head.K, head.gemms) == (3, 4, 8, 1)


def test_conv_intensity_by_hand():
    calls = {c.name: c for c in gemm_intensities(tiny_cnn(), {"x": np.zeros((2, 1, 8, 8), np.float32)})}
    c2 = calls["/layer2/conv/Conv"]  # x [2, 4, 8, 8], w [6, 4, 3, 3], stride 2 pad 1 -> y [2, 6, 4, 4]
    assert (c2.M, c2.N, c2.K, c2.gemms) == (2 * 16, 6, 36, 1)
    assert c2.flops == 2 * 32 * 6 * 36
    assert c2.bytes == 4 * (2 * 4 * 64 + 6 * 36 + 2 * 6 * 16)


def test_ridge_override_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXFT_CACHE", str(tmp_path))
    assert ridge_mod.ridge_point("cpu", override=7.5) == {"ridge": 7.5, "source": "override", "provider": "cpu",
                                                          "threads": None}
    with pytest.raises(ValueError):
        ridge_mod.ridge_point("cpu", override=-1)
    calls = []

    def fake(provider, threads):
        calls.append(provider)
        return {"ridge": 3.0, "gemm_flops": 3e9, "bandwidth": 1e9}

    monkeypatch.setattr(ridge_mod, "measure_ridge", fake)
    assert ridge_mod.ridge_point("cpu", 1)["source"] == "measured"
    assert ridge_mod.ridge_point("cpu", 1) == {"ridge": 3.0, "gemm_flops": 3e9, "bandwidth": 1e9, "source": "cache"}
    assert len(calls) == 1  # the second call read the cache
    assert ridge_mod.ridge_point("cpu", 1, refresh=True)["source"] == "measured" and len(calls) == 2
    (tmp_path / "ridge.json").write_text("{not json")  # a damaged cache is measured again, not an error
    assert ridge_mod.ridge_point("cpu", 1)["source"] == "measured"
    assert json.loads((tmp_path / "ridge.json").read_text())


def test_measured_ridge_is_positive():
    r = ridge_mod.measure_ridge("cpu", threads=1, gemm_size=128, stream_mb=4, repeats=2)
    assert r["gemm_flops"] > 0 and r["bandwidth"] > 0 and r["ridge"] == pytest.approx(r["gemm_flops"] / r["bandwidth"])


def test_per_layer_attributes_protection_to_each_gemm():
    m = tiny_transformer()
    hardened = harden(m, HardenOptions(range_mode="none"), None).model
    units = protection_units(hardened)
    gemms = {"/blocks.0/attn/q/MatMul", "/blocks.0/attn/k/MatMul", "/blocks.0/attn/v/MatMul", "/blocks.0/attn/MatMul",
             "/blocks.0/attn/MatMul_1", "/blocks.0/mlp/fc1/MatMul", "/blocks.0/mlp/fc2/MatMul", "/head/Gemm"}
    assert set(units.values()) == gemms  # every check node belongs to the GEMM it protects
    info = per_layer_overhead(m, hardened, batch=4, provider="cpu", repeats=3, threads=1)
    assert {r["unit"] for r in info["units"]} == gemms
    assert all(r["protection_ms"] > 0 and r["nodes"] > 0 for r in info["units"])
    assert info["protection_ms"] == pytest.approx(sum(r["protection_ms"] for r in info["units"]))


def test_cli_intensity_and_per_layer(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ONNXFT_CACHE", str(tmp_path))
    path = tmp_path / "t.onnx"
    onnx.save(tiny_transformer(), path)
    code, out, _ = run_cli(["intensity", str(path), "--batch", "2", "--ridge", "4", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["ridge"]["ridge"] == 4.0 and len(info["calls"]) == 8
    assert all(c["impl"] == ("global" if c["ai"] >= 4 else "dup") for c in info["calls"])
    code, _, err = run_cli(["bench", str(path), "--per-layer"], capsys)
    assert code != 0 and "--per-layer needs --baseline" in err
    code, _, err = run_cli(["intensity", str(path), "--ridge", "-3"], capsys)
    assert code != 0 and err.startswith("onnxft: error:") and len(err.strip().splitlines()) == 1
