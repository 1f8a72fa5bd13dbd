"""``fault_feeds`` builds every site's fault table in one vectorised pass; it must give exactly the
tables that ``site_tables`` (checked against the dense reference) builds site by site."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxft import samples
from onnxft.faults.sampling import fault_feeds, sample_faults, site_tables
from onnxft.passes.inject import inject
from onnxft.runtime.data import input_specs, synthetic
from onnxft.runtime.session import InjectionSession


@pytest.mark.parametrize("name", ["vit_int8", "resnet"])  # gemm, batched gemm, conv, elementwise; int8 and fp32
def test_fault_feeds_equal_site_tables(name):
    model = onnx.load(samples.resolve_model(name)[0])
    feeds = synthetic(input_specs(model), 2, 0)
    plans = InjectionSession(inject(model).model, "cpu").plans(feeds)
    for ber, seed in ((1e-8, 0), (1e-6, 1), (3e-5, 2)):
        faults = sample_faults(plans, ber, np.random.default_rng(seed))
        got = fault_feeds(plans, faults)
        want = {}
        for idx in np.unique(faults.site).tolist():
            want.update(site_tables(plans[idx], faults, idx)[0])
        assert len(faults) and set(got) == set(want)
        for key, table in want.items():
            assert got[key].dtype == table.dtype and got[key].shape == table.shape, key
            np.testing.assert_array_equal(got[key], table, err_msg=key)
